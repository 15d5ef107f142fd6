"""sft.inspect's look at each sample: its fate under finetune.py's preprocessing (kept, truncated, split into
chunks, dropped and why), its lengths and trained tokens, the training rows it makes and where each row came from,
and the optimizer steps an epoch of them takes.
"""

from __future__ import annotations

import bisect
import json
import math
import sys
from array import array
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import datasets
import numpy as np
from transformers import PreTrainedTokenizerBase

from sft.args import DataArguments
from sft.data import (
    IGNORE_INDEX,
    TEXT_ROLE,
    Conversation,
    NothingToTrainError,
    Tokenized,
    tokenize_conversations,
    tokenize_samples,
)
from sft.inspect_view import FATES

PERCENTILES = (50, 90, 95, 99, 100)
# Samples read from the Arrow data sets at a time: memory holds one batch of conversations, whatever the data's size.
BATCH_SIZE = 1000
KEPT_FATES = ("ok", "truncated", "chunked")  # the fates of samples that make training rows


def _assistant_turns(messages: Conversation) -> int:
    return sum(message.get("role") == "assistant" for message in messages)


@dataclass
class SampleStats:
    """One sample untruncated: its length, its trained tokens, and those within the first max_length tokens."""

    length: int
    trained: int
    trained_within: int
    labelled_within: bool  # any label within the first max_length tokens (the first one included)
    status: str  # tokenize_many's status untruncated: "ok", or "dropped_no_label" for no label at all


def sample_stats(input_ids: list[int], labels: list[int], status: str, max_length: int) -> SampleStats:
    mask = np.asarray(labels, dtype=np.int64) != IGNORE_INDEX
    return SampleStats(
        len(input_ids), int(mask[1:].sum()), int(mask[1:max_length].sum()), bool(mask[:max_length].any()), status
    )


def sample_fate(stats: SampleStats, max_length: int, drop_long: bool, text: bool = False) -> str:
    """What training does with a sample, from its untruncated tokens: the rules `tokenize_many` (conversations)
    and `tokenize_text` (plain texts) apply (checked against the counts `tokenize_conversations` returns, in
    `inspect_data`)."""
    if stats.status == "dropped_no_label":
        return "dropped_no_label"
    if stats.length <= max_length:
        return "ok"
    if text:  # tokenize_text keeps every token of a plain text, as chunks, whatever --drop_long_samples says
        return "chunked"
    if drop_long:
        return "dropped_too_long"
    return "truncated" if stats.labelled_within else "dropped_no_label"


def sample_rows(fate: str, length: int, max_length: int) -> int:
    """Training rows a sample of this fate and untruncated length makes."""
    if fate == "chunked":
        return math.ceil(length / max_length)
    return 1 if fate in KEPT_FATES else 0


def _is_text(messages: Conversation) -> bool:
    return messages[0]["role"] == TEXT_ROLE


def tokenize_whole(
    conversations: list[Conversation],
    tokenizer: PreTrainedTokenizerBase,
    train_on: str,
    fold_system: bool,
) -> list[Tokenized]:
    """Each conversation untruncated, as `tokenize_conversations` tokenises it: a plain text as one chunk."""
    return [rows[0] for rows in tokenize_samples(tokenizer, conversations, sys.maxsize, train_on, False, fold_system)]


def untruncated_stats(
    train: datasets.Dataset, tokenizer: PreTrainedTokenizerBase, data_args: DataArguments, max_length: int
) -> Iterator[list[SampleStats]]:
    """Each training sample tokenised whole by `tokenize_conversations` (cached: rerunning with another
    --model_max_length does not tokenise again), yielded in batches of BATCH_SIZE samples, in order, so that no
    whole data set of token lists is held in memory."""
    try:
        whole, _ = tokenize_conversations(
            train,
            tokenizer=tokenizer,
            max_length=sys.maxsize,
            train_on=data_args.train_on,
            drop_long=False,
            num_proc=data_args.preprocessing_num_workers,
            cache_dir=data_args.preprocessing_cache_dir,
            fold_system=data_args.fold_system_prompt,
            description="untruncated",
        )
    except NothingToTrainError:  # not one sample with a label
        whole = None
    if whole is not None and len(whole) == len(train):
        for batch in whole.iter(batch_size=BATCH_SIZE):
            pairs = zip(batch["input_ids"], batch["labels"])
            yield [sample_stats(input_ids, labels, "ok", max_length) for input_ids, labels in pairs]
        return
    # Some sample has no label at all (it is dropped whatever its length, and left out of `whole`): batch by
    # batch, to know which.
    for batch in train.iter(batch_size=BATCH_SIZE):
        conversations = [json.loads(messages) for messages in batch["messages"]]
        tokenized = tokenize_whole(conversations, tokenizer, data_args.train_on, data_args.fold_system_prompt)
        yield [sample_stats(t.input_ids, t.labels, t.status, max_length) for t in tokenized]


