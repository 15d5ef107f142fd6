"""The cache folder of prepared data (read, tokenised, packed Arrow files): where it is, what it holds, and cleaning
it. `python -m sft.data.cache` lists it (size, last use) and removes what is named or past a bound.

A run marks each cache file it uses (its access time is set to now; its modification time is kept, since `datasets`
fingerprints a memory-mapped file by it and the tokenised and packed caches are keyed by that fingerprint), so "last
use" is the last run that read it; it removes the partial files of reads that an interrupted run left
(`*.<pid>.partial` whose process is gone, or any a day old) and logs the folder's size.
"""

from __future__ import annotations

import argparse
import fnmatch
import logging
import os
import re
import sys
import time
from pathlib import Path

from sft.errors import ConfigurationError, UserError

logger = logging.getLogger("sft.data")

PARTIAL_NAME = re.compile(r"\.(?P<pid>\d+)\.partial$")
STALE_SECONDS = 24 * 3600  # a partial (or datasets' tmp) file this old is left over, whichever process wrote it
UNITS = {"": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}


def cache_folder(cache_dir: str | os.PathLike | None) -> Path:
    """Where prepared data goes (read, tokenised, packed): `llm_finetuning` in `cache_dir`, by default in the
    datasets cache; created."""
    import datasets

    folder = Path(cache_dir or datasets.config.HF_DATASETS_CACHE) / "llm_finetuning"
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        flag = "--preprocessing_cache_dir" if cache_dir else "the datasets cache (HF_DATASETS_CACHE)"
        raise ConfigurationError(f"{flag}: cannot create {folder} for the prepared data ({error})") from None
    return folder


def mark_used(path: str | os.PathLike) -> None:
    """Sets a cache file's access time to now: its last use, as the listing shows it (`last_use`). The modification
    time stays: `datasets` fingerprints the file by it, and the caches made from the file are keyed by that."""
    try:
        os.utime(path, ns=(time.time_ns(), os.stat(path).st_mtime_ns))
    except OSError:  # a read-only cache is still usable
        pass


def last_use(stat: os.stat_result) -> float:
    """When a cache file was last read or written (`mark_used` sets the access time)."""
    return max(stat.st_atime, stat.st_mtime)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def remove_stale_partials(folder: Path) -> list[Path]:
    """Removes the partial files of interrupted reads (`*.<pid>.partial` whose process is gone, or a day old) and
    datasets' left-over `tmp*` files (a day old); returns them."""
    removed = []
    now = time.time()
    for path in folder.iterdir():
        match = PARTIAL_NAME.search(path.name)
        if not (match or path.name.startswith("tmp")) or not path.is_file():
            continue
        try:
            old = now - path.stat().st_mtime > STALE_SECONDS
            if old or (match and int(match["pid"]) != os.getpid() and not _process_alive(int(match["pid"]))):
                path.unlink()
                removed.append(path)
        except FileNotFoundError:  # removed by another process meanwhile
            continue
    if removed:
        logger.info("Removed %d partial files of interrupted reads from %s", len(removed), folder)
    return removed


def cache_files(folder: Path) -> list[tuple[Path, os.stat_result]]:
    return [(path, path.stat()) for path in sorted(folder.iterdir()) if path.is_file()]


def human_size(size: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024:
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TiB"


def log_cache_size(folder: Path) -> None:
    files = cache_files(folder)
    logger.info(
        "The prepared-data cache %s holds %s in %d file%s (python -m sft.data.cache lists and cleans it)",
        folder,
        human_size(sum(stat.st_size for _, stat in files)),
        len(files),
        "" if len(files) == 1 else "s",
    )


def parse_size(text: str) -> int:
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)i?b?\s*", text.lower())
    if not match:
        raise ConfigurationError(f"--larger_than: expected a size such as 500M or 2G, got {text!r}")
    return int(float(match[1]) * UNITS[match[2]])


def parse_age(text: str) -> float:
    """Seconds of an age such as 30d, 12h, 90m (days by default)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([dhm]?)\s*", text.lower())
    if not match:
        raise ConfigurationError(f"--older_than: expected an age such as 30d, 12h or 90m, got {text!r}")
    return float(match[1]) * {"": 86400, "d": 86400, "h": 3600, "m": 60}[match[2]]


def select(folder: Path, names: list[str], older_than: float | None, larger_than: int | None) -> list[Path]:
    """The cache files named (file names, or patterns such as 'tokenized-*'), unused for `older_than` seconds or
    larger than `larger_than` bytes. A name that matches no file is an error."""
    files = cache_files(folder)
    chosen = set()
    for name in names:
        matches = {path for path, _ in files if fnmatch.fnmatch(path.name, Path(name).name)}
        if not matches:
            raise ConfigurationError(f"--remove: no file {name!r} in {folder}")
        chosen |= matches
    now = time.time()
    for path, stat in files:
        if older_than is not None and now - last_use(stat) > older_than:
            chosen.add(path)
        if larger_than is not None and stat.st_size > larger_than:
            chosen.add(path)
    return sorted(chosen)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m sft.data.cache",
        description="List the cache of prepared data (read, tokenised, packed) or remove files from it.",
    )
    parser.add_argument("--cache_dir", help="as finetune.py's --preprocessing_cache_dir (default: datasets cache)")
    parser.add_argument("--remove", nargs="+", default=[], metavar="NAME", help="files to remove (names, patterns)")
    parser.add_argument("--older_than", help="remove files unused for this long (30d, 12h, 90m)")
    parser.add_argument("--larger_than", help="remove files larger than this (500M, 2G)")
    args = parser.parse_args(argv)
    try:
        folder = cache_folder(args.cache_dir)
        older = parse_age(args.older_than) if args.older_than else None
        larger = parse_size(args.larger_than) if args.larger_than else None
        remove_stale_partials(folder)
        if args.remove or older is not None or larger is not None:
            chosen = select(folder, args.remove, older, larger)
            freed = 0
            for path in chosen:
                freed += path.stat().st_size
                path.unlink()
                print(f"removed {path.name}")
            print(f"{len(chosen)} files removed, {human_size(freed)} freed from {folder}")
            return 0
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    files = cache_files(folder)
    print(f"{folder}: {human_size(sum(stat.st_size for _, stat in files))} in {len(files)} files")
    for path, stat in sorted(files, key=lambda item: last_use(item[1]), reverse=True):
        used = time.strftime("%Y-%m-%d %H:%M", time.localtime(last_use(stat)))
        print(f"  {human_size(stat.st_size):>10}  last used {used}  {path.name}")
    return 0
