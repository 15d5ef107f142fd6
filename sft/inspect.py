"""See what you train: the training data exactly as finetune.py prepares it, before any GPU time is spent.

    python -m sft.inspect --model_name_or_path MODEL --data_path data.jsonl [finetune.py's flags] [--show 3]
    python -m sft.inspect run.yaml [--show 3]            # finetune.py's config file, then inspect's own flags

Takes every finetune.py flag (paste the training command, swap `python finetune.py` for `python -m sft.inspect`)
and runs finetune.py's own preprocessing: `load_train_eval` (the same training data, after --val_size and
--max_samples), `tokenize_conversations` (same cache) and, with --packing, `pack_dataset`. Only the tokenizer is
loaded, never the model's weights. The data is read in batches from its memory-mapped Arrow files. It prints:

- the first --show training rows token by token, trained tokens (those that carry the loss) highlighted: in
  colour on a terminal (alternating shades mark token boundaries), between [[ and ]] when piped; special
  tokens as their text, newlines as ↵;
- a report: samples per format (and how many --val_size cut off for validation), turns, tokens, trained tokens,
  length percentiles, samples truncated, split into chunks (plain texts) or dropped and why, packing efficiency,
  optimizer steps per epoch for the batch settings;

and writes the report (data_report.txt, data_report.json) and a histogram of sample lengths with
--model_max_length marked (data_lengths.png) into --report_dir (default: --output_dir). Files already there
are kept unless --overwrite_report is given.
"""

from __future__ import annotations

import sft.quiet

if __name__ == "__main__":
    sft.quiet.setup()  # first: it silences known chatter of the libraries imported below

# isort: split
import bisect
import json
import logging
import math
import os
import sys
from array import array
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import datasets
import numpy as np
from transformers import PreTrainedTokenizerBase

from sft.args import DataArguments, LoraArguments, ModelArguments, check_required, parse_dataclasses
from sft.args import TrainingArguments as FinetuneTrainingArguments
from sft.data import (
    IGNORE_INDEX,
    TEXT_ROLE,
    Conversation,
    NothingToTrainError,
    Tokenized,
    load_train_eval,
    template_overhead,
    tokenize_conversations,
    tokenize_samples,
)
from sft.errors import ConfigurationError, run_main
from sft.inspect_view import FATES, format_report, render_row, trained_count, use_color
from sft.modeling import load_tokenizer, read_chat_template
from sft.packing import pack_dataset
from sft.plots import length_histogram_figure, save_figure
from sft.qwen1 import resolve_model_path

REPORT_FILES = ("data_report.txt", "data_report.json", "data_lengths.png")
PERCENTILES = (50, 90, 95, 99, 100)
# Samples read from the Arrow data sets at a time: memory holds one batch of conversations, whatever the data's size.
BATCH_SIZE = 1000
KEPT_FATES = ("ok", "truncated", "chunked")  # the fates of samples that make training rows


@dataclass
class InspectArguments:
    show: int = field(default=3, metadata={"help": "Training rows to print token by token (0: none)."})
    report_dir: str | None = field(
        default=None, metadata={"help": "Where the report and the length histogram go. Default: --output_dir."}
    )
    overwrite_report: bool = field(
        default=False, metadata={"help": "Replace report files already in --report_dir (kept otherwise)."}
    )
    world_size: int | None = field(
        default=None,
        metadata={"help": "Training processes (GPUs) for the steps estimate. Default: $WORLD_SIZE, else 1."},
    )
    color: Literal["auto", "always", "never"] = field(
        default="auto", metadata={"help": "Colour the printed tokens: auto (when stdout is a terminal), always, never."}
    )


@dataclass
class InspectTrainingArguments(FinetuneTrainingArguments):
    """finetune.py's training flags, minus the precision checks: --bf16 on a machine without a GPU must not stop
    an inspection, whose data does not depend on precision."""

    def __post_init__(self):
        self.bf16 = self.fp16 = False
        super().__post_init__()


def parse_arguments(
    argv: list[str],
) -> tuple[ModelArguments, DataArguments, FinetuneTrainingArguments, InspectArguments]:
    """finetune.py's arguments (flags, or its config file then flags) and inspect's own flags."""
    dataclass_types = (ModelArguments, DataArguments, InspectTrainingArguments, LoraArguments, InspectArguments)
    model_args, data_args, training_args, _, inspect_args = parse_dataclasses(dataclass_types, argv)
    return model_args, data_args, training_args, inspect_args


