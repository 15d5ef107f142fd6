"""Stage 1 of the data pipeline, where the data comes from: `--data_path` as one or more sources, each read into
records with their place ("line N", "sample N", "row N"), then mixed, sampled and split.

A source is a file by its extension (.json, .jsonl, .parquet, .csv, .tsv, .arrow), a glob, a folder (a dataset
repository downloaded from the Hugging Face hub, with its data files, or a `Dataset.save_to_disk` folder), or a
hub dataset id read through `datasets` (from its local cache when offline). A data config file (YAML, or JSON
with a "sources" list) names sources with options of their own (`Source`). The mix is every source's samples, in
the order given, each source first cut to `max_samples` and then resampled to its `num_samples`.

Every record is checked by `sft.data.formats.parse_record`; up to the first `MAX_REPORTED` problems are reported
together, as one `DataError`.

Two ways out, from the same checked rows (`_checked_rows`): `read_data` writes each source to a memory-mapped Arrow
file, one batch at a time, and is what training uses, whatever the data's size; `load_data` keeps the conversations
in Python lists, for the few samples of a self-check or a calibration set.
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
import random
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import pyarrow as pa

from sft.data.formats import parse_record, record_format, with_default_system
from sft.data.reading import Conversations, DataError, iter_records, read_records
from sft.errors import ConfigurationError

if TYPE_CHECKING:
    import datasets

logger = logging.getLogger("sft.data")

# The file types `datasets` reads, by extension (.json and .jsonl are read by `read_records`, which names lines).
FILE_BUILDERS = {".parquet": "parquet", ".csv": "csv", ".tsv": "csv", ".arrow": "arrow"}
JSON_EXTENSIONS = (".json", ".jsonl")
CONFIG_EXTENSIONS = (".yaml", ".yml")
MAX_REPORTED = 20


@dataclass
class Source:
    """One source of a data mix, as a data config file lists it."""

    path: str  # a file, glob, folder or hub dataset id
    split: str = "train"  # of a folder or hub dataset
    subset: str | None = None  # a hub dataset's configuration ("name" in datasets.load_dataset)
    columns: dict[str, str] = field(default_factory=dict)  # the source's column name -> ours
    num_samples: int | None = None  # samples to take: fewer drawn without repeats, more with whole repeats
    system_prompt: str | None = None  # for samples of this source with no system message


class DataErrors(DataError):
    """Several problems in the data, reported together (the first `MAX_REPORTED`); a DataError naming the first."""

    def __init__(self, errors: list[DataError], more: bool):
        first = errors[0]
        self.errors = errors
        Exception.__init__(
            self,
            f"{len(errors)}{'+' if more else ''} problems in the data"
            + (f" (the first {MAX_REPORTED} shown)" if more else "")
            + ": "
            + "; ".join(f"({n}) {error}" for n, error in enumerate(errors, start=1)),
        )
        self.path, self.where, self.field = first.path, first.where, first.field


def _source_from_dict(entry: Any, config: Path, index: int) -> Source:
    where = f"sources[{index}]"
    if isinstance(entry, str):
        entry = {"path": entry}
    if not isinstance(entry, dict) or "path" not in entry:
        raise DataError(config, where, "path", "missing: each source needs a path (file, glob, folder or hub id)")
    known = {f.name for f in fields(Source)}
    unknown = sorted(set(entry) - known)
    if unknown:
        raise DataError(config, where, unknown[0], f"unknown option (known: {', '.join(sorted(known))})")
    columns = entry.get("columns") or {}
    if not isinstance(columns, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in columns.items()):
        raise DataError(config, where, "columns", "expected a mapping of column names to ours")
    num_samples = entry.get("num_samples")
    if num_samples is not None and (not isinstance(num_samples, int) or num_samples < 1):
        raise DataError(config, where, "num_samples", f"expected a positive integer, got {num_samples!r}")
    path = str(entry["path"])
    if not any(c in path for c in "*?[") and not os.path.isabs(path) and (config.parent / path).exists():
        path = str(config.parent / path)  # files named relative to the config file
    return Source(**{**entry, "path": path, "columns": columns})


def _read_config(path: Path) -> list[Source] | None:
    """The sources a data config file lists, or None when `path` is a data file."""
    if path.suffix.lower() in CONFIG_EXTENSIONS:
        import yaml

        try:
            config = yaml.safe_load(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as error:
            raise DataError(path, "", None, f"cannot read the data config: {error}") from None
    elif path.suffix.lower() == ".json" and path.is_file():
        head = path.read_bytes()[:4096].decode("utf-8-sig", errors="replace").lstrip()
        if not head.startswith("{") or '"sources"' not in head:
            return None
        config = read_records(path)[0][1]
        if not isinstance(config, dict) or "sources" not in config:
            return None
    else:
        return None
    if not isinstance(config, dict) or not isinstance(config.get("sources"), list) or not config["sources"]:
        raise DataError(path, "", "sources", "a data config needs a non-empty list 'sources'")
    return [_source_from_dict(entry, path, index) for index, entry in enumerate(config["sources"])]


def parse_sources(data_path: str) -> list[Source]:
    """The sources `--data_path` names: space-separated paths, globs or hub ids, or one data config file."""
    names = data_path.split()
    if not names:
        raise DataError(data_path, "", None, "no data source given")
    sources = []
    for name in names:
        listed = _read_config(Path(name))
        sources += listed if listed is not None else [Source(name)]
    return sources


def _is_save_to_disk(folder: Path) -> bool:
    return (folder / "dataset_info.json").is_file() or (folder / "dataset_dict.json").is_file()


def _hub_dataset(source: Source, label: str) -> datasets.Dataset:
    """The split of a folder or hub dataset, through `datasets` (memory-mapped Arrow, in its cache)."""
    import datasets

    try:
        folder = Path(source.path)
        if folder.is_dir() and _is_save_to_disk(folder):
            dataset = datasets.load_from_disk(str(folder))
            if isinstance(dataset, datasets.DatasetDict):
                if source.split not in dataset:
                    raise DataError(label, "", None, f"no split {source.split!r} (splits: {', '.join(dataset)})")
                dataset = dataset[source.split]
            return dataset
        return datasets.load_dataset(source.path, source.subset, split=source.split)
    except DataError:
        raise
    except FileNotFoundError as error:
        hint = "" if Path(source.path).exists() else "not a file, folder or dataset found on the hub or in its cache"
        raise DataError(label, "", None, hint or f"cannot read: {error}") from None
    except (ValueError, OSError, ConnectionError) as error:  # unknown split or subset, no network, bad files
        message = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise DataError(label, "", None, f"cannot read with datasets: {message}") from None


def _dataset_rows(dataset: datasets.Dataset) -> Iterator[tuple[str, Any]]:
    """("row N", record) of every row, read in batches (far faster than row by row); absent values left out."""
    index = 0
    for batch in dataset.with_format(None).iter(batch_size=1000):  # Python values, whatever format it was saved with
        columns = list(batch)
        for values in zip(*batch.values()):
            yield f"row {index}", {key: value for key, value in zip(columns, values) if value is not None}
            index += 1


def _file_dataset(path: Path) -> datasets.Dataset:
    import datasets

    builder = FILE_BUILDERS[path.suffix.lower()]
    options = {"delimiter": "\t"} if path.suffix.lower() == ".tsv" else {}
    try:
        return datasets.load_dataset(builder, data_files=str(path), split="train", **options)
    except Exception as error:  # the file's own reader fails in its own ways (pyarrow, pandas)
        message = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise DataError(path, "", None, f"cannot read as {builder}: {message}") from None


def _file_rows(path: Path) -> Iterator[tuple[str, Any]]:
    if path.suffix.lower() in JSON_EXTENSIONS or path.suffix.lower() not in FILE_BUILDERS:
        return iter_records(path)
    return _dataset_rows(_file_dataset(path))


def glob_files(pattern: str) -> list[Path] | None:
    """The files a glob source names, in order; None when `pattern` is not a glob."""
    if not any(c in pattern for c in "*?["):
        return None
    return [Path(match) for match in sorted(glob.glob(pattern, recursive=True)) if Path(match).is_file()]


def _label(source: Source) -> str:
    return source.path + (f" ({source.subset})" if source.subset else "") + f" [{source.split}]"


def _local_files(source: Source) -> list[Path] | None:
    """The files of a file, glob or folder source; None for a hub dataset id. A DataError for a missing file."""
    path = Path(source.path)
    files = glob_files(source.path)
    if files is not None:
        if not files:
            raise DataError(source.path, "", None, "the glob matches no file")
        return files
    if path.is_file():
        return [path]
    if path.is_dir():
        return sorted(file for file in path.rglob("*") if file.is_file())
    if path.suffix and path.suffix.lower() in (*JSON_EXTENSIONS, *FILE_BUILDERS):
        raise DataError(path, "", None, "no such file")
    return None


def source_rows(source: Source, opened: datasets.Dataset | None = None) -> Iterator[tuple[str, str, Any]]:
    """(file, place, record) of every record of one source; a folder or hub dataset `opened` already is read as
    it is, not loaded again."""
    path = Path(source.path)
    files = _local_files(source) if opened is None else None
    if files is not None and not path.is_dir():
        for file in files:
            yield from ((str(file), where, record) for where, record in _file_rows(file))
    else:
        label = _label(source)
        dataset = opened if opened is not None else _hub_dataset(source, label)
        yield from ((label, where, record) for where, record in _dataset_rows(dataset))


def _renamed(record: Any, columns: dict[str, str]) -> Any:
    if not columns or not isinstance(record, dict):
        return record
    return {columns.get(key, key): value for key, value in record.items()}


class _Problems:
    """The data's problems found so far: the first `MAX_REPORTED`, and whether there were more."""

    def __init__(self):
        self.errors: list[DataError] = []
        self.more = False

    def add(self, error: DataError) -> None:
        if len(self.errors) < MAX_REPORTED:
            self.errors.append(error)
        else:
            self.more = True

    def raise_any(self) -> None:
        if self.errors:
            raise self.errors[0] if len(self.errors) == 1 else DataErrors(self.errors, self.more)


