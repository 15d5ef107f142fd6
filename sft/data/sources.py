"""Stage 1 of the data pipeline, where the data comes from: `--data_path` as one or more sources, each read into
records with their place ("line N", "sample N", "row N"), then mixed, sampled and split.

A source is a file by its extension (.json, .jsonl, .parquet, .csv, .tsv, .arrow), a glob, a folder (a dataset
repository downloaded from the Hugging Face hub, with its data files, or a `Dataset.save_to_disk` folder), or a
hub dataset id read through `datasets` (from its local cache when offline). A data config file (YAML, or JSON
with a "sources" list) names sources with options of their own (`Source`). The mix is every source's samples, in
the order given, each source first cut to `max_samples` and then resampled to its `num_samples`.

Every record is checked by `sft.data.formats.parse_record`; up to the first `MAX_REPORTED` problems are reported
together, as one `DataError`.
"""

from __future__ import annotations

import glob
import os
import random
from collections.abc import Iterator
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from sft.data.formats import parse_record, record_format, with_default_system
from sft.data.reading import Conversations, DataError, read_records

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


def _hub_rows(source: Source, label: str) -> Iterator[tuple[str, Any]]:
    """Rows of a folder or hub dataset read with `datasets`, each "row N" (0-based, in the split)."""
    import datasets

    try:
        folder = Path(source.path)
        if folder.is_dir() and _is_save_to_disk(folder):
            dataset = datasets.load_from_disk(str(folder))
            if isinstance(dataset, datasets.DatasetDict):
                if source.split not in dataset:
                    raise DataError(label, "", None, f"no split {source.split!r} (splits: {', '.join(dataset)})")
                dataset = dataset[source.split]
        else:
            dataset = datasets.load_dataset(source.path, source.subset, split=source.split)
    except DataError:
        raise
    except FileNotFoundError as error:
        hint = "" if Path(source.path).exists() else "not a file, folder or dataset found on the hub or in its cache"
        raise DataError(label, "", None, hint or f"cannot read: {error}") from None
    except (ValueError, OSError, ConnectionError) as error:  # unknown split or subset, no network, bad files
        message = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise DataError(label, "", None, f"cannot read with datasets: {message}") from None
    for index, row in enumerate(dataset):
        yield f"row {index}", {key: value for key, value in row.items() if value is not None}


def _file_rows(path: Path) -> Iterator[tuple[str, Any]]:
    if path.suffix.lower() in JSON_EXTENSIONS or path.suffix.lower() not in FILE_BUILDERS:
        yield from read_records(path)
        return
    import datasets

    builder = FILE_BUILDERS[path.suffix.lower()]
    options = {"delimiter": "\t"} if path.suffix.lower() == ".tsv" else {}
    try:
        dataset = datasets.load_dataset(builder, data_files=str(path), split="train", **options)
    except Exception as error:  # the file's own reader fails in its own ways (pyarrow, pandas)
        message = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise DataError(path, "", None, f"cannot read as {builder}: {message}") from None
    for index, row in enumerate(dataset):
        yield f"row {index}", {key: value for key, value in row.items() if value is not None}


def glob_files(pattern: str) -> list[Path] | None:
    """The files a glob source names, in order; None when `pattern` is not a glob."""
    if not any(c in pattern for c in "*?["):
        return None
    return [Path(match) for match in sorted(glob.glob(pattern, recursive=True)) if Path(match).is_file()]


def source_rows(source: Source) -> Iterator[tuple[str, str, Any]]:
    """(file, place, record) of every record of one source."""
    path = Path(source.path)
    files = glob_files(source.path)
    if files is not None:
        if not files:
            raise DataError(source.path, "", None, "the glob matches no file")
        for file in files:
            yield from ((str(file), where, record) for where, record in _file_rows(file))
    elif path.is_file():
        yield from ((str(path), where, record) for where, record in _file_rows(path))
    elif path.is_dir() or not path.suffix or path.suffix.lower() not in (*JSON_EXTENSIONS, *FILE_BUILDERS):
        label = source.path + (f" ({source.subset})" if source.subset else "") + f" [{source.split}]"
        yield from ((label, where, record) for where, record in _hub_rows(source, label))
    else:
        raise DataError(path, "", None, "no such file")