# ----------------------------------------------------------------------------------------------------------
# Looking at the data
# ----------------------------------------------------------------------------------------------------------


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


@dataclass
class Inspection:
    report: dict
    dataset: datasets.Dataset | None  # the training rows: input_ids, labels (and position_ids when packed)
    where: Sequence[str]  # each training row's origin (sample's line or index and chunk; "packed row" when packed)
    lengths_by_fate: dict[str, list[int]]
    tokenizer: PreTrainedTokenizerBase


def inspect_data(
    model_args: ModelArguments,
    data_args: DataArguments,
    training_args: FinetuneTrainingArguments,
    world_size: int = 1,
    tokenizer: PreTrainedTokenizerBase | None = None,
) -> Inspection:
    """finetune.py's preprocessing of --data_path, and what it did to each sample. Raises a UserError for what
    finetune.py would refuse."""
    check_required(model_args, data_args)
    max_length = training_args.model_max_length
    # finetune.py's own reading: the same memory-mapped data set, --val_size's cut and --max_samples.
    train, evaluation = load_train_eval(data_args, training_args.seed)
    validation_samples = len(evaluation) if data_args.val_size is not None and evaluation is not None else None
    if tokenizer is None:
        path = resolve_model_path(model_args.model_name_or_path)
        chat_template = read_chat_template(model_args.chat_template) if model_args.chat_template else None
        try:
            tokenizer = load_tokenizer(path, model_args.trust_remote_code, max_length, chat_template)
        except (OSError, ValueError) as error:  # a typo in the path or the hub id, or no network to fetch it
            raise ConfigurationError(
                f"--model_name_or_path {path}: cannot load a tokenizer from it ({error})"
            ) from None
    overhead = template_overhead(tokenizer)
    if max_length <= overhead + 1:
        raise ConfigurationError(
            f"--model_max_length {max_length} leaves no room for text: the chat template alone takes {overhead} tokens"
        )

    # What training gets, by training's own function (this also fills the cache a training run then reuses).
    try:
        dataset, counts = tokenize_conversations(
            train,
            tokenizer=tokenizer,
            max_length=max_length,
            train_on=data_args.train_on,
            drop_long=data_args.drop_long_samples,
            num_proc=data_args.preprocessing_num_workers,
            cache_dir=data_args.preprocessing_cache_dir,
            fold_system=data_args.fold_system_prompt,
            description="train",
        )
    except NothingToTrainError:  # nothing left to train on: the report below says why
        dataset, counts = None, None

    stats = untruncated_stats(train, tokenizer, data_args, max_length)
    survey = survey_samples(train, stats, max_length, data_args.drop_long_samples)
    expected = expected_row_counts(survey)
    # With nothing left to train on, tokenize_conversations gives no counts: then no row may be kept.
    agrees = survey.rows == 0 if counts is None else expected == +counts
    if not agrees:
        raise RuntimeError(f"sft.inspect disagrees with sft.data on the samples' fates: {expected} != {counts}")

    tokens = trained = 0
    if dataset is not None:
        tokens = sum(dataset["length"])
        for batch in dataset.iter(batch_size=BATCH_SIZE):
            trained += sum(trained_count(labels) for labels in batch["labels"])
    lengths = np.concatenate([np.asarray(lengths, dtype=np.int64) for lengths in survey.lengths_by_fate.values()])
    lengths_by_fate = {FATES[fate]: survey.lengths_by_fate[fate].tolist() for fate in FATES}
    kept_samples = len(survey.kept)

    packing = None
    where = RowOrigins(train, survey)
    if data_args.packing and dataset is not None:
        dataset = pack_dataset(dataset, max_length)
        packing = {
            "rows": len(dataset),
            "samples_per_row": kept_samples / max(1, len(dataset)),
            "efficiency": tokens / max(1, len(dataset) * max_length),
        }
        where = RowOrigins(train, survey, packed_rows=len(dataset))
    rows = len(dataset) if dataset is not None else 0

    per_device = training_args.per_device_train_batch_size
    accumulation = training_args.gradient_accumulation_steps
    epoch_steps = steps_per_epoch(rows, per_device, accumulation, world_size, training_args.dataloader_drop_last)
    if training_args.max_steps > 0:
        total_steps = training_args.max_steps
    else:
        total_steps = math.ceil(training_args.num_train_epochs * epoch_steps)

    report = {
        "data_path": list(data_args.data_path),
        "model": model_args.model_name_or_path,
        "model_max_length": max_length,
        "train_on": data_args.train_on,
        "drop_long_samples": data_args.drop_long_samples,
        "system_prompt": data_args.system_prompt,
        "samples": len(train),
        "val_size": data_args.val_size,
        "validation_samples": validation_samples,
        "formats": dict(survey.formats),
        "messages": survey.messages,
        "assistant_turns": survey.assistant_turns,
        "length_percentiles": percentile_table(lengths),
        "length_mean": float(np.mean(lengths)) if len(lengths) else 0.0,
        "fates": {fate: survey.fates[fate] for fate in FATES},
        "chunk_rows": survey.chunk_rows,
        "kept_samples": kept_samples,
        "tokens": tokens,
        "trained_tokens": trained,
        "tokens_cut_by_truncation": survey.tokens_cut,
        "trained_tokens_cut_by_truncation": survey.trained_tokens_cut,
        "packing": packing,
        "training_rows": rows,
        "per_device_train_batch_size": per_device,
        "gradient_accumulation_steps": accumulation,
        "world_size": world_size,
        "rows_per_step": per_device * accumulation * world_size,
        "steps_per_epoch": epoch_steps,
        "total_steps": total_steps,
        "num_train_epochs": training_args.num_train_epochs,
        "max_steps": training_args.max_steps,
    }
    return Inspection(report, dataset, where, lengths_by_fate, tokenizer)


