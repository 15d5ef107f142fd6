"""Real (non-pad) tokens per second: our per-batch padding against padding every sample to model_max_length.

Also per-batch padding rounded up to a multiple of 64 tokens (finetune.py's default on CUDA, for shape-stable
attention kernels), and how many distinct batch shapes each collation gives (a CPU does not care; a kernel that
builds a plan per shape does).

Same tiny model, same data, same LoRA set-up and the same optimizer steps for each, measured one after the
other in this run (best of --repeats); run it on an otherwise idle machine. The data is a long-tailed
(lognormal) mix of conversation lengths.

    python -m bench.bench_collation [--model tiny-qwen2] [--samples 128] [--max_length 1024]
"""

from __future__ import annotations

import sft.quiet

if __name__ == "__main__":
    sft.quiet.setup()  # first: it silences known chatter of the libraries imported below

# isort: split
import argparse
import random
import tempfile
import time

import numpy as np
import torch
from transformers import Trainer, TrainingArguments

from scripts.make_tiny_model import build_tiny_model, generate_text
from sft.data import make_collator, tokenize_conversations
from sft.modeling import add_lora, load_model, load_tokenizer


def long_tailed_conversations(count: int, seed: int) -> list[list[dict]]:
    """Conversations whose lengths follow a lognormal law (median ~60 words, a few up to ~1,500)."""
    rng = random.Random(seed)
    sentences = generate_text(rng, 5000)
    conversations = []
    for length in np.random.default_rng(seed).lognormal(mean=4.1, sigma=0.9, size=count):
        words = min(max(int(length), 4), 1500)
        prompt = " ".join(rng.choice(sentences) for _ in range(max(1, words // 24)))
        answer = " ".join(rng.choice(sentences) for _ in range(max(1, words // 8)))
        conversations.append([{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}])
    return conversations


class CountingCollator:
    """Counts the tokens each batch holds, padding included, and the distinct shapes of the batches."""

    def __init__(self, collator):
        self.collator, self.tokens, self.shapes = collator, 0, set()

    def __call__(self, features):
        batch = self.collator(features)
        self.tokens += batch["input_ids"].numel()
        self.shapes.add(tuple(batch["input_ids"].shape))
        return batch


def train_once(
    model_path: str,
    dataset,
    tokenizer,
    pad_to_length: int | None,
    batch_size: int,
    group_by_length: bool,
    multiple: int = 1,
    max_length: int | None = None,
) -> tuple[float, int, int]:
    torch.manual_seed(0)
    model = add_lora(load_model(model_path), r=16, alpha=32, dropout=0.0, target_modules="all-linear")
    collator = CountingCollator(make_collator(tokenizer, pad_to_length, multiple, max_length))
    with tempfile.TemporaryDirectory() as output_dir:
        args = TrainingArguments(
            output_dir=output_dir,
            per_device_train_batch_size=batch_size,
            num_train_epochs=1,
            learning_rate=1e-3,
            save_strategy="no",
            report_to="none",
            disable_tqdm=True,
            dataloader_pin_memory=False,
            seed=0,
            train_sampling_strategy="group_by_length" if group_by_length else "random",
        )
        trainer = Trainer(model=model, args=args, train_dataset=dataset, data_collator=collator)
        start = time.perf_counter()
        trainer.train()
        return time.perf_counter() - start, collator.tokens, len(collator.shapes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="model folder (default: build the tiny model in a temporary folder)")
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--max_length", type=int, default=1024, help="model_max_length, the pad-to length")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as scratch:
        model_path = args.model or str(build_tiny_model(f"{scratch}/tiny"))
        tokenizer = load_tokenizer(model_path)
        dataset, counts = tokenize_conversations(
            long_tailed_conversations(args.samples, seed=0), tokenizer, args.max_length, cache_dir=scratch
        )
        real_tokens = sum(dataset["length"])
        lengths = np.array(dataset["length"])
        print(
            f"{len(dataset)} samples, {real_tokens:,} real tokens, length p50 {int(np.median(lengths))}, "
            f"p90 {int(np.percentile(lengths, 90))}, max {lengths.max()} ({counts['truncated']} truncated to "
            f"{args.max_length}); batch {args.batch_size}, {len(dataset) // args.batch_size} optimizer steps; "
            f"{torch.get_num_threads()} threads"
        )
        results = {}
        setups = {
            "pad to model_max_length": (args.max_length, False, 1),
            "per-batch padding (ours, default off CUDA)": (None, False, 1),
            "per-batch padding to a multiple of 64 (ours, default on CUDA)": (None, False, 64),
            "per-batch padding + --group_by_length": (None, True, 1),
        }
        for name, (pad_to, grouped, multiple) in setups.items():
            runs = [
                train_once(model_path, dataset, tokenizer, pad_to, args.batch_size, grouped, multiple, args.max_length)
                for _ in range(args.repeats)
            ]
            results[name] = min(runs)

    print("\n| collation | seconds | tokens in batches | real share | batch shapes | real tokens/s | ratio |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    baseline = real_tokens / results["pad to model_max_length"][0]
    for name, (seconds, tokens, shapes) in results.items():
        speed = real_tokens / seconds
        print(
            f"| {name} | {seconds:.2f} | {tokens:,} | {real_tokens / tokens:.0%} | {shapes} | {speed:,.0f} | "
            f"{speed / baseline:.2f}x |"
        )


if __name__ == "__main__":
    main()
