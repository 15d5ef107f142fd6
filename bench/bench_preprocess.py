"""Preprocessing speed: our tokenisation (one marked template render per conversation, batched encoding,
datasets.map over all cores, cached) against the official Qwen-1 `preprocess` (per-turn tokenizer calls, one
process, padded to max_len).

Both tokenise the same generated multi-turn conversations (long-tailed lengths, 20..2000 tokens) with the same
tiny tokenizer and label the assistant turns. Each method runs in a fresh process (same starting state, nothing
left over from the one before), the methods take turns, and the table gives the median of `--repeats` runs:
this machine's speed drifts by 20% from minute to minute, so one run of each, one after the other, is not a
fair comparison.

    python -m bench.bench_preprocess                       # 20k conversations, about 5 minutes on 2 cores
    python -m bench.bench_preprocess --conversations 2000  # quicker
"""

from __future__ import annotations

import sft.quiet

if __name__ == "__main__":
    sft.quiet.setup()  # first: it silences known chatter of the libraries imported below

# isort: split
import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import datasets

from bench.common import generate_conversations
from bench.qwen1_preprocess import preprocess
from scripts.make_tiny_model import generate_text, train_tokenizer
from sft.data import tokenize_conversations


def time_one(method: str, work_dir: Path, max_length: int, num_proc: int) -> float:
    """Seconds `method` takes on the saved conversations, in this process (called in a fresh one)."""
    from transformers import AutoTokenizer

    datasets.disable_progress_bars()
    tokenizer = AutoTokenizer.from_pretrained(work_dir / "tokenizer")
    conversations = json.loads((work_dir / "conversations.json").read_text())
    cache_dir = Path(tempfile.mkdtemp(dir=work_dir))
    if method == "cached":  # the timed run reads what the untimed one wrote
        tokenize_conversations(conversations, tokenizer, max_length, num_proc=num_proc, cache_dir=cache_dir)
    start = time.perf_counter()
    if method == "baseline":
        preprocess(conversations, tokenizer, max_length)
    else:
        tokenize_conversations(conversations, tokenizer, max_length, num_proc=num_proc, cache_dir=cache_dir)
    return time.perf_counter() - start


def stage_cpu_seconds(work_dir: Path, max_length: int) -> dict[str, float]:
    """CPU seconds of each stage of our tokenisation, in one process: where the time goes."""
    from transformers import AutoTokenizer

    from sft.data import label_spans_many, labels_of_encoding, render_many

    tokenizer = AutoTokenizer.from_pretrained(work_dir / "tokenizer")
    conversations = json.loads((work_dir / "conversations.json").read_text())
    stages = {}
    start = time.process_time()
    render_many(tokenizer, conversations)
    stages["render the conversations (apply_chat_template)"] = time.process_time() - start
    start = time.process_time()
    rendered = label_spans_many(tokenizer, conversations)
    stages["find the answers (second, marked render)"] = time.process_time() - start - stages[next(iter(stages))]
    start = time.process_time()
    encodings = tokenizer.backend_tokenizer.encode_batch([text for text, _ in rendered], add_special_tokens=False)
    stages["encode (Rust tokenizer, whole texts)"] = time.process_time() - start
    start = time.process_time()
    for encoding, (_, spans) in zip(encodings, rendered):
        labels_of_encoding(encoding, encoding.ids, spans)
    stages["labels from the tokens at answer edges"] = time.process_time() - start
    return stages


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--conversations", type=int, default=20000)
    parser.add_argument("--max_length", type=int, default=2048)
    parser.add_argument("--num_proc", type=int, default=os.cpu_count(), help="processes for ours (datasets.map)")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each method; the table shows the median")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--time_one", nargs=2, metavar=("METHOD", "WORK_DIR"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.time_one:
        method, work_dir = args.time_one
        print(json.dumps(time_one(method, Path(work_dir), args.max_length, args.num_proc)))
        return

    work_dir = Path(tempfile.mkdtemp(prefix="bench-preprocess-"))
    train_tokenizer(generate_text(random.Random(0), 4000), vocab_size=1024).save_pretrained(work_dir / "tokenizer")
    conversations = generate_conversations(args.conversations, seed=args.seed)
    (work_dir / "conversations.json").write_text(json.dumps(conversations, ensure_ascii=False))
    print(
        f"{len(conversations)} conversations, {sum(len(c) for c in conversations)} messages; "
        f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}; median of {args.repeats} runs each",
        flush=True,
    )

    methods = {
        "baseline": ("Qwen-1 preprocess (per turn, 1 process)", 1),
        "ours_one": ("ours, 1 process", 1),
        "ours_many": (f"ours, {args.num_proc} processes", args.num_proc),
        "cached": (f"ours, rerun (cached), {args.num_proc} processes", args.num_proc),
    }
    seconds: dict[str, list[float]] = {method: [] for method in methods}
    for repeat in range(args.repeats):
        for method, (name, num_proc) in methods.items():
            command = [sys.executable, "-m", "bench.bench_preprocess", "--time_one", method, str(work_dir)]
            command += ["--max_length", str(args.max_length), "--num_proc", str(num_proc)]
            result = subprocess.run(command, capture_output=True, text=True, cwd=Path(__file__).parent.parent)
            if result.returncode:
                sys.exit(f"{name} failed:\n{result.stderr[-3000:]}")
            seconds[method].append(float(result.stdout.strip().splitlines()[-1]))
            print(f"  run {repeat + 1}: {name}: {seconds[method][-1]:.2f} s", flush=True)

    baseline = statistics.median(seconds["baseline"])
    print()
    print("| preprocessing | seconds (median) | samples/s | x baseline | x baseline, each run |")
    print("|---|---:|---:|---:|---|")
    for method, (name, _) in methods.items():
        median = statistics.median(seconds[method])
        each = ", ".join(f"{b / s:.2f}" for b, s in zip(seconds["baseline"], seconds[method]))
        print(f"| {name} | {median:.2f} | {len(conversations) / median:.0f} | {baseline / median:.2f}x | {each} |")
    ratio = baseline / statistics.median(seconds["ours_many"])
    print(
        f"ours ({args.num_proc} processes, uncached) vs baseline: {ratio:.2f}x (target >= 5x: "
        f"{'meets' if ratio >= 5 else 'MISSES'})"
    )
    print()
    stages = stage_cpu_seconds(work_dir, args.max_length)
    print("| stage of ours (one process, CPU seconds) | seconds |")
    print("|---|---:|")
    for stage, cpu_seconds in stages.items():
        print(f"| {stage} | {cpu_seconds:.2f} |")
    encode = stages["encode (Rust tokenizer, whole texts)"]
    print(
        f"The encoding alone, spread perfectly over {os.cpu_count()} cores, takes {encode / os.cpu_count():.2f} s: "
        f"no method that encodes the whole text can beat {baseline * os.cpu_count() / encode:.1f}x the baseline here."
    )
    print(f"load average at the end: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
