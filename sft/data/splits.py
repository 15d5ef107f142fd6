"""Stage 1 of the data pipeline, training and validation: `--val_size` cuts a seeded draw of samples off the mix, and
`load_train_eval` reads finetune.py's training and evaluation data.

A validation sample is never trained on: the draw is over the mix's distinct samples (a sample is its file and
place), and every copy of a drawn sample that resampling (`num_samples` above a source's size) put into the mix is
taken out of training too.
"""

from __future__ import annotations

import logging
import random
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np

from sft.data.arrow_files import read_data
from sft.data.reading import Conversations, DataError
from sft.data.rows import Parse, conversation_sample
from sft.data.sources import source_names
from sft.errors import ConfigurationError

if TYPE_CHECKING:
    import datasets

logger = logging.getLogger("sft.data")

Data = TypeVar("Data", Conversations, "datasets.Dataset")


def _take(data: Data, indices: list[int]) -> Data:
    return data.take(indices) if isinstance(data, Conversations) else data.select(indices)


def _sample_codes(data: Data) -> tuple[np.ndarray, int]:
    """(each row's sample number, the number of distinct samples): rows of the same file and place are copies of
    one sample; samples are numbered in the order of their first row."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if isinstance(data, Conversations):
        paths = data.paths or [data.path] * len(data)
        keys = pa.array([f"{path}\n{where}" for path, where in zip(paths, data.wheres)], pa.string())
    elif "place" in data.column_names:
        table = data.with_format("arrow")[:]
        keys = pc.binary_join_element_wise(table["file"], table["place"], "\n")
    else:
        return np.arange(len(data)), len(data)
    unique = pc.unique(keys)
    return pc.index_in(keys, value_set=unique).to_numpy(zero_copy_only=False), len(unique)


def split_validation(data: Data, val_size: float, seed: int, label: str = "") -> tuple[Data, Data]:
    """(train, validation): a seeded draw of `val_size` distinct samples (a count when >= 1, else a fraction) cut
    off the data (`load_data`'s conversations or `read_data`'s data set), with every copy of them; both keep the
    data's order and places."""
    codes, distinct = _sample_codes(data)
    count = int(val_size) if val_size >= 1 else round(distinct * val_size)
    if not 1 <= count < distinct:
        raise DataError(
            label or getattr(data, "path", "the data"),
            "",
            None,
            f"--val_size {val_size} leaves {distinct - count} training and {count} validation samples "
            f"of {distinct}: both need at least one",
        )
    drawn = np.zeros(distinct, dtype=bool)
    drawn[random.Random(seed).sample(range(distinct), count)] = True
    _, first_rows = np.unique(codes, return_index=True)  # the first row of each sample, by sample number
    validation = np.sort(first_rows[drawn])
    train = np.flatnonzero(~drawn[codes])
    copies = len(data) - len(train) - count
    if copies:
        logger.info("--val_size: %d copies of validation samples (resampled) left out of training", copies)
    return _take(data, train.tolist()), _take(data, validation.tolist())


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
        label = " ".join(source_names(data_args.data_path))
        train, evaluation = split_validation(train, val_size, seed, label)
    return train, evaluation
