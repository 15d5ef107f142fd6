#!/usr/bin/env bash
# Q-LoRA fine-tuning (4-bit NF4 base) in one process (one GPU, or the CPU), without DeepSpeed.
#   bash finetune/finetune_qlora_single_gpu.sh -m MODEL -d DATA [-o OUTPUT] [finetune.py arguments...]   (-h for help)
source "$(dirname "$0")/common.sh"
USAGE="Q-LoRA fine-tuning (4-bit NF4 base) in one process (one GPU, or the CPU), without DeepSpeed."
OUTPUT=output/qlora
DEEPSPEED=""
MODE_ARGS=("${COMMON_ARGS[@]}" --use_lora --q_lora --learning_rate 2e-4)
ONE_PROCESS=1  # one process whatever the GPU count: GPU 0 (CUDA_VISIBLE_DEVICES picks another)
launch "$@"
