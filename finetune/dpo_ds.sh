#!/usr/bin/env bash
# Full-parameter preference tuning (DPO), DeepSpeed ZeRO-2 with a frozen reference copy (--deepspeed ds_configs/zero3.json to shard the model: the reference log-probs are then computed once as training starts), on every GPU of the node.
#
# Edit the three lines below, then run: bash finetune/dpo_ds.sh
# (-m/-d/-o on the command line override them; -h for help; every other argument goes to dpo.py, e.g. --loss_type ipo)
MODEL="output/lora"       # the SFT output to tune (an adapter folder or a model folder), or a Hugging Face model id
DATA="path_to_data.json"  # preference pairs: JSON list or JSONL (prompt/chosen/rejected, or conversations + chosen/rejected)
OUTPUT="output/dpo_full"  # output folder

source "$(dirname "$0")/common.sh"
USAGE="Full-parameter preference tuning (DPO), DeepSpeed ZeRO-2 with a frozen reference copy (--deepspeed ds_configs/zero3.json to shard the model: the reference log-probs are then computed once as training starts), on every GPU of the node."
SCRIPT="dpo.py"
DEEPSPEED="$REPO/ds_configs/zero2.json"
MODE_ARGS=("${COMMON_ARGS[@]}" --num_train_epochs 1 --weight_decay 0 --beta 0.1 --learning_rate 5e-7)
launch "$@"
