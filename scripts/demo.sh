#!/usr/bin/env bash
# End to end on the built-in tiny model: build it, ask it the example questions, fine-tune it with LoRA on
# data/example_chatml.jsonl, ask again; merge the adapter, quantise the merged model to 4 bits with GPTQ and ask
# the quantised model. A few minutes on 2 CPU cores; nothing is downloaded but packages.
set -euo pipefail
cd "$(dirname "$0")/.."
python -c "import torch" 2>/dev/null || pip install --quiet torch==2.13.0
pip install --quiet -r requirements.txt -r requirements-gptq.txt  # GPTQ: for the quantisation step

DATA=data/example_chatml.jsonl
[ -f tiny-qwen2/config.json ] || python -m scripts.make_tiny_model --output tiny-qwen2

echo "===== Before fine-tuning ====="
python -m scripts.ask --model tiny-qwen2 --data "$DATA"

python finetune.py \
    --model_name_or_path tiny-qwen2 \
    --data_path "$DATA" \
    --output_dir demo-output/lora \
    --use_lora --lora_r 16 --lora_alpha 32 \
    --learning_rate 5e-3 --lr_scheduler_type cosine --warmup_steps 10 \
    --num_train_epochs 100 --per_device_train_batch_size 4 \
    --logging_steps 20 --save_steps 100 --report_to none --start_over

echo "===== After fine-tuning (demo-output/lora) ====="
python -m scripts.ask --model demo-output/lora --data "$DATA"

python merge_lora.py --adapter demo-output/lora --output demo-output/merged --overwrite

# GPTQModel would torch.compile its CPU kernels on first use: minutes on 2 cores, for a model this small.
export TORCH_COMPILE_DISABLE=1
python run_gptq.py \
    --model_name_or_path demo-output/merged \
    --data_path "$DATA" \
    --out_path demo-output/gptq-int4 \
    --bits 4 --group_size 32 --overwrite

echo "===== GPTQ 4-bit (demo-output/gptq-int4) ====="
python -m scripts.ask --model demo-output/gptq-int4 --data "$DATA"
