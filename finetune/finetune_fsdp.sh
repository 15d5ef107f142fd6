#!/usr/bin/env bash
# Full-parameter fine-tuning with PyTorch FSDP (add --use_lora for LoRA), on every GPU of the node. Needs GPUs: FSDP does not run on the CPU.
#
# Edit the three lines below, then run: bash finetune/finetune_fsdp.sh
# (-m/-d/-o on the command line override them; -h for help; every other argument goes to finetune.py)
MODEL="Qwen/Qwen2.5-7B-Instruct" # Hugging Face model id, or the path of a local model folder
DATA="path_to_data.json"         # your training data: JSON list or JSONL (Qwen conversations, ChatML messages or alpaca)
OUTPUT="output/fsdp"             # output folder

source "$(dirname "$0")/common.sh"
USAGE="Full-parameter fine-tuning with PyTorch FSDP (add --use_lora for LoRA), on every GPU of the node. Needs GPUs: FSDP does not run on the CPU."
DEEPSPEED=""
MODE_ARGS=("${COMMON_ARGS[@]}" --learning_rate 1e-5 --fsdp --fsdp_config "$REPO/ds_configs/fsdp.json")
launch "$@"
