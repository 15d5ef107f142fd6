#!/usr/bin/env bash
# LoRA fine-tuning, DeepSpeed ZeRO-2 (--deepspeed ds_configs/zero3.json to shard the base model too), on every GPU of the node (on the CPU without one).
#   bash finetune/finetune_lora_ds.sh -m MODEL -d DATA [-o OUTPUT] [finetune.py arguments...]   (-h for help)
source "$(dirname "$0")/common.sh"
USAGE="LoRA fine-tuning, DeepSpeed ZeRO-2 (--deepspeed ds_configs/zero3.json to shard the base model too), on every GPU of the node (on the CPU without one)."
OUTPUT=output/lora
DEEPSPEED="$REPO/ds_configs/zero2.json"
MODE_ARGS=("${COMMON_ARGS[@]}" --use_lora --learning_rate 3e-4)
launch "$@"
