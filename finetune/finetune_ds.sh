#!/usr/bin/env bash
# Full-parameter fine-tuning, DeepSpeed ZeRO-3, on every GPU of the node (on the CPU without one).
#   bash finetune/finetune_ds.sh -m MODEL -d DATA [-o OUTPUT] [finetune.py arguments...]   (-h for help)
source "$(dirname "$0")/common.sh"
USAGE="Full-parameter fine-tuning, DeepSpeed ZeRO-3, on every GPU of the node (on the CPU without one)."
OUTPUT=output/full
DEEPSPEED="$REPO/ds_configs/zero3.json"
MODE_ARGS=("${COMMON_ARGS[@]}" --learning_rate 1e-5)
launch "$@"
