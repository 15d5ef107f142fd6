#!/usr/bin/env bash
# Full-parameter preference tuning (DPO) with PyTorch FSDP, the reference's log-probs computed once as training starts (add --use_lora for LoRA), on every GPU of the node. Needs GPUs: FSDP does not run on the CPU.
#
# Edit the three lines below, then run: bash finetune/dpo_fsdp.sh
# (-m/-d/-o on the command line override them; -h for help; every other argument goes to dpo.py, e.g. --loss_type ipo)
MODEL="output/full"       # the SFT output to tune (a model folder or an adapter folder), or a Hugging Face model id
DATA="path_to_data.json"  # preference pairs: JSON list or JSONL (prompt/chosen/rejected, or conversations + chosen/rejected)
OUTPUT="output/dpo_fsdp"  # output folder

source "$(dirname "$0")/common.sh"
USAGE="Full-parameter preference tuning (DPO) with PyTorch FSDP, the reference's log-probs computed once as training starts (add --use_lora for LoRA), on every GPU of the node. Needs GPUs: FSDP does not run on the CPU."
SCRIPT="dpo.py"
DEEPSPEED=""
MODE_ARGS=("${COMMON_ARGS[@]}" --num_train_epochs 1 --weight_decay 0 --beta 0.1 --learning_rate 5e-7 --fsdp --fsdp_config "$REPO/ds_configs/fsdp.json")
launch "$@"
