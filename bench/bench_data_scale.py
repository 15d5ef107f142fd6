"""Data preparation at scale: peak memory and samples/s of preparing N generated conversations, ours against trl.

For each N (default 100,000 and 1,000,000; `--ten_million` adds 10,000,000), one and two processes, with and
without packing, two tools on the same JSONL file of multi-turn conversations (`{"messages": [...]}`, realistic
long-tailed lengths, bench.common.iter_conversations):

- ours: a whole `finetune.py` run (tiny model, LoRA, `--max_steps 1`, `--model_max_length 1024`), as
  `python finetune.py` for one process and `python -m torch.distributed.run --nproc_per_node 2 finetune.py` for two
  (CPU, gloo). The first process of the node prepares the data while the other waits, so two processes also
  tokenise with two workers (`--preprocessing_num_workers 2`), as trl does;
- trl: `SFTTrainer(model, SFTConfig(max_length=1024, packing=..., dataset_num_proc=<processes>), train_dataset=
  load_dataset("json", ...))` in a process of its own: building the trainer loads, tokenises (and packs) the data;
  the process then exits without training.

Every run is a fresh process tree with fresh caches (its own `--preprocessing_cache_dir`, its own
HF_DATASETS_CACHE), so each one prepares its data, and runs one at a time. A sampler polls /proc every 50 ms over
the tree (torchrun's workers, datasets.map's workers) and keeps two peaks of sums over its processes:
- anonymous: the memory the processes own (Python objects, buffers), each page counted once: Pss_Anon, because
  datasets.map's workers are forks that share their parent's pages copy-on-write (RssAnon would count those once
  per worker);
- RSS: that plus the file-backed resident pages, counted in every process that maps them, as VmRSS does. Arrow
  files are memory-mapped: their pages count here, but the processes share them and the kernel drops them under
  pressure; hence both figures.
For a single process without forks the two are its VmRSS and RssAnon. Needs Linux 5.9 or later (Pss_Anon).

samples/s = (N - N0) / (wall_N - wall_N0), where N0 = 1,000 samples is a run of the same configuration in the same
run: the difference removes the fixed cost of a run (imports, model load, the one training step) and leaves the
preparation. `--check_growth` is the growth check instead: peak RSS of `finetune.py` (one process) from 20,000 to
160,000 samples, with and without packing, must grow by at most 1.25x.

    pip install -r bench/requirements.txt          # trl
    python -m bench.bench_data_scale                # 100k and 1M, 1 and 2 processes, packing on and off
    python -m bench.bench_data_scale --ten_million  # and 10M (about 12 GB of JSONL, plus each run's caches)
    python -m bench.bench_data_scale --samples 2000 5000 --processes 1 --packing no --skip_trl   # quick look
    python -m bench.bench_data_scale --check_growth

Files go to a temporary folder (TMPDIR moves it); each run's caches are deleted after the run.
"""

from __future__ import annotations

import sft.quiet

if __name__ == "__main__":
    sft.quiet.setup()  # first: it silences known chatter of the libraries imported below

# isort: split
import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from bench.common import free_port, iter_conversations

REPO = Path(__file__).resolve().parent.parent
MAX_LENGTH = 1024
BASELINE_SAMPLES = 1_000  # N0: the run whose wall time is the fixed cost subtracted from every other
TEN_MILLION = 10_000_000
GROWTH_SAMPLES = (20_000, 160_000)
GROWTH_LIMIT = 1.25
POLL_SECONDS = 0.05
GIB = 2**30


@dataclass
class Run:
    """One measured run: what it was, and its wall time and peak memory over its process tree (bytes)."""

    tool: str
    samples: int
    processes: int
    packing: bool
    seconds: float = 0.0
    peak_rss: int = 0
    peak_anon: int = 0
    peak_process: int = 0  # the kernel's high-water mark of the largest process of the tree: exact, where a sampler
    # polling every 50 ms can miss a short peak
    failed: bool = False

    @property
    def config(self) -> tuple[str, int, bool]:
        return self.tool, self.processes, self.packing


def write_conversations(path: Path, count: int, seed: int = 0) -> Path:
    """`count` generated conversations as JSONL, written as they are generated (10M do not fit in a list)."""
    with path.open("w", encoding="utf-8") as out:
        for messages in iter_conversations(count, seed=seed):
            out.write(json.dumps({"messages": messages}, ensure_ascii=False) + "\n")
    return path