def _assistant_turns(messages: Conversation) -> int:
    return sum(message.get("role") == "assistant" for message in messages)


def write_report(inspection: Inspection, report_dir: Path) -> list[Path]:
    report_dir.mkdir(parents=True, exist_ok=True)
    text, data, picture = (report_dir / name for name in REPORT_FILES)
    text.write_text(format_report(inspection.report) + "\n")
    data.write_text(json.dumps(inspection.report, indent=2) + "\n")
    figure = length_histogram_figure(
        inspection.lengths_by_fate,
        inspection.report["model_max_length"],
        title=f"{' '.join(Path(name).name for name in inspection.report['data_path'])}: "
        f"{inspection.report['samples']} samples",
    )
    save_figure(figure, picture)
    return [text, data, picture]


def run_inspection(argv: list[str]) -> Inspection:
    """`python -m sft.inspect` with these arguments: prints the rows and the report, writes the report files.
    Raises a UserError for what the user can fix."""
    sft.quiet.setup_logging(logging.WARNING)
    model_args, data_args, training_args, inspect_args = parse_arguments(argv)
    report_dir = Path(inspect_args.report_dir or training_args.output_dir)
    existing = [report_dir / name for name in REPORT_FILES if (report_dir / name).exists()]
    if existing and not inspect_args.overwrite_report:
        raise ConfigurationError(
            f"{existing[0]} exists: pass --overwrite_report to replace it, or choose another --report_dir"
        )
    world_size = inspect_args.world_size or int(os.environ.get("WORLD_SIZE", "1"))
    inspection = inspect_data(model_args, data_args, training_args, world_size)

    color = use_color(inspect_args.color)
    tokenizer = inspection.tokenizer
    dataset = inspection.dataset
    shown = dataset.select(range(min(len(dataset), max(0, inspect_args.show)))) if dataset is not None else []
    if len(shown):
        legend = "highlighted" if color else "between [[ and ]]"
        print(f"Training rows as the model sees them; the tokens that carry the loss are {legend}.\n")
    for where, row in zip(inspection.where, shown):
        trained = trained_count(row["labels"])
        print(f"===== {where}: {len(row['input_ids'])} tokens, {trained} trained =====")
        print(render_row(tokenizer, row["input_ids"], row["labels"], row.get("position_ids"), color).rstrip("\n"))
        print()
    print(format_report(inspection.report))
    for path in write_report(inspection, report_dir):
        print(f"Wrote {path}")
    if inspection.report["kept_samples"] == 0:
        raise ConfigurationError("no sample is left to train on (raise --model_max_length?)")
    return inspection


def main(argv: list[str] | None = None) -> None:
    run_main(lambda: run_inspection(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    main()
