#!/usr/bin/env bash
# Full-parameter fine-tuning with PyTorch FSDP (add --use_lora for LoRA), on every GPU of the node. Needs GPUs: FSDP does not run on the CPU.
#   bash finetune/finetune_fsdp.sh -m MODEL -d DATA [-o OUTPUT] [finetune.py arguments...]   (-h for help)
source "$(dirname "$0")/common.sh"
USAGE="Full-parameter fine-tuning with PyTorch FSDP (add --use_lora for LoRA), on every GPU of the node. Needs GPUs: FSDP does not run on the CPU."
OUTPUT=output/fsdp
DEEPSPEED=""
MODE_ARGS=("${COMMON_ARGS[@]}" --learning_rate 1e-5 --fsdp --fsdp_config "$REPO/ds_configs/fsdp.json")
launch "$@"
