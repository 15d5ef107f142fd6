"""See what you train: the training data exactly as finetune.py prepares it, before any GPU time is spent.

    python -m sft.inspect --model_name_or_path MODEL --data_path data.jsonl [finetune.py's flags] [--show 3]
    python -m sft.inspect run.yaml [--show 3]            # finetune.py's config file, then inspect's own flags

Takes every finetune.py flag (paste the training command, swap `python finetune.py` for `python -m sft.inspect`)
and runs finetune.py's own preprocessing: `load_conversations`, `tokenize_conversations` (same cache) and, with
--packing, `pack_dataset`. Only the tokenizer is loaded, never the model's weights. It prints:

- the first --show training rows token by token, trained tokens (those that carry the loss) highlighted: in
  colour on a terminal (alternating shades mark token boundaries), between [[ and ]] when piped; special
  tokens as their text, newlines as ↵;
- a report: samples per format, turns, tokens, trained tokens, length percentiles, samples truncated or dropped
  and why, packing efficiency, optimizer steps per epoch for the batch settings;

and writes the report (data_report.txt, data_report.json) and a histogram of sample lengths with
--model_max_length marked (data_lengths.png) into --report_dir (default: --output_dir). Files already there
are kept unless --overwrite_report is given.
"""

from __future__ import annotations

import sft.quiet

if __name__ == "__main__":
    sft.quiet.setup()  # first: it silences known chatter of the libraries imported below

# isort: split
import json
import logging
import math
import os
import sys
from collections import Counter
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
    Conversation,
    load_data,
    template_overhead,
    tokenize_conversations,
    tokenize_many,
)
from sft.errors import ConfigurationError, run_main
from sft.inspect_view import FATES, format_report, render_row, trained_count, use_color
from sft.modeling import load_tokenizer, read_chat_template
from sft.packing import pack_dataset
from sft.plots import length_histogram_figure, save_figure
from sft.qwen1 import resolve_model_path

REPORT_FILES = ("data_report.txt", "data_report.json", "data_lengths.png")
PERCENTILES = (50, 90, 95, 99, 100)


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


def sample_fate(stats: SampleStats, max_length: int, drop_long: bool) -> str:
    """What training does with a sample, from its untruncated tokens: the rule `tokenize_many` applies (checked
    against the counts `tokenize_conversations` returns, in `inspect_data`)."""
    if stats.status == "dropped_no_label":
        return "dropped_no_label"
    if stats.length <= max_length:
        return "ok"
    if drop_long:
        return "dropped_too_long"
    return "truncated" if stats.labelled_within else "dropped_no_label"


def untruncated_stats(
    conversations: list[Conversation], tokenizer: PreTrainedTokenizerBase, data_args: DataArguments, max_length: int
) -> list[SampleStats]:
    """Each sample tokenised whole by `tokenize_conversations` (cached: rerunning with another --model_max_length
    does not tokenise again), read in batches so that no whole data set of token lists is held in memory."""
    options = dict(
        tokenizer=tokenizer, train_on=data_args.train_on, drop_long=False, fold_system=data_args.fold_system_prompt
    )
    try:
        whole, _ = tokenize_conversations(
            conversations,
            max_length=sys.maxsize,
            num_proc=data_args.preprocessing_num_workers,
            cache_dir=data_args.preprocessing_cache_dir,
            description="untruncated",
            **options,
        )
    except ValueError:  # not one sample with a label
        whole = None
    stats = []
    if whole is not None and len(whole) == len(conversations):
        for batch in whole.iter(batch_size=1000):
            pairs = zip(batch["input_ids"], batch["labels"])
            stats += [sample_stats(input_ids, labels, "ok", max_length) for input_ids, labels in pairs]
        return stats
    # Some sample has no label at all (it is dropped whatever its length): one by one, to know which.
    for start in range(0, len(conversations), 1000):
        for t in tokenize_many(conversations=conversations[start : start + 1000], max_length=sys.maxsize, **options):
            stats.append(sample_stats(t.input_ids, t.labels, t.status, max_length))
    return stats


