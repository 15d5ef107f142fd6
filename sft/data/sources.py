"""Stage 1 of the data pipeline, what `--data_path` names: one or more sources, each a file, a glob, a folder or a
hub dataset id, or a data config file that lists sources with options of their own (`Source`).

A data config is a YAML file, or a JSON file holding one object (the whole file) with a "sources" list and none of
a record's keys: a JSON or JSONL data file whose records carry a "sources" field (provenance) stays data. Paths and
globs in a config are resolved from the config's folder.

The rest of stage 1: `sft.data.folders` (which files a folder or glob source reads), `sft.data.rows` (each
source's records, checked; `load_data`), `sft.data.arrow_files` (`read_data`: the mix as memory-mapped Arrow) and
`sft.data.splits` (`--val_size`, `load_train_eval`).
"""

from __future__ import annotations

import glob
import json
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from sft.data.files import DATA_EXTENSIONS, DECOMPRESSION_ERRORS, FILE_BUILDERS, JSON_EXTENSIONS, open_data
from sft.data.formats import record_format
from sft.data.reading import DataError

CONFIG_EXTENSIONS = (".yaml", ".yml")
MAX_REPORTED = 20
# A JSON file bigger than this is data: a data config is a few lines.
MAX_CONFIG_BYTES = 1 << 20

__all__ = ["DATA_EXTENSIONS", "FILE_BUILDERS", "JSON_EXTENSIONS", "DataErrors", "Source", "glob_files", "parse_sources"]


@dataclass
class Source:
    """One source of a data mix, as a data config file lists it."""

    path: str  # a file, glob, folder or hub dataset id
    split: str = "train"  # of a folder or hub dataset
    subset: str | None = None  # a hub dataset's configuration ("name" in datasets.load_dataset)
    columns: dict[str, str] = field(default_factory=dict)  # the source's column name -> ours
    num_samples: int | None = None  # samples to take: fewer drawn without repeats, more with whole repeats
    system_prompt: str | None = None  # for samples of this source with no system message


def label(source: Source) -> str:
    """A folder or hub dataset source as errors name it: its path, subset and split."""
    return source.path + (f" ({source.subset})" if source.subset else "") + f" [{source.split}]"


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


def is_glob(path: str) -> bool:
    return any(c in path for c in "*?[")


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
    path = os.path.expanduser(str(entry["path"]))
    if not os.path.isabs(path) and (is_glob(path) or (config.parent / path).exists()):
        path = str(config.parent / path)  # files and globs named relative to the config file
    return Source(**{**entry, "path": path, "columns": columns})


def _json_config(path: Path) -> Any:
    """The JSON file as one value when it is a single small JSON object; None otherwise (JSONL, a list, big)."""
    try:
        if path.stat().st_size > MAX_CONFIG_BYTES:
            return None
        with open_data(path) as handle:
            head = handle.read(MAX_CONFIG_BYTES + 1)
    except (OSError, *DECOMPRESSION_ERRORS):
        return None
    if len(head) > MAX_CONFIG_BYTES or not head.decode("utf-8-sig", errors="replace").lstrip().startswith("{"):
        return None
    try:
        value = json.loads(head.decode("utf-8-sig"))
    except (ValueError, RecursionError):  # JSONL (several values), or invalid: data, whose reading reports it
        return None
    return value if isinstance(value, dict) else None


def _read_config(path: Path) -> list[Source] | None:
    """The sources a data config file lists, or None when `path` is a data file."""
    if path.suffix.lower() in CONFIG_EXTENSIONS:
        import yaml

        try:
            config = yaml.safe_load(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as error:
            raise DataError(path, "", None, f"cannot read the data config: {error}") from None
    elif path.suffix.lower() == ".json" and path.is_file():
        config = _json_config(path)
        # One JSON object: a config when it has "sources" and is no record (a record may carry a "sources" field).
        if config is None or "sources" not in config or record_format(config) != "unknown":
            return None
    else:
        return None
    if not isinstance(config, dict) or not isinstance(config.get("sources"), list) or not config["sources"]:
        raise DataError(path, "", "sources", "a data config needs a non-empty list 'sources'")
    return [_source_from_dict(entry, path, index) for index, entry in enumerate(config["sources"])]


def source_names(data_path: str | list[str]) -> list[str]:
    """The names `--data_path` gives, one per argument, spaces in a path kept. An argument (or a config's or an
    older run record's string) that is no existing path nor a glob matching files is the older form, several
    names separated by spaces."""
    names = []
    for item in [data_path] if isinstance(data_path, str) else data_path:
        item = str(item)
        names += [item] if os.path.exists(item) or glob_files(item) else item.split()
    return names


def parse_sources(data_path: str | list[str]) -> list[Source]:
    """The sources `--data_path` names (`source_names`): paths, globs, hub ids or data config files."""
    names = source_names(data_path)
    if not names:
        raise DataError(str(data_path), "", None, "no data source given")
    sources = []
    for name in names:
        listed = _read_config(Path(name))
        sources += listed if listed is not None else [Source(name)]
    return sources


def glob_files(pattern: str) -> list[Path] | None:
    """The files a glob source names, in order; None when `pattern` is not a glob."""
    if not is_glob(pattern):
        return None
    return [Path(match) for match in sorted(glob.glob(pattern, recursive=True)) if Path(match).is_file()]
