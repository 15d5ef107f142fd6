#!/usr/bin/env bash
# Preference tuning (DPO) of LoRA adapters on a 4-bit quantised model (Q-LoRA), in one process on one GPU.
#
# Edit the three lines below, then run: bash finetune/dpo_qlora_single_gpu.sh
# (-m/-d/-o on the command line override them; -h for help; every other argument goes to dpo.py, e.g. --loss_type ipo)
MODEL="output/lora"       # the SFT output to tune (an adapter folder or a model folder), or a Hugging Face model id
DATA="path_to_data.json"  # preference pairs: JSON list or JSONL (prompt/chosen/rejected, or conversations + chosen/rejected)
OUTPUT="output/dpo_qlora"  # output folder

source "$(dirname "$0")/common.sh"
USAGE="Preference tuning (DPO) of LoRA adapters on a 4-bit quantised model (Q-LoRA), in one process on one GPU."
SCRIPT="dpo.py"
DEEPSPEED=""
MODE_ARGS=("${COMMON_ARGS[@]}" --num_train_epochs 1 --weight_decay 0 --beta 0.1 --use_lora --q_lora --learning_rate 5e-6)
ONE_PROCESS=1  # one process whatever the GPU count: GPU 0 (CUDA_VISIBLE_DEVICES picks another)
launch "$@"
