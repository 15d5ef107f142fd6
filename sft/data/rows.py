"""Stage 1 of the data pipeline, each source's records: read from its files (`sft.data.folders` says which) or
through `datasets` (a hub dataset id, a `save_to_disk` folder), each with its place ("line N", "sample N", "row N"),
and checked by `sft.data.formats.parse_record`; up to the first `MAX_REPORTED` problems are reported together, as one
`DataError`.

Two ways out, from the same checked rows (`checked_rows`): `sft.data.arrow_files.read_data` writes them to
memory-mapped Arrow files, and is what training uses; `load_data` keeps the conversations in Python lists, for the
few samples of a self-check or a calibration set. A mix is every source's samples, in the order given, each source
first cut to `max_samples` and then resampled to its `num_samples`.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sft.data.files import FILE_BUILDERS, JSON_EXTENSIONS, data_suffix
from sft.data.folders import is_save_to_disk, local_files
from sft.data.formats import parse_record, record_format, with_default_system
from sft.data.reading import Conversations, DataError, iter_records
from sft.data.sources import MAX_REPORTED, DataErrors, Source, label, parse_sources, source_names

if TYPE_CHECKING:
    import datasets


def hub_dataset(source: Source) -> datasets.Dataset:
    """The split of a folder or hub dataset, through `datasets` (memory-mapped Arrow, in its cache)."""
    import datasets

    where = label(source)
    try:
        folder = Path(source.path)
        if folder.is_dir() and is_save_to_disk(folder):
            dataset = datasets.load_from_disk(str(folder))
            if isinstance(dataset, datasets.DatasetDict):
                if source.split not in dataset:
                    raise DataError(where, "", None, f"no split {source.split!r} (splits: {', '.join(dataset)})")
                dataset = dataset[source.split]
            return dataset
        return datasets.load_dataset(source.path, source.subset, split=source.split)
    except DataError:
        raise
    except FileNotFoundError as error:
        hint = "" if Path(source.path).exists() else "not a file, folder or dataset found on the hub or in its cache"
        raise DataError(where, "", None, hint or f"cannot read: {error}") from None
    except (ValueError, OSError, ConnectionError) as error:  # unknown split or subset, no network, bad files
        message = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise DataError(where, "", None, f"cannot read with datasets: {message}") from None


def _dataset_rows(dataset: datasets.Dataset) -> Iterator[tuple[str, Any]]:
    """("row N", record) of every row, read in batches (far faster than row by row); absent values left out."""
    index = 0
    for batch in dataset.with_format(None).iter(batch_size=1000):  # Python values, whatever format it was saved with
        columns = list(batch)
        for values in zip(*batch.values()):
            yield f"row {index}", {key: value for key, value in zip(columns, values) if value is not None}
            index += 1


def _file_dataset(path: Path, suffix: str) -> datasets.Dataset:
    import datasets

    builder = FILE_BUILDERS[suffix]
    options = {"delimiter": "\t"} if suffix == ".tsv" else {}
    try:
        # Prepared again, not taken from the datasets cache: it knows local files by their modification time
        # alone, and this runs only for content that our read cache does not hold.
        return datasets.load_dataset(
            builder, data_files=str(path), split="train", download_mode="force_redownload", **options
        )
    except Exception as error:  # the file's own reader fails in its own ways (pyarrow, pandas)
        message = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise DataError(path, "", None, f"cannot read as {builder}: {message}") from None


def file_rows(path: Path) -> Iterator[tuple[str, Any]]:
    """(place, record) of every record of one data file, of its type by extension and content (`data_suffix`)."""
    suffix = data_suffix(path)
    if suffix in JSON_EXTENSIONS:
        return iter_records(path)
    return _dataset_rows(_file_dataset(path, suffix))


def source_rows(
    source: Source, files: list[Path] | None = None, opened: datasets.Dataset | None = None
) -> Iterator[tuple[str, str, Any]]:
    """(file, place, record) of every record of one source: of its `files` (`local_files`, found already) or of
    the folder or hub dataset `opened` already (read as it is, not loaded again); found here when neither is given."""
    if files is None and opened is None:
        files = local_files(source)
    if files is not None:
        for file in files:
            yield from ((str(file), where, record) for where, record in file_rows(file))
    else:
        dataset = opened if opened is not None else hub_dataset(source)
        yield from ((label(source), where, record) for where, record in _dataset_rows(dataset))


def _renamed(record: Any, columns: dict[str, str]) -> Any:
    if not columns or not isinstance(record, dict):
        return record
    return {columns.get(key, key): value for key, value in record.items()}


class Problems:
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


def checked_rows(
    source: Source,
    default_system: str | None,
    max_samples: int | None,
    problems: Problems,
    files: list[Path] | None = None,
    opened: datasets.Dataset | None = None,
    parse: Parse = conversation_sample,
) -> Iterator[Row]:
    """Every sample of one source (of its `files`, or `opened` already: see `source_rows`), checked and turned into
    messages (the first `max_samples`); the problems go to `problems`, and reading stops once it is full."""
    count = 0
    for file, where, record in source_rows(source, files, opened):
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
    data_path: str | list[str],
    default_system: str | None = None,
    max_samples: int | None = None,
    seed: int = 42,
    parse: Parse = conversation_sample,
) -> Conversations:
    """Every conversation of the sources `data_path` names, checked, in memory, with its file and place (`paths`,
    `wheres`): for the few samples of a check or a calibration set. Training reads through `read_data` instead.
    Raises a DataError naming every problem found (up to `MAX_REPORTED`)."""
    rows: list[Row] = []
    problems = Problems()
    for number, source in enumerate(parse_sources(data_path)):
        source_rows_ = list(checked_rows(source, default_system, max_samples, problems, parse=parse))
        if problems.more:
            break
        if source.num_samples is not None and source_rows_:
            source_rows_ = [source_rows_[k] for k in resample(len(source_rows_), source.num_samples, seed + number)]
        rows += source_rows_
    problems.raise_any()
    name = " ".join(source_names(data_path))
    result = Conversations([messages for _, _, messages, _ in rows], name, [where for _, where, _, _ in rows])
    result.paths, result.formats = [file for file, *_ in rows], [form for *_, form in rows]
    return result