def process_table() -> dict[int, tuple[int, float]]:
    """{pid: (parent pid, age in seconds)} of every process now running (Linux /proc)."""
    now = float(Path("/proc/uptime").read_text().split()[0])
    ticks = os.sysconf("SC_CLK_TCK")
    table = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry.name}/stat").read_text()
        except OSError:  # it ended meanwhile
            continue
        # The command name, in parentheses, may hold spaces: after its closing one come state, ppid (field 4), ...,
        # starttime (field 22, in clock ticks since boot).
        fields = stat[stat.rindex(")") + 2 :].split()
        table[int(entry.name)] = int(fields[1]), now - int(fields[19]) / ticks
    return table


def tree_memory(root: int) -> tuple[int, int]:
    """(resident, anonymous) bytes of `root` and all its descendants now: the sum over the processes of their
    file-backed resident pages (as VmRSS counts them: in every process that maps them) and of their proportional
    share of anonymous pages (Pss_Anon: a page that forked processes share copy-on-write counts once in all).

    Not VmRSS and RssAnon: datasets.map's workers and its manager are forks of the preparing process, and each one's
    VmRSS holds the whole parent (imports, model) that it shares, which summed several times over."""
    children: dict[int, list[int]] = {}
    young = set()
    for pid, (parent, age) in process_table().items():
        children.setdefault(parent, []).append(pid)
        # A child between vfork and exec shares its parent's very memory (counted twice, even by PSS) for a
        # millisecond; any process in its first 0.1 s holds little of its own: left out of this sample.
        if age < 0.1:
            young.add(pid)
    resident = anonymous = 0
    pending = [root]
    while pending:
        pid = pending.pop()
        pending += children.get(pid, [])
        if pid in young:
            continue
        try:
            rollup = Path(f"/proc/{pid}/smaps_rollup").read_text()
        except OSError:  # it ended meanwhile
            continue
        values = {}
        for line in rollup.splitlines()[1:]:
            name, value = line.split(":", 1)
            values[name] = int(value.split()[0]) * 1024
        if values:  # a zombie has none
            resident += values["Rss"] - values["Anonymous"] + values["Pss_Anon"]
            anonymous += values["Pss_Anon"]
    return resident, anonymous


def measure(run: Run, command: Sequence[str], env: dict[str, str], log: Path) -> Run:
    """Runs `command` to its end, sampling its process tree's memory; fills `run` (a failure prints stderr's end)."""
    started = time.perf_counter()
    with (log / "stdout").open("wb") as stdout, (log / "stderr").open("wb") as stderr:
        # Output to files, not pipes: nobody reads a pipe while the sampler polls, and a full one would block.
        child = subprocess.Popen(command, cwd=REPO, env=env, stdout=stdout, stderr=stderr, start_new_session=True)
        try:
            while True:
                # Reaped here, not by Popen: wait4 also gives the kernel's peak RSS of the child and its descendants.
                pid, status, usage = os.wait4(child.pid, os.WNOHANG)
                if pid:
                    child.returncode = os.waitstatus_to_exitcode(status)
                    run.peak_process = usage.ru_maxrss * 1024  # KiB on Linux
                    break
                sampled = time.perf_counter()
                resident, anonymous = tree_memory(child.pid)
                run.peak_rss, run.peak_anon = max(run.peak_rss, resident), max(run.peak_anon, anonymous)
                # Reading smaps_rollup walks the page tables (~10 ms a GiB): with large processes, poll less often,
                # so that the sampler takes at most a fifth of a core from the runs it measures.
                time.sleep(max(POLL_SECONDS, 4 * (time.perf_counter() - sampled)))
        finally:
            if child.poll() is None:  # interrupted: its whole tree goes too
                os.killpg(child.pid, 9)
                child.wait()
    run.seconds = time.perf_counter() - started
    if child.returncode:
        run.failed = True
        tail = (log / "stderr").read_text(errors="replace").splitlines()[-25:]
        print(f"FAILED (exit {child.returncode}): {' '.join(command[:6])} ...", *tail, sep="\n  ", flush=True)
    return run


def ours_command(model: Path, data: Path, work: Path, processes: int, packing: bool) -> list[str]:
    """A whole finetune.py run on `data`: one step of LoRA, preparing the data into a fresh cache."""
    launcher, workers = [sys.executable, "finetune.py"], []
    if processes > 1:
        torchrun = ["torch.distributed.run", "--nproc_per_node", str(processes), "--master_port", str(free_port())]
        launcher = [sys.executable, "-m", *torchrun, "finetune.py"]
        # Only the node's first process prepares the data: its datasets.map workers are the parallel part.
        workers = ["--preprocessing_num_workers", str(processes)]
    return [
        *launcher,
        *workers,
        *("--model_name_or_path", str(model), "--data_path", str(data), "--output_dir", str(work / "out")),
        *("--use_lora", "--max_steps", "1", "--per_device_train_batch_size", "2"),
        *("--model_max_length", str(MAX_LENGTH), "--save_strategy", "no", "--report_to", "none"),
        *("--preprocessing_cache_dir", str(work / "cache"), "--use_cpu", "true", "--dataloader_pin_memory", "false"),
        *(("--packing",) if packing else ()),
    ]