# One checked sample: (file, place, messages, record format).
Row = tuple[str, str, list, str]
# How a record becomes a sample: (record, file, place, default system prompt) -> (sample, record format). SFT's is
# `conversation_sample`; preference data passes `sft.data.pairs.pair_sample`.
Parse = Callable[[Any, str, str, "str | None"], tuple[Any, str]]


def conversation_sample(record: Any, file: str, where: str, system: str | None) -> tuple[list, str]:
    """A record as SFT reads it: its messages (`parse_record`, with the default system prompt) and format."""
    return with_default_system(parse_record(record, file, where), system), record_format(record)


def _checked_rows(
    source: Source,
    default_system: str | None,
    max_samples: int | None,
    problems: _Problems,
    opened: datasets.Dataset | None = None,
    parse: Parse = conversation_sample,
) -> Iterator[Row]:
    """Every sample of one source (`opened` already, for a hub dataset: see `source_rows`), checked and turned into
    messages (the first `max_samples`); the problems go to `problems`, and reading stops once it is full."""
    count = 0
    for file, where, record in source_rows(source, opened):
        if max_samples is not None and count >= max_samples:
            break
        try:
            sample, form = parse(_renamed(record, source.columns), file, where, source.system_prompt or default_system)
        except DataError as error:
            problems.add(error)
            if problems.more:
                return
            continue
        count += 1
        yield file, where, sample, form
    if count == 0 and not problems.errors:
        raise DataError(source.path, "", None, "no samples in this source")


