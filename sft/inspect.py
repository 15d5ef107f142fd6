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

Preference pairs (dpo.py's data; sft/inspect_pairs.py): dpo.py's command line or config file works the same way,
its preference flags accepted. `--stage auto` (the default) inspects records with 'chosen' and 'rejected' as dpo.py's
pairs, others as finetune.py's data; `--stage sft` or `--stage dpo` chooses.
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
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

import datasets
import numpy as np
from transformers import PreTrainedTokenizerBase

from sft.args import DataArguments, LoraArguments, ModelArguments, check_required, parse_dataclasses
from sft.args import TrainingArguments as FinetuneTrainingArguments
from sft.data import (
    NothingToTrainError,
    load_train_eval,
    template_overhead,
    tokenize_conversations,
)
from sft.data.reading import DataError
from sft.errors import ConfigurationError, run_main
from sft.inspect_pairs import PairInspection, inspect_pairs, pair_data_error, render_pair
from sft.inspect_survey import (
    BATCH_SIZE,
    RowOrigins,
    expected_row_counts,
    percentile_table,
    steps_per_epoch,
    survey_samples,
    untruncated_stats,
)
from sft.inspect_view import FATES, format_report, render_row, trained_count, use_color
from sft.model_setup import tokenizer_or_error
from sft.packing import pack_dataset
from sft.plots import length_histogram_figure, save_figure
from sft.preference import PreferenceArguments
from sft.qwen1 import resolve_model_path

REPORT_FILES = ("data_report.txt", "data_report.json", "data_lengths.png")


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
    stage: Literal["auto", "sft", "dpo"] = field(
        default="auto",
        metadata={
            "help": "The data as finetune.py (sft) or as dpo.py (dpo: preference pairs) prepares it. auto: dpo for "
            "records with 'chosen' and 'rejected', sft otherwise."
        },
    )
    add_markers: bool = field(default=False, init=False)  # finetune.py's --train_special_tokens, given with its flags
    preference: PreferenceArguments | None = field(default=None, init=False)  # dpo.py's, given with its flags
    lora_weight_path: str | None = field(default=None, init=False)  # an SFT adapter dpo.py starts from


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
    """finetune.py's (or dpo.py's) arguments (flags, or its config file then flags) and inspect's own flags."""
    dataclass_types = (ModelArguments, DataArguments, InspectTrainingArguments, LoraArguments, PreferenceArguments,
                       InspectArguments)  # fmt: skip
    model_args, data_args, training_args, lora_args, preference_args, inspect_args = parse_dataclasses(
        dataclass_types, argv
    )
    inspect_args.add_markers = lora_args.train_special_tokens
    inspect_args.preference = preference_args
    inspect_args.lora_weight_path = lora_args.lora_weight_path
    return model_args, data_args, training_args, inspect_args


@dataclass
class Inspection:
    report: dict
    dataset: datasets.Dataset | None  # the training rows: input_ids, labels (and position_ids when packed)
    where: Sequence[str]  # each training row's origin (sample's line or index and chunk; "packed row" when packed)
    lengths_by_fate: dict[str, list[int]]
    tokenizer: PreTrainedTokenizerBase
    format: Callable[[dict], str] = format_report  # the report as text


def inspect_data(
    model_args: ModelArguments,
    data_args: DataArguments,
    training_args: FinetuneTrainingArguments,
    world_size: int = 1,
    tokenizer: PreTrainedTokenizerBase | None = None,
    add_markers: bool = False,
) -> Inspection:
    """finetune.py's preprocessing of --data_path, and what it did to each sample. Raises a UserError for what
    finetune.py would refuse; `add_markers`: --train_special_tokens (a --chat_template's markers added)."""
    check_required(model_args, data_args)
    max_length = training_args.model_max_length
    # finetune.py's own reading: the same memory-mapped data set, --val_size's cut and --max_samples.
    train, evaluation = load_train_eval(data_args, training_args.seed)
    validation_samples = len(evaluation) if data_args.val_size is not None and evaluation is not None else None
    if tokenizer is None:  # finetune.py's, with its checks
        resolved = replace(model_args, model_name_or_path=resolve_model_path(model_args.model_name_or_path))
        tokenizer = tokenizer_or_error(resolved, max_length, add_markers, tokenizer_max_length=max_length)
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


def write_report(inspection: Inspection | PairInspection, report_dir: Path) -> list[Path]:
    report_dir.mkdir(parents=True, exist_ok=True)
    text, data, picture = (report_dir / name for name in REPORT_FILES)
    text.write_text(inspection.format(inspection.report) + "\n")
    unit = "pairs" if isinstance(inspection, PairInspection) else "samples"
    data.write_text(json.dumps(inspection.report, indent=2) + "\n")
    figure = length_histogram_figure(
        inspection.lengths_by_fate,
        inspection.report["model_max_length"],
        title=f"{' '.join(Path(name).name for name in inspection.report['data_path'])}: "
        f"{inspection.report['samples']} {unit}",
    )
    save_figure(figure, picture)
    return [text, data, picture]


def run_inspection(argv: list[str]) -> Inspection | PairInspection:
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
    show = max(0, inspect_args.show)

    def pairs() -> PairInspection:
        return inspect_pairs(model_args, data_args, training_args, inspect_args.preference, world_size, show,
                             lora_weight_path=inspect_args.lora_weight_path)  # fmt: skip

    def samples() -> Inspection:
        return inspect_data(model_args, data_args, training_args, world_size, add_markers=inspect_args.add_markers)

    if inspect_args.stage != "auto":
        inspection = pairs() if inspect_args.stage == "dpo" else samples()
    else:  # pairs where the records are pairs ('chosen' and 'rejected'); finetune.py's data otherwise
        try:
            inspection = pairs()
        except DataError as pair_error:
            if pair_data_error(pair_error, None) is not None:
                raise
            try:
                inspection = samples()
            except DataError as sft_error:
                raise pair_data_error(pair_error, sft_error) from None

    color = use_color(inspect_args.color)
    tokenizer = inspection.tokenizer
    dataset = inspection.dataset
    shown = dataset.select(range(min(len(dataset), show))) if dataset is not None else []
    legend = "highlighted" if color else "between [[ and ]]"
    if isinstance(inspection, PairInspection):
        if len(shown):
            print(f"Preference pairs as dpo.py trains them: the shared prompt, then the chosen and the rejected "
                  f"answer; the tokens that carry the loss are {legend}.\n")  # fmt: skip
        for where, row in zip(inspection.where, shown):
            print(render_pair(tokenizer, row, where, color) + "\n")
    elif len(shown):
        print(f"Training rows as the model sees them; the tokens that carry the loss are {legend}.\n")
        for where, row in zip(inspection.where, shown):
            trained = trained_count(row["labels"])
            print(f"===== {where}: {len(row['input_ids'])} tokens, {trained} trained =====")
            print(render_row(tokenizer, row["input_ids"], row["labels"], row.get("position_ids"), color).rstrip("\n"))
            print()
    print(inspection.format(inspection.report))
    for path in write_report(inspection, report_dir):
        print(f"Wrote {path}")
    if isinstance(inspection, PairInspection) and inspection.report["kept_pairs"] == 0:
        raise ConfigurationError("no pair is left to train on (raise --model_max_length?)")
    if isinstance(inspection, Inspection) and inspection.report["kept_samples"] == 0:
        raise ConfigurationError("no sample is left to train on (raise --model_max_length?)")
    return inspection


def main(argv: list[str] | None = None) -> None:
    run_main(lambda: run_inspection(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    main()
