"""bench.bench_data_scale's own parts: the streamed data, the process-tree sampler, the table's arithmetic."""

from __future__ import annotations

import json
import sys

from bench.bench_data_scale import Run, growth_verdicts, measure, table, write_conversations
from bench.common import generate_conversations

MIB = 2**20


def test_conversations_are_written_as_messages_jsonl(tmp_path):
    path = write_conversations(tmp_path / "data.jsonl", 30, seed=1)
    lines = path.read_text(encoding="utf-8").splitlines()
    assert [json.loads(line) for line in lines] == [{"messages": m} for m in generate_conversations(30, seed=1)]


def test_a_forked_child_counts_its_own_memory_once_and_a_failure_is_marked(tmp_path):
    # The parent writes 200 MiB, forks a child that writes 100 MiB of its own, waits for it, exits 3. Summed RssAnon
    # would count the shared 200 MiB twice (500 MiB); the tree's anonymous memory is 300 MiB (plus the interpreters).
    script = (
        "import os, sys, time\n"
        f"kept = b'a' * {200 * MIB}\n"
        "child = os.fork()\n"
        "if child == 0:\n"
        f"    own = b'b' * {100 * MIB}\n"
        "    time.sleep(1.5)\n"
        "    os._exit(0)\n"
        "os.waitpid(child, 0)\n"
        "sys.exit(3)\n"
    )
    run = measure(Run("ours", 1, 1, False), [sys.executable, "-c", script], {}, tmp_path)
    assert run.failed
    assert 300 * MIB < run.peak_anon < 400 * MIB
    assert run.peak_rss >= run.peak_anon
    assert run.peak_process > 200 * MIB  # the kernel saw the largest process hold at least the parent's 200 MiB


def test_table_ratios_and_growth_verdicts():
    def run(tool, samples, seconds, gib, packing=False, failed=False):
        return Run(tool, samples, 1, packing, seconds, int(gib * 2**30), int(gib * 2**29), int(gib * 2**30), failed)

    runs = [
        run("ours", 1_000, 10, 1.0),
        run("trl", 1_000, 10, 2.0),
        run("ours", 11_000, 20, 1.1),  # 10,000 samples in 10 s more than the baseline
        run("trl", 11_000, 30, 4.0),  # in 20 s more
        run("ours", 21_000, 0, 0, failed=True),
    ]
    lines = table(runs, reference_samples=11_000)
    assert lines[2:] == [
        "| 1,000 | 1 | no | ours | 1.00 | 0.50 | 1.00 | 0.91x | - | - | 0.50x |",
        "| 1,000 | 1 | no | trl | 2.00 | 1.00 | 2.00 | 0.50x | - | - | - |",
        "| 11,000 | 1 | no | ours | 1.10 | 0.55 | 1.10 | 1.00x | 1,000 | 2.00x | 0.27x |",
        "| 11,000 | 1 | no | trl | 4.00 | 2.00 | 4.00 | 1.00x | 500 | - | - |",
        "| 21,000 | 1 | no | ours | failed | failed | failed | - | - | - | - |",
    ]

    growth = [run("ours", 20_000, 10, 1.0), run("ours", 160_000, 20, 1.2), run("ours", 20_000, 10, 1.0, True)]
    growth.append(run("ours", 160_000, 20, 1.3, True))
    assert growth_verdicts(growth) == [
        "packing no: peak RSS 160,000 / 20,000 samples = 1.20x (within 1.25x); sampled RSS 1.20x, anonymous 1.20x",
        "packing yes: peak RSS 160,000 / 20,000 samples = 1.30x (EXCEEDS 1.25x); sampled RSS 1.30x, anonymous 1.30x",
    ]