def resample(count: int, wanted: int, seed: int) -> list[int]:
    """Indices of `wanted` samples out of `count`: fewer drawn without repeats, more as whole repeats of every
    sample plus a draw for the rest; seeded, and in the source's order."""
    rng = random.Random(seed)
    repeats, rest = divmod(wanted, count)
    return sorted(list(range(count)) * repeats + rng.sample(range(count), rest))


def load_data(
    data_path: str,
    default_system: str | None = None,
    max_samples: int | None = None,
    seed: int = 42,
    parse: Parse = conversation_sample,
) -> Conversations:
    """Every conversation of the sources `data_path` names, checked, in memory, with its file and place (`paths`,
    `wheres`): for the few samples of a check or a calibration set. Training reads through `read_data` instead.
    Raises a DataError naming every problem found (up to `MAX_REPORTED`)."""
    rows: list[Row] = []
    problems = _Problems()
    for number, source in enumerate(parse_sources(data_path)):
        source_rows_ = list(_checked_rows(source, default_system, max_samples, problems, parse=parse))
        if problems.more:
            break
        if source.num_samples is not None and source_rows_:
            source_rows_ = [source_rows_[k] for k in resample(len(source_rows_), source.num_samples, seed + number)]
        rows += source_rows_
    problems.raise_any()
    result = Conversations([messages for _, _, messages, _ in rows], data_path, [where for _, where, _, _ in rows])
    result.paths, result.formats = [file for file, *_ in rows], [form for *_, form in rows]
    return result


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


