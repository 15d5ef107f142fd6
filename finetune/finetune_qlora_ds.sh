#!/usr/bin/env bash
# Q-LoRA fine-tuning (4-bit NF4 base), DeepSpeed ZeRO-2, on every GPU of the node (on the CPU without one).
#
# Edit the three lines below, then run: bash finetune/finetune_qlora_ds.sh
# (-m/-d/-o on the command line override them; -h for help; every other argument goes to finetune.py)
MODEL="Qwen/Qwen2.5-7B-Instruct" # Hugging Face model id, or the path of a local model folder
DATA="path_to_data.json"         # your training data: JSON list or JSONL (Qwen conversations, ChatML messages or alpaca)
OUTPUT="output/qlora"            # output folder

source "$(dirname "$0")/common.sh"
USAGE="Q-LoRA fine-tuning (4-bit NF4 base), DeepSpeed ZeRO-2, on every GPU of the node (on the CPU without one)."
DEEPSPEED="$REPO/ds_configs/zero2.json"
MODE_ARGS=("${COMMON_ARGS[@]}" --use_lora --q_lora --learning_rate 2e-4)
launch "$@"
