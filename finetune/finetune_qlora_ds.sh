#!/usr/bin/env bash
# Q-LoRA fine-tuning (4-bit NF4 base), DeepSpeed ZeRO-2, on every GPU of the node (on the CPU without one).
#   bash finetune/finetune_qlora_ds.sh -m MODEL -d DATA [-o OUTPUT] [finetune.py arguments...]   (-h for help)
source "$(dirname "$0")/common.sh"
USAGE="Q-LoRA fine-tuning (4-bit NF4 base), DeepSpeed ZeRO-2, on every GPU of the node (on the CPU without one)."
OUTPUT=output/qlora
DEEPSPEED="$REPO/ds_configs/zero2.json"
MODE_ARGS=("${COMMON_ARGS[@]}" --use_lora --q_lora --learning_rate 2e-4)
launch "$@"