# Part of every read cache key: raised when what reading writes changes.
READ_FORMAT = 1
WRITE_BATCH = 1000  # samples per Arrow record batch: the samples reading holds in memory at a time
READ_SCHEMA = pa.schema([(name, pa.string()) for name in ("messages", "file", "place", "format")])


def _source_state(source: Source) -> tuple[str, datasets.Dataset | None]:
    """What a source's samples depend on, found without reading them: its files' sizes and modification times, or
    a hub dataset's fingerprint in the datasets cache (with the dataset, opened for that)."""
    files = _local_files(source)
    if files is None:
        hub = _hub_dataset(source, _label(source))
        return hub._fingerprint, hub
    return json.dumps([(str(file.resolve()), file.stat().st_size, file.stat().st_mtime_ns) for file in files]), None


def _read_source(
    source: Source,
    default_system: str | None,
    max_samples: int | None,
    cache_dir: Path,
    problems: _Problems,
    parse: Parse = conversation_sample,
) -> datasets.Dataset | None:
    """One source's checked samples as a memory-mapped Arrow file (columns messages (JSON), file, place, format),
    written once and found again by a key of the source's files and the options; None when it has problems."""
    import datasets

    state, hub = _source_state(source)
    options = (READ_FORMAT, asdict(source), state, default_system, max_samples)
    if parse is not conversation_sample:  # SFT's keys stay as they were
        options += (f"{parse.__module__}.{parse.__qualname__}",)
    key = hashlib.sha256(json.dumps(options, sort_keys=True, default=str).encode()).hexdigest()[:24]
    path = cache_dir / f"read-{key}.arrow"
    if path.is_file():
        dataset = datasets.Dataset.from_file(str(path))
        logger.info("%s: %d samples, read before (%s)", source.path, len(dataset), path)
        return dataset
    logger.info("Reading and checking %s into %s", source.path, path)
    partial = path.with_name(f"{path.name}.{os.getpid()}.partial")
    try:
        with pa.OSFile(str(partial), "wb") as sink, pa.ipc.new_stream(sink, READ_SCHEMA) as writer:
            batch: list[Row] = []
            for row in _checked_rows(source, default_system, max_samples, problems, hub, parse):
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