def percentile_table(values: list[int]) -> dict[str, float]:
    if not values:
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
    where: list[str]  # each training row's origin (sample's line or index; "packed row" when packed)
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
    conversations = load_data(data_args.data_path, data_args.system_prompt, data_args.max_samples)
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
            conversations,
            tokenizer=tokenizer,
            max_length=max_length,
            train_on=data_args.train_on,
            drop_long=data_args.drop_long_samples,
            num_proc=data_args.preprocessing_num_workers,
            cache_dir=data_args.preprocessing_cache_dir,
            fold_system=data_args.fold_system_prompt,
            description="train",
        )
    except ValueError:  # nothing left to train on: the report below says why
        dataset, counts = None, None

    stats = untruncated_stats(conversations, tokenizer, data_args, max_length)
    fates = [sample_fate(sample, max_length, data_args.drop_long_samples) for sample in stats]
    fate_counts = Counter(fates)
    # Plain texts longer than max_length train as several rows (chunks), which the per-sample fates do not count.
    chunked = "text" in (conversations.formats or [])
    if counts is not None and not chunked and +fate_counts != +counts:
        raise RuntimeError(f"sft.inspect disagrees with sft.data on the samples' fates: {fate_counts} != {counts}")
    kept = [k for k, fate in enumerate(fates) if fate in ("ok", "truncated")]

    tokens = trained = 0
    if dataset is not None:
        tokens = sum(dataset["length"])
        for batch in dataset.iter(batch_size=1000):
            trained += sum(trained_count(labels) for labels in batch["labels"])
    lengths = [sample.length for sample in stats]
    lengths_by_fate = {FATES[fate]: [lengths[k] for k, f in enumerate(fates) if f == fate] for fate in FATES}

    packing = None
    # JSONL samples are found by their line; a JSON list's by their index, which is k itself.
    wheres = conversations.wheres
    where = [f"sample {k} ({wheres[k]})" if not wheres[k].startswith("sample") else f"sample {k}" for k in kept]
    if data_args.packing and dataset is not None:
        dataset = pack_dataset(dataset, max_length)
        packing = {
            "rows": len(dataset),
            "samples_per_row": len(kept) / max(1, len(dataset)),
            "efficiency": tokens / max(1, len(dataset) * max_length),
        }
        where = [f"packed row {k}" for k in range(len(dataset))]
    rows = len(dataset) if dataset is not None else 0

    per_device = training_args.per_device_train_batch_size
    accumulation = training_args.gradient_accumulation_steps
    epoch_steps = steps_per_epoch(rows, per_device, accumulation, world_size, training_args.dataloader_drop_last)
    if training_args.max_steps > 0:
        total_steps = training_args.max_steps
    else:
        total_steps = math.ceil(training_args.num_train_epochs * epoch_steps)

    truncated = [stats[k] for k, fate in enumerate(fates) if fate == "truncated"]
    report = {
        "data_path": data_args.data_path,
        "model": model_args.model_name_or_path,
        "model_max_length": max_length,
        "train_on": data_args.train_on,
        "drop_long_samples": data_args.drop_long_samples,
        "system_prompt": data_args.system_prompt,
        "samples": len(conversations),
        "formats": dict(Counter(conversations.formats)),
        "messages": sum(len(messages) for messages in conversations),
        "assistant_turns": sum(_assistant_turns(messages) for messages in conversations),
        "length_percentiles": percentile_table(lengths),
        "length_mean": float(np.mean(lengths)) if lengths else 0.0,
        "fates": {fate: fate_counts[fate] for fate in FATES},
        "kept_samples": len(kept),
        "tokens": tokens,
        "trained_tokens": trained,
        "tokens_cut_by_truncation": sum(sample.length - max_length for sample in truncated),
        "trained_tokens_cut_by_truncation": sum(sample.trained - sample.trained_within for sample in truncated),
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
        title=f"{Path(inspection.report['data_path']).name}: {inspection.report['samples']} samples",
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
