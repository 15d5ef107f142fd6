"""Stage 1 of the data pipeline, for training: every source's checked samples written once to a memory-mapped Arrow
file in the cache folder, one batch at a time, and found again by a key of the source's content and the options.

The key is each file's content (`sft.data.files.content_key`, the hash the run identity computes too), or a hub
dataset's fingerprint in the datasets cache: a file rewritten with its old size and time restored is read again,
never served from an older read. A read is written to `<key>.arrow.<pid>.partial` and renamed when whole; the
partial files an interrupted run leaves are removed by the next (`sft.data.housekeeping`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

import pyarrow as pa

from sft.data.files import content_key
from sft.data.folders import local_files
from sft.data.housekeeping import cache_folder, log_cache_size, mark_used, remove_stale_partials
from sft.data.rows import Parse, Problems, Row, checked_rows, conversation_sample, hub_dataset, resample
from sft.data.sources import Source, parse_sources

if TYPE_CHECKING:
    import datasets

logger = logging.getLogger("sft.data")

# Part of every read cache key: raised when what reading writes changes (2: keyed on file content).
READ_FORMAT = 2
WRITE_BATCH = 1000  # samples per Arrow record batch: the samples reading holds in memory at a time
READ_SCHEMA = pa.schema([(name, pa.string()) for name in ("messages", "file", "place", "format")])


def _source_state(source: Source) -> tuple[str, list[Path] | None, datasets.Dataset | None]:
    """(what a source's samples depend on, found without reading them; its files; the dataset opened for that):
    its files' content keys, or a hub dataset's fingerprint in the datasets cache."""
    files = local_files(source)
    if files is None:
        hub = hub_dataset(source)
        return hub._fingerprint, None, hub
    return json.dumps([content_key(file) for file in files]), files, None


def _read_source(
    source: Source,
    default_system: str | None,
    max_samples: int | None,
    cache_dir: Path,
    problems: Problems,
    parse: Parse = conversation_sample,
) -> datasets.Dataset | None:
    """One source's checked samples as a memory-mapped Arrow file (columns messages (JSON), file, place, format),
    written once and found again by a key of the source's content and the options; None when it has problems."""
    import datasets

    state, files, hub = _source_state(source)
    options = (READ_FORMAT, asdict(source), state, default_system, max_samples)
    if parse is not conversation_sample:  # SFT's keys stay as they were
        options += (f"{parse.__module__}.{parse.__qualname__}",)
    key = hashlib.sha256(json.dumps(options, sort_keys=True, default=str).encode()).hexdigest()[:24]
    path = cache_dir / f"read-{key}.arrow"
    if path.is_file():
        mark_used(path)
        dataset = datasets.Dataset.from_file(str(path))
        logger.info("%s: %d samples, read before (%s)", source.path, len(dataset), path)
        return dataset
    logger.info("Reading and checking %s into %s", source.path, path)
    partial = path.with_name(f"{path.name}.{os.getpid()}.partial")
    try:
        with pa.OSFile(str(partial), "wb") as sink, pa.ipc.new_stream(sink, READ_SCHEMA) as writer:
            batch: list[Row] = []
            for row in checked_rows(source, default_system, max_samples, problems, files, hub, parse):
                batch.append(row)
                if len(batch) == WRITE_BATCH:
                    writer.write_batch(_record_batch(batch))
                    batch = []
            if batch:
                writer.write_batch(_record_batch(batch))
        if problems.errors:
            return None
        os.replace(partial, path)  # whole or not at all: a stopped run leaves no half file under the key
    finally:
        partial.unlink(missing_ok=True)
    return datasets.Dataset.from_file(str(path))


def _record_batch(rows: list[Row]) -> pa.RecordBatch:
    files, places, messages, formats = zip(*rows)
    columns = [[json.dumps(m, ensure_ascii=False) for m in messages], files, places, formats]
    return pa.RecordBatch.from_arrays([pa.array(column, pa.string()) for column in columns], schema=READ_SCHEMA)


def read_sources(
    data_path: str | list[str],
    default_system: str | None = None,
    max_samples: int | None = None,
    cache_dir: str | os.PathLike | None = None,
    parse: Parse = conversation_sample,
) -> list[tuple[Source, datasets.Dataset]]:
    """Each source `data_path` names with its checked samples, memory-mapped, before any resampling (`read_data`).
    Raises a DataError naming every problem found (up to `MAX_REPORTED`)."""
    cache_dir = cache_folder(cache_dir)
    remove_stale_partials(cache_dir)
    parts = []
    problems = Problems()
    for source in parse_sources(data_path):
        part = _read_source(source, default_system, max_samples, cache_dir, problems, parse)
        if problems.more:
            break
        if part is not None:
            parts.append((source, part))
    problems.raise_any()
    log_cache_size(cache_dir)
    return parts


def mix(parts: list[tuple[Source, datasets.Dataset]], seed: int) -> datasets.Dataset:
    """The sources' samples in order, each resampled to its `num_samples` by a seeded draw of rows."""
    import datasets

    resampled = [
        part if source.num_samples is None else part.select(resample(len(part), source.num_samples, seed + number))
        for number, (source, part) in enumerate(parts)
    ]
    return resampled[0] if len(resampled) == 1 else datasets.concatenate_datasets(resampled)


def read_data(
    data_path: str | list[str],
    default_system: str | None = None,
    max_samples: int | None = None,
    seed: int = 42,
    cache_dir: str | os.PathLike | None = None,
    parse: Parse = conversation_sample,
) -> datasets.Dataset:
    """Every sample of the sources `data_path` names, checked, as a memory-mapped Arrow data set: columns
    `messages` (the conversation as JSON), `file`, `place` ("line N", "sample N", "row N") and `format`.

    Memory holds one batch of samples at a time, whatever the data's size: each source is read as a stream and
    written to an Arrow file in `cache_dir` (default: the datasets cache), under a key of its content and the
    options, so that a rerun, or another process of the run, opens the file instead of reading the source again.
    The mix is the sources in order, each resampled to its `num_samples` by a seeded draw of rows.
    Raises a DataError naming every problem found (up to `MAX_REPORTED`)."""
    return mix(read_sources(data_path, default_system, max_samples, cache_dir, parse), seed)
