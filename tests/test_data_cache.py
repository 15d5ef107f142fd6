"""The cache of prepared data (sft.data.arrow_files, sft.data.housekeeping, `python -m sft.data.cache`): keyed on the
data's content, so a rewritten file is never served from an older read; partial files of interrupted reads removed;
listed with sizes and last use, and cleaned on request."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import datasets
import pytest

from sft.data import read_data


def chat(k: int) -> dict:
    return {"messages": [{"role": "user", "content": f"question {k}"}, {"role": "assistant", "content": f"answer {k}"}]}


def write(path: Path, answers: list[int]) -> None:
    if path.suffix == ".parquet":
        datasets.Dataset.from_list([chat(k) for k in answers]).to_parquet(path)
    else:
        path.write_text("".join(json.dumps(chat(k)) + "\n" for k in answers))


@pytest.mark.parametrize("name", ["d.jsonl", "d.parquet"])
def test_a_file_rewritten_with_its_size_and_time_restored_is_read_again(tmp_path, name):
    # Issue 29, item 3: `cp -p`, `rsync -t`: same size, old modification time, new content. (Parquet is read through
    # `datasets`, whose own cache knows a local file by its modification time.)
    data = tmp_path / name
    write(data, [1, 2])
    first = read_data(str(data), cache_dir=tmp_path)
    stat = data.stat()
    write(data, [3, 4])
    os.utime(data, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert data.stat().st_size == stat.st_size and data.stat().st_mtime_ns == stat.st_mtime_ns
    again = read_data(str(data), cache_dir=tmp_path)
    assert [json.loads(m)[-1]["content"] for m in again["messages"]] == ["answer 3", "answer 4"]
    assert again._fingerprint != first._fingerprint  # what the tokenised cache is keyed on
    write(data, [1, 2])  # the first content again: its read is found again
    assert read_data(str(data), cache_dir=tmp_path).cache_files == first.cache_files


def test_a_reread_source_keeps_its_fingerprint_so_the_tokenised_cache_is_found_again(tmp_path):
    # Marking a cache file used must not change its modification time: `datasets` fingerprints a memory-mapped
    # file by it, and the tokenised and packed caches (and dpo.py's precomputed reference) are keyed by that.
    data = tmp_path / "d.jsonl"
    write(data, [1, 2])
    first = read_data(str(data), cache_dir=tmp_path)
    (read_file,) = {Path(f["filename"]) for f in first.cache_files}
    written = read_file.stat().st_mtime_ns
    time.sleep(0.05)
    again = read_data(str(data), cache_dir=tmp_path)
    assert again._fingerprint == first._fingerprint
    assert read_file.stat().st_mtime_ns == written
    assert read_file.stat().st_atime_ns > written  # its last use, as the listing shows it


def _dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_partial_files_of_interrupted_reads_are_removed_on_the_next_start(tmp_path, caplog):
    # Issue 29, item 11: a read stopped by SIGTERM leaves its `.partial` file; the next run removes it, unless the
    # process writing it still runs (and is not a day old).
    folder = tmp_path / "llm_finetuning"
    folder.mkdir()
    dead = folder / f"read-0123456789abcdef01234567.arrow.{_dead_pid()}.partial"
    running = folder / f"read-76543210fedcba9876543210.arrow.{os.getppid()}.partial"
    old = folder / f"read-aaaaaaaaaaaaaaaaaaaaaaaa.arrow.{os.getppid()}.partial"
    for path in (dead, running, old):
        path.write_bytes(b"half")
    os.utime(old, (time.time() - 3 * 86400, time.time() - 3 * 86400))
    write(tmp_path / "d.jsonl", [1])
    with caplog.at_level("INFO", logger="sft.data"):
        read_data(str(tmp_path / "d.jsonl"), cache_dir=tmp_path)
    assert not dead.exists() and not old.exists() and running.exists()
    assert "Removed 2 partial files" in caplog.text
    assert "The prepared-data cache" in caplog.text and "python -m sft.data.cache" in caplog.text  # its size logged


def _cache_command(*args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "sft.data.cache", *args]
    return subprocess.run(command, capture_output=True, text=True, cwd=Path(__file__).parent.parent)


def test_the_cache_command_lists_and_removes_what_is_named_or_past_a_bound(tmp_path):
    folder = tmp_path / "llm_finetuning"
    folder.mkdir()
    (folder / "read-a.arrow").write_bytes(b"x" * 3000)
    (folder / "tokenized-b.arrow").write_bytes(b"x" * 10)
    (folder / "packed-c.arrow").write_bytes(b"x" * 20)
    os.utime(folder / "packed-c.arrow", (time.time() - 40 * 86400, time.time() - 40 * 86400))
    listed = _cache_command("--cache_dir", str(tmp_path))
    assert listed.returncode == 0, listed.stderr
    assert f"{folder}: 3.0 KiB in 3 files" in listed.stdout and "RuntimeWarning" not in listed.stderr
    lines = listed.stdout.splitlines()[1:]
    assert [line.split()[-1] for line in lines][-1] == "packed-c.arrow"  # the least recently used last
    assert all("last used" in line for line in lines)

    removed = _cache_command("--cache_dir", str(tmp_path), "--older_than", "30d")
    assert removed.returncode == 0 and "removed packed-c.arrow" in removed.stdout
    assert sorted(p.name for p in folder.iterdir()) == ["read-a.arrow", "tokenized-b.arrow"]
    _cache_command("--cache_dir", str(tmp_path), "--larger_than", "1K")
    assert [p.name for p in folder.iterdir()] == ["tokenized-b.arrow"]
    _cache_command("--cache_dir", str(tmp_path), "--remove", "tokenized-*")
    assert list(folder.iterdir()) == []
    missing = _cache_command("--cache_dir", str(tmp_path), "--remove", "nothing.arrow")
    assert missing.returncode == 2 and missing.stderr.strip().splitlines() == [
        f"error: --remove: no file 'nothing.arrow' in {folder}"
    ]