def _renamed(record: Any, columns: dict[str, str]) -> Any:
    if not columns or not isinstance(record, dict):
        return record
    return {columns.get(key, key): value for key, value in record.items()}


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
) -> Conversations:
    """Every conversation of the sources `data_path` names, checked, with its file and place (`paths`, `wheres`).
    Raises a DataError naming every problem found (up to `MAX_REPORTED`)."""
    conversations, paths, wheres, formats = [], [], [], []
    errors: list[DataError] = []
    more = False
    for number, source in enumerate(parse_sources(data_path)):
        start = len(conversations)
        for file, where, record in source_rows(source):
            if max_samples is not None and len(conversations) - start >= max_samples:
                break
            try:
                record = _renamed(record, source.columns)
                messages = parse_record(record, file, where)
            except DataError as error:
                if len(errors) == MAX_REPORTED:
                    more = True
                    break
                errors.append(error)
                continue
            conversations.append(with_default_system(messages, source.system_prompt or default_system))
            paths.append(file)
            wheres.append(where)
            formats.append(record_format(record))
        if more:
            break
        if len(conversations) == start and not errors:
            raise DataError(source.path, "", None, "no samples in this source")
        if source.num_samples is not None and len(conversations) > start:
            picked = [start + k for k in resample(len(conversations) - start, source.num_samples, seed + number)]
            for column in (conversations, paths, wheres, formats):
                column[start:] = [column[k] for k in picked]
    if errors:
        raise errors[0] if len(errors) == 1 else DataErrors(errors, more)
    result = Conversations(conversations, data_path, wheres)
    result.paths, result.formats = paths, formats
    return result


def split_validation(conversations: Conversations, val_size: float, seed: int) -> tuple[Conversations, Conversations]:
    """(train, validation): a seeded draw of `val_size` conversations (a count when >= 1, else a fraction) cut off
    the data; both keep the data's order and places."""
    count = int(val_size) if val_size >= 1 else round(len(conversations) * val_size)
    if not 1 <= count < len(conversations):
        raise DataError(
            conversations.path,
            "",
            None,
            f"--val_size {val_size} leaves {len(conversations) - count} training and {count} validation samples "
            f"of {len(conversations)}: both need at least one",
        )
    validation = set(random.Random(seed).sample(range(len(conversations)), count))
    parts = []
    for keep in (lambda k: k not in validation, lambda k: k in validation):
        indices = [k for k in range(len(conversations)) if keep(k)]
        part = Conversations([conversations[k] for k in indices], conversations.path, [])
        part.wheres = [conversations.wheres[k] for k in indices]
        part.paths = [conversations.paths[k] for k in indices] if conversations.paths else None
        part.formats = [conversations.formats[k] for k in indices] if conversations.formats else None
        parts.append(part)
    return parts[0], parts[1]


def load_train_eval(data_args: Any, seed: int) -> tuple[Conversations, Conversations | None]:
    """The training and evaluation conversations of finetune.py's data arguments (`--data_path`,
    `--eval_data_path`, `--val_size`, `--max_samples`, `--system_prompt`): every source read and checked."""
    from sft.errors import ConfigurationError

    val_size, max_samples = getattr(data_args, "val_size", None), getattr(data_args, "max_samples", None)
    if val_size is not None and (val_size <= 0 or (val_size >= 1 and val_size != int(val_size))):
        raise ConfigurationError(f"--val_size must be a fraction between 0 and 1 or a whole count, got {val_size}")
    if val_size is not None and data_args.eval_data_path:
        raise ConfigurationError("--val_size cuts validation data off the training data: drop --eval_data_path")
    if max_samples is not None and max_samples < 1:
        raise ConfigurationError(f"--max_samples must be at least 1, got {max_samples}")
    train = load_data(data_args.data_path, data_args.system_prompt, max_samples, seed)
    evaluation = None
    if data_args.eval_data_path:
        evaluation = load_data(data_args.eval_data_path, data_args.system_prompt, max_samples, seed)
    elif val_size is not None:
        train, evaluation = split_validation(train, val_size, seed)
    return train, evaluation