@dataclass
class Survey:
    """The training samples' figures, gathered batch by batch: counts, and arrays of plain numbers (no Python
    object per sample)."""

    formats: Counter = field(default_factory=Counter)
    files: set[str] = field(default_factory=set)
    messages: int = 0
    assistant_turns: int = 0
    fates: Counter = field(default_factory=Counter)
    lengths_by_fate: dict[str, array] = field(default_factory=lambda: {fate: array("q") for fate in FATES})
    chunk_rows: int = 0  # training rows the chunked plain texts make
    tokens_cut: int = 0
    trained_tokens_cut: int = 0
    # The kept samples (their index in the training data) and each one's first training row, in order.
    kept: array = field(default_factory=lambda: array("q"))
    first_rows: array = field(default_factory=lambda: array("q"))
    rows: int = 0


def survey_samples(
    train: datasets.Dataset, stats_batches: Iterator[list[SampleStats]], max_length: int, drop_long: bool
) -> Survey:
    """Each training sample's figures, its fate and its training rows, from the data set's columns and its
    untruncated stats, one batch at a time."""
    survey = Survey()
    index = 0
    for batch, stats in zip(train.iter(batch_size=BATCH_SIZE), stats_batches, strict=True):
        survey.formats.update(batch["format"])
        survey.files.update(batch["file"])
        for encoded, sample in zip(batch["messages"], stats, strict=True):
            messages = json.loads(encoded)
            survey.messages += len(messages)
            survey.assistant_turns += _assistant_turns(messages)
            fate = sample_fate(sample, max_length, drop_long, _is_text(messages))
            survey.fates[fate] += 1
            survey.lengths_by_fate[fate].append(sample.length)
            rows = sample_rows(fate, sample.length, max_length)
            if fate == "chunked":
                survey.chunk_rows += rows
            if fate == "truncated":
                survey.tokens_cut += sample.length - max_length
                survey.trained_tokens_cut += sample.trained - sample.trained_within
            if rows:
                survey.kept.append(index)
                survey.first_rows.append(survey.rows)
                survey.rows += rows
            index += 1
    return survey


def expected_row_counts(survey: Survey) -> Counter:
    """The counts `tokenize_conversations` returns, from the fates: it counts training rows, and each chunk of a
    plain text is an "ok" row of its own."""
    counts = Counter({fate: count for fate, count in survey.fates.items() if fate != "chunked"})
    counts["ok"] += survey.chunk_rows
    return +counts


class RowOrigins(Sequence[str]):
    """Each training row's origin, labelled when asked: "sample 3 (line 4)", "sample 5 (line 6), chunk 2 of 3",
    or "packed row 7". Only the rows shown are asked for; one string per row would be millions of them for a large
    data set."""

    def __init__(self, train: datasets.Dataset, survey: Survey, packed_rows: int | None = None):
        self.places = train.select_columns(["file", "place"])  # a row's own columns, not its conversation
        self.kept, self.first_rows = survey.kept, survey.first_rows
        self.rows = survey.rows if packed_rows is None else packed_rows
        self.packed = packed_rows is not None
        self.with_file = len(survey.files) > 1  # a place ("line 4") names a sample only within its file

    def __len__(self) -> int:
        return self.rows

    def __getitem__(self, row: int) -> str:
        row = row + self.rows if row < 0 else row
        if not 0 <= row < self.rows:
            raise IndexError(row)
        if self.packed:
            return f"packed row {row}"
        n = bisect.bisect_right(self.first_rows, row) - 1
        index, first = self.kept[n], self.first_rows[n]
        end = self.first_rows[n + 1] if n + 1 < len(self.first_rows) else self.rows
        sample = self.places[index]
        origin = f"{sample['file']}, {sample['place']}" if self.with_file else sample["place"]
        # JSON lists' samples are found by their index, which is the sample's own unless --val_size cut some.
        label = f"sample {index}" if origin == f"sample {index}" else f"sample {index} ({origin})"
        return label if end - first == 1 else f"{label}, chunk {row - first + 1} of {end - first}"


def percentile_table(values: np.ndarray) -> dict[str, float]:
    if len(values) == 0:
        return {}
    return {f"p{p}" if p < 100 else "max": float(np.percentile(values, p)) for p in PERCENTILES}


def steps_per_epoch(rows: int, per_device: int, accumulation: int, world_size: int, drop_last: bool) -> int:
    """The Trainer's optimizer steps for one pass over `rows` training rows: each of `world_size` processes
    gets an equal share of the batches of `per_device` rows; one step per `accumulation` batches, the last
    partial group included."""
    batches = rows // (per_device * world_size) if drop_last else math.ceil(rows / (per_device * world_size))
    return max(batches // accumulation + int(batches % accumulation > 0), 1)