def read_data(
    data_path: str,
    default_system: str | None = None,
    max_samples: int | None = None,
    seed: int = 42,
    cache_dir: str | os.PathLike | None = None,
    parse: Parse = conversation_sample,
) -> datasets.Dataset:
    """Every sample of the sources `data_path` names, checked, as a memory-mapped Arrow data set: columns
    `messages` (the conversation as JSON), `file`, `place` ("line N", "sample N", "row N") and `format`.

    Memory holds one batch of samples at a time, whatever the data's size: each source is read as a stream and
    written to an Arrow file in `cache_dir` (default: the datasets cache), under a key of its files' sizes and
    times and the options, so that a rerun, or another process of the run, opens the file instead of reading the
    source again. The mix is the sources in order, each resampled to its `num_samples` by a seeded draw of rows.
    Raises a DataError naming every problem found (up to `MAX_REPORTED`)."""
    import datasets

    cache_dir = cache_folder(cache_dir)
    parts = []
    problems = _Problems()
    for number, source in enumerate(parse_sources(data_path)):
        part = _read_source(source, default_system, max_samples, cache_dir, problems, parse)
        if problems.more:
            break
        if part is not None and source.num_samples is not None:
            part = part.select(resample(len(part), source.num_samples, seed + number))
        if part is not None:
            parts.append(part)
    problems.raise_any()
    return parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)


Data = TypeVar("Data", Conversations, "datasets.Dataset")


def _take(data: Data, indices: list[int]) -> Data:
    return data.take(indices) if isinstance(data, Conversations) else data.select(indices)


def split_validation(data: Data, val_size: float, seed: int, label: str = "") -> tuple[Data, Data]:
    """(train, validation): a seeded draw of `val_size` samples (a count when >= 1, else a fraction) cut off the
    data (`load_data`'s conversations or `read_data`'s data set); both keep the data's order and places."""
    count = int(val_size) if val_size >= 1 else round(len(data) * val_size)
    if not 1 <= count < len(data):
        raise DataError(
            label or getattr(data, "path", "the data"),
            "",
            None,
            f"--val_size {val_size} leaves {len(data) - count} training and {count} validation samples "
            f"of {len(data)}: both need at least one",
        )
    validation = set(random.Random(seed).sample(range(len(data)), count))
    train = [k for k in range(len(data)) if k not in validation]
    return _take(data, train), _take(data, sorted(validation))


def load_train_eval(
    data_args: Any, seed: int, parse: Parse = conversation_sample
) -> tuple[datasets.Dataset, datasets.Dataset | None]:
    """The training and evaluation data of finetune.py's data arguments (`--data_path`, `--eval_data_path`,
    `--val_size`, `--max_samples`, `--system_prompt`, `--preprocessing_cache_dir`): every source read and checked,
    as `read_data`'s memory-mapped data sets."""
    val_size, max_samples = getattr(data_args, "val_size", None), getattr(data_args, "max_samples", None)
    if val_size is not None and (val_size <= 0 or (val_size >= 1 and val_size != int(val_size))):
        raise ConfigurationError(f"--val_size must be a fraction between 0 and 1 or a whole count, got {val_size}")
    if val_size is not None and data_args.eval_data_path:
        raise ConfigurationError("--val_size cuts validation data off the training data: drop --eval_data_path")
    if max_samples is not None and max_samples < 1:
        raise ConfigurationError(f"--max_samples must be at least 1, got {max_samples}")
    cache_dir = getattr(data_args, "preprocessing_cache_dir", None)
    train = read_data(data_args.data_path, data_args.system_prompt, max_samples, seed, cache_dir, parse)
    evaluation = None
    if data_args.eval_data_path:
        evaluation = read_data(data_args.eval_data_path, data_args.system_prompt, max_samples, seed, cache_dir, parse)
    elif val_size is not None:
        train, evaluation = split_validation(train, val_size, seed, data_args.data_path)
    return train, evaluation
