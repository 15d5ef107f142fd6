"""Host memory against data size: peak resident memory of a whole `finetune.py` run (LoRA, --max_steps 1, one
process) on N generated alpaca-like samples, for each N given, with the ratio to the smallest N of the same run.

A run whose data handling is bounded grows little from 20,000 to 160,000 samples; one that holds every sample as
Python objects grows by a few KiB per sample. Each run is its own process (peak memory is its own) on a tiny model
built once, so the model's share is small and the data's shows. The tokenised data is cached by content: every
run uses a fresh cache folder, so each one prepares its data.

    python -m bench.bench_data_scale                               # 20k and 160k samples
    python -m bench.bench_data_scale --samples 20000 160000 --packing

Not yet here (see the README): trl's dataset preparation on the same data, two processes, 1M/10M samples.
"""

from __future__ import annotations

import sft.quiet

if __name__ == "__main__":
    sft.quiet.setup()  # first: it silences known chatter of the libraries imported below

# isort: split
import argparse
import json
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import WORDS, lognormal_length


def write_alpaca(path: Path, count: int, seed: int = 0) -> None:
    """Alpaca-like samples (instruction, optional input, output) of realistic short lengths, as JSONL."""
    rng = random.Random(seed)
    with path.open("w", encoding="utf-8") as out:
        for _ in range(count):
            words = max(6, int(lognormal_length(rng, low=20, high=1000, median=120) / 1.6))
            prompt = max(2, words // 4)
            sample = {
                "instruction": " ".join(rng.choices(WORDS, k=prompt)),
                "input": " ".join(rng.choices(WORDS, k=rng.choice((0, 0, prompt)))),
                "output": " ".join(rng.choices(WORDS, k=words - prompt)),
            }
            out.write(json.dumps(sample, ensure_ascii=False) + "\n")


def peak_rss_of_run(model: Path, data: Path, work: Path, packing: bool) -> tuple[float, float]:
    """(peak resident memory in GiB, seconds) of one finetune.py run in a fresh process."""
    command = [
        sys.executable,
        "finetune.py",
        *("--model_name_or_path", str(model), "--data_path", str(data), "--output_dir", str(work / "out")),
        *("--use_lora", "--max_steps", "1", "--per_device_train_batch_size", "2", "--model_max_length", "512"),
        *("--save_strategy", "no", "--report_to", "none", "--lora_r", "8", "--dataloader_pin_memory", "false"),
        *("--preprocessing_cache_dir", str(work / "cache"), "--start_over"),
        *(("--packing",) if packing else ()),
    ]
    start = time.perf_counter()
    # A fresh interpreter per run, and the peak of that child alone: RUSAGE_CHILDREN keeps the largest child.
    script = (
        "import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True, stdout=subprocess.DEVNULL, "
        "stderr=subprocess.DEVNULL); print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)"
    )
    done = subprocess.run([sys.executable, "-c", script, *command], capture_output=True, text=True, check=True)
    seconds = time.perf_counter() - start
    return int(done.stdout.split()[-1]) / 2**20, seconds  # ru_maxrss is in KiB on Linux


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, nargs="+", default=[20000, 160000])
    parser.add_argument("--packing", action="store_true", help="also measure each size with --packing")
    args = parser.parse_args()

    from scripts.make_tiny_model import build_tiny_model

    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        model = build_tiny_model(folder / "model", hidden_size=64, pretrain_steps=0)
        rows = []
        for packing in (False, True) if args.packing else (False,):
            baseline = None
            for count in sorted(args.samples):
                data = folder / f"alpaca-{count}.jsonl"
                if not data.exists():
                    write_alpaca(data, count)
                work = Path(tempfile.mkdtemp(dir=folder))
                peak, seconds = peak_rss_of_run(model, data, work, packing)
                baseline = baseline or peak
                rows.append((count, packing, peak, peak / baseline, seconds))
                print(f"{count} samples, packing={packing}: peak {peak:.2f} GiB ({seconds:.0f} s)", flush=True)
    print()
    print("| samples | packing | peak RSS (GiB) | vs smallest | run (s) |")
    print("|---|---|---|---|---|")
    for count, packing, peak, ratio, seconds in rows:
        print(f"| {count:,} | {'yes' if packing else 'no'} | {peak:.2f} | {ratio:.2f}x | {seconds:.0f} |")


if __name__ == "__main__":
    main()
