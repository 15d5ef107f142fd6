#!/usr/bin/env bash
# LoRA fine-tuning in one process (one GPU, or the CPU), without DeepSpeed.
#   bash finetune/finetune_lora_single_gpu.sh -m MODEL -d DATA [-o OUTPUT] [finetune.py arguments...]   (-h for help)
source "$(dirname "$0")/common.sh"
USAGE="LoRA fine-tuning in one process (one GPU, or the CPU), without DeepSpeed."
OUTPUT=output/lora
DEEPSPEED=""
MODE_ARGS=("${COMMON_ARGS[@]}" --use_lora --learning_rate 3e-4)
ONE_PROCESS=1  # one process whatever the GPU count: GPU 0 (CUDA_VISIBLE_DEVICES picks another)
launch "$@"