def trl_command(model: Path, data: Path, work: Path, processes: int, packing: bool) -> list[str]:
    """This module in a process of its own, building trl's SFTTrainer on `data` (see `trl_prepare`)."""
    job = dict(model=str(model), data=str(data), output_dir=str(work / "out"), processes=processes, packing=packing)
    return [sys.executable, "-m", "bench.bench_data_scale", "--trl_child", json.dumps(job)]


def trl_prepare(job: dict) -> None:
    """trl's preparation, in this process: SFTTrainer's constructor tokenises (and packs) the training data."""
    import datasets
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    config = SFTConfig(
        output_dir=job["output_dir"],
        max_length=MAX_LENGTH,
        packing=job["packing"],
        dataset_num_proc=job["processes"],
        report_to="none",
        bf16=False,
    )
    trainer = SFTTrainer(
        model=AutoModelForCausalLM.from_pretrained(job["model"]),
        args=config,
        train_dataset=datasets.load_dataset("json", data_files=job["data"], split="train"),
        processing_class=AutoTokenizer.from_pretrained(job["model"]),
    )
    print(f"trl prepared {len(trainer.train_dataset):,} rows", flush=True)


def run_one(run: Run, model: Path, data: Path, folder: Path) -> Run:
    """Measures one run with fresh caches in a work folder of its own, deleted afterwards."""
    work = Path(tempfile.mkdtemp(dir=folder, prefix=f"{run.tool}-"))
    # No GPU for either tool: both prepare on the CPU, and a CUDA context would add to the host memory measured.
    env = {**os.environ, "HF_DATASETS_CACHE": str(work / "hf-cache"), "CUDA_VISIBLE_DEVICES": ""}
    make_command = ours_command if run.tool == "ours" else trl_command
    try:
        measure(run, make_command(model, data, work, run.processes, run.packing), env, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    status = "FAILED" if run.failed else f"peak RSS {run.peak_rss / GIB:.2f} GiB (anonymous {run.peak_anon / GIB:.2f})"
    print(
        f"{run.tool} {run.samples:,} samples, {run.processes} process(es), packing {yes_no(run.packing)}: "
        f"{status}, {run.seconds:.0f} s",
        flush=True,
    )
    return run


def yes_no(flag: bool) -> str:
    return "yes" if flag else "no"


def samples_per_second(run: Run, baseline: Run | None) -> float | None:
    """Preparation speed: samples beyond the baseline's over the seconds beyond its (None where unknown)."""
    if baseline is None or run is baseline or run.failed or baseline.failed or run.seconds <= baseline.seconds:
        return None
    return (run.samples - baseline.samples) / (run.seconds - baseline.seconds)


def table(runs: list[Run], reference_samples: int) -> list[str]:
    """The markdown table: each run, its growth against the same configuration at `reference_samples`, and on
    ours' rows the ratio ours/trl of samples/s and of peak RSS at the same samples, processes and packing."""
    by_key = {(*run.config, run.samples): run for run in runs}
    baselines = {}  # each configuration's smallest run: the N0 of its samples/s
    for run in sorted(runs, key=lambda run: run.samples):
        baselines.setdefault(run.config, run)
    lines = [
        f"| samples | processes | packing | tool | peak RSS (GiB) | peak anonymous (GiB) | largest process (GiB) "
        f"| x {reference_samples:,} | samples/s | ours/trl samples/s | ours/trl peak RSS |",
        "|---:|---:|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for run in runs:
        speed = samples_per_second(run, baselines[run.config])
        reference = by_key.get((*run.config, reference_samples))
        growth = "-"
        if reference and not reference.failed and not run.failed:
            growth = f"{run.peak_rss / reference.peak_rss:.2f}x"
        speed_ratio = rss_ratio = "-"
        trl = by_key.get(("trl", run.processes, run.packing, run.samples))
        if run.tool == "ours" and trl and not trl.failed and not run.failed:
            trl_speed = samples_per_second(trl, baselines[trl.config])
            if speed and trl_speed:
                speed_ratio = f"{speed / trl_speed:.2f}x"
            rss_ratio = f"{run.peak_rss / trl.peak_rss:.2f}x"
        memory = "failed | failed | failed"
        if not run.failed:
            memory = f"{run.peak_rss / GIB:.2f} | {run.peak_anon / GIB:.2f} | {run.peak_process / GIB:.2f}"
        lines.append(
            f"| {run.samples:,} | {run.processes} | {yes_no(run.packing)} | {run.tool} | {memory} | {growth} | "
            f"{f'{speed:,.0f}' if speed else '-'} | {speed_ratio} | {rss_ratio} |"
        )
    return lines


def growth_verdicts(runs: list[Run]) -> list[str]:
    """The growth check: peak RSS at 160,000 samples over that at 20,000, for each packing, within 1.25x."""
    small, large = GROWTH_SAMPLES
    lines = []
    for packing in sorted({run.packing for run in runs}):
        pair = {run.samples: run for run in runs if run.packing == packing}
        if pair[small].failed or pair[large].failed:
            lines.append(f"packing {yes_no(packing)}: a run failed, no verdict")
            continue
        # The verdict is on the kernel's exact peak of the (one) process; the sampled figures are shown beside it.
        growth = pair[large].peak_process / pair[small].peak_process
        sampled = pair[large].peak_rss / pair[small].peak_rss
        anon = pair[large].peak_anon / pair[small].peak_anon
        verdict = "within" if growth <= GROWTH_LIMIT else "EXCEEDS"
        lines.append(
            f"packing {yes_no(packing)}: peak RSS {large:,} / {small:,} samples = {growth:.2f}x ({verdict} "
            f"{GROWTH_LIMIT}x); sampled RSS {sampled:.2f}x, anonymous {anon:.2f}x"
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, nargs="+", default=[100_000, 1_000_000], help="data sizes")
    parser.add_argument("--ten_million", action="store_true", help="add 10,000,000 samples")
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2], help="1: python finetune.py; 2: torchrun")
    parser.add_argument("--packing", choices=("both", "yes", "no"), default="both", help="runs with packing or not")
    parser.add_argument("--skip_trl", action="store_true", help="measure ours only")
    parser.add_argument(
        "--check_growth", action="store_true", help="the growth check: finetune.py, 20k and 160k samples"
    )
    parser.add_argument("--trl_child", help=argparse.SUPPRESS)  # the trl process's job, as JSON
    args = parser.parse_args()
    if args.trl_child:
        trl_prepare(json.loads(args.trl_child))
        return

    packings = {"both": (False, True), "yes": (True,), "no": (False,)}[args.packing]
    if args.check_growth:
        # The smaller run is the N0 of the larger one's samples/s: no extra baseline run.
        sizes, processes, tools = list(GROWTH_SAMPLES), [1], ["ours"]
    else:
        requested = set(args.samples + ([TEN_MILLION] if args.ten_million else []))
        sizes, processes = sorted(requested | {BASELINE_SAMPLES}), args.processes
        tools = ["ours"] if args.skip_trl else ["ours", "trl"]
    reference_samples = min(GROWTH_SAMPLES if args.check_growth else requested)

    from scripts.make_tiny_model import build_tiny_model

    runs = []
    with tempfile.TemporaryDirectory(prefix="bench-data-scale-") as folder:
        folder = Path(folder)
        model = build_tiny_model(folder / "model", hidden_size=64, pretrain_steps=0)
        print(f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}", flush=True)
        for samples in sizes:
            started = time.perf_counter()
            data = write_conversations(folder / f"conversations-{samples}.jsonl", samples)
            print(
                f"data: {samples:,} conversations, {data.stat().st_size / 2**20:,.0f} MiB "
                f"({time.perf_counter() - started:.0f} s to write)",
                flush=True,
            )
            for count in processes:
                for packing in packings:
                    for tool in tools:
                        runs.append(run_one(Run(tool, samples, count, packing), model, data, folder))
            data.unlink()  # the next size's file takes its place: one on disk at a time
    runs.sort(key=lambda run: (run.processes, run.packing, run.samples, run.tool))
    print()
    print("\n".join(table(runs, reference_samples)))
    if args.check_growth:
        print()
        print("\n".join(growth_verdicts(runs)))
    else:
        print(
            f"\nsamples/s: (N - {sizes[0]:,}) / (wall time at N - wall time at {sizes[0]:,}) of the same "
            f"configuration: the fixed cost of a run (imports, model, one step) cancels out"
        )
    print(f"load average at the end: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
