#!/usr/bin/env bash
# LoRA fine-tuning in one process (one GPU, or the CPU), without DeepSpeed.
#
# Edit the three lines below, then run: bash finetune/finetune_lora_single_gpu.sh
# (-m/-d/-o on the command line override them; -h for help; every other argument goes to finetune.py)
MODEL="Qwen/Qwen2.5-7B-Instruct" # Hugging Face model id, or the path of a local model folder
DATA="path_to_data.json"         # your training data: JSON list or JSONL (Qwen conversations, ChatML messages or alpaca)
OUTPUT="output/lora"             # output folder

source "$(dirname "$0")/common.sh"
USAGE="LoRA fine-tuning in one process (one GPU, or the CPU), without DeepSpeed."
DEEPSPEED=""
MODE_ARGS=("${COMMON_ARGS[@]}" --use_lora --learning_rate 3e-4)
ONE_PROCESS=1  # one process whatever the GPU count: GPU 0 (CUDA_VISIBLE_DEVICES picks another)
launch "$@"
