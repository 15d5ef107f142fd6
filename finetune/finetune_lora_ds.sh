#!/usr/bin/env bash
# LoRA fine-tuning, DeepSpeed ZeRO-2 (--deepspeed ds_configs/zero3.json to shard the base model too), on every GPU of the node (on the CPU without one).
#
# Edit the three lines below, then run: bash finetune/finetune_lora_ds.sh
# (-m/-d/-o on the command line override them; -h for help; every other argument goes to finetune.py)
MODEL="Qwen/Qwen2.5-7B-Instruct" # Hugging Face model id, or the path of a local model folder
DATA="path_to_data.json"         # your training data: JSON list or JSONL (Qwen conversations, ChatML messages or alpaca)
OUTPUT="output/lora"             # output folder

source "$(dirname "$0")/common.sh"
USAGE="LoRA fine-tuning, DeepSpeed ZeRO-2 (--deepspeed ds_configs/zero3.json to shard the base model too), on every GPU of the node (on the CPU without one)."
DEEPSPEED="$REPO/ds_configs/zero2.json"
MODE_ARGS=("${COMMON_ARGS[@]}" --use_lora --learning_rate 3e-4)
launch "$@"
