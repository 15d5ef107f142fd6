"""Preprocessing speed: our tokenisation (batched template rendering and encoding, datasets.map over all cores,
cached) against the official Qwen-1 `preprocess` (per-turn tokenizer calls, one process, padded to max_len).

Both tokenise the same generated multi-turn conversations (long-tailed lengths, 20..2000 tokens) with the same
tiny tokenizer and label the assistant turns.

    python bench/bench_preprocess.py                       # 20k conversations, a few minutes on 2 cores
    python bench/bench_preprocess.py --conversations 2000  # quicker
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import datasets  # noqa: E402

from bench.common import generate_conversations  # noqa: E402
from bench.qwen1_preprocess import preprocess  # noqa: E402
from scripts.make_tiny_model import generate_text, train_tokenizer  # noqa: E402
from sft.data import tokenize_conversations  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--conversations", type=int, default=20000)
    parser.add_argument("--max_length", type=int, default=2048)
    parser.add_argument("--num_proc", type=int, default=os.cpu_count(), help="processes for ours (datasets.map)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    datasets.disable_progress_bars()

    import random

    tokenizer = train_tokenizer(generate_text(random.Random(0), 4000), vocab_size=1024)
    conversations = generate_conversations(args.conversations, seed=args.seed)
    print(
        f"{len(conversations)} conversations, {sum(len(c) for c in conversations)} messages; "
        f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}",
        flush=True,
    )
    cache_dir = Path(tempfile.mkdtemp(prefix="bench-preprocess-"))

    rows = []
    start = time.perf_counter()
    baseline = preprocess(conversations, tokenizer, args.max_length)
    rows.append(("Qwen-1 preprocess (per turn, 1 process)", time.perf_counter() - start))
    print(f"  {rows[-1][0]}: {rows[-1][1]:.1f} s", flush=True)
    start = time.perf_counter()
    ours, _ = tokenize_conversations(conversations, tokenizer, args.max_length, num_proc=1, cache_dir=cache_dir / "one")
    rows.append(("ours, 1 process", time.perf_counter() - start))
    print(f"  {rows[-1][0]}: {rows[-1][1]:.1f} s", flush=True)
    start = time.perf_counter()
    ours, _ = tokenize_conversations(
        conversations, tokenizer, args.max_length, num_proc=args.num_proc, cache_dir=cache_dir / "many"
    )
    rows.append((f"ours, {args.num_proc} processes", time.perf_counter() - start))
    start = time.perf_counter()
    tokenize_conversations(
        conversations, tokenizer, args.max_length, num_proc=args.num_proc, cache_dir=cache_dir / "many"
    )
    rows.append(("ours, rerun (cached)", time.perf_counter() - start))

    real_tokens = sum(ours["length"])
    baseline_tokens = int(baseline["attention_mask"].sum())
    print(f"tokens: ours {real_tokens} (kept samples {len(ours)}), baseline {baseline_tokens} non-pad")
    print()
    print("| preprocessing | seconds | samples/s | x baseline |")
    print("|---|---:|---:|---:|")
    for name, seconds in rows:
        print(f"| {name} | {seconds:.1f} | {len(conversations) / seconds:.0f} | {rows[0][1] / seconds:.2f}x |")
    ratio = rows[0][1] / rows[2][1]
    print(
        f"ours ({args.num_proc} processes, uncached) vs baseline: {ratio:.2f}x (target >= 5x: "
        f"{'meets' if ratio >= 5 else 'MISSES'})"
    )
    print(f"load average at the end: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
