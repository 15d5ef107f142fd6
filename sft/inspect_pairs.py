"""sft.inspect for preference pairs (`--stage dpo`): dpo.py's own preprocessing of --data_path (`load_train_eval`
with `pair_sample`, then `tokenize_pairs`), each pair's fate, its prompt and answer lengths, and the report.

The rows shown are those `tokenize_pairs` gives training; a second look at each pair (`tokenize_pair`, the
function `tokenize_pairs` applies) gives its fate, place and lengths, and must agree with the counts
`tokenize_pairs` returns and with the rows shown.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import datasets
import numpy as np
from transformers import PreTrainedTokenizerBase

from sft.args import DataArguments, ModelArguments, check_required
from sft.args import TrainingArguments as FinetuneTrainingArguments
from sft.data import IGNORE_INDEX, NothingToTrainError, load_train_eval
from sft.data.pairs import KEPT, TokenizedPair, pair_sample, tokenize_pair, tokenize_pairs
from sft.data.profile import template_profile
from sft.data.reading import DataError
from sft.inspect_survey import BATCH_SIZE, percentile_table, steps_per_epoch
from sft.inspect_view import render_row, trained_count
from sft.model_setup import tokenizer_or_error
from sft.preference import PreferenceArguments, check_preference_arguments, sft_adapter_of

PAIR_FATES = {
    "ok": "fit",
    "truncated": "truncated to --model_max_length (oldest prompt turns dropped first, then answer tails cut)",
    "dropped_equal": "dropped: chosen and rejected answers are the same",
    "dropped_no_label": "dropped: no answer token left in a side",
}
PLOTTED_FATES = {"ok": "fit", "truncated": "truncated", "dropped_equal": "dropped: equal answers",
                 "dropped_no_label": "dropped: no answer token left"}  # fmt: skip
FORMAT_NAMES = {
    "sharegpt_ranking": "sharegpt ranking 'conversations'",
    "messages_ranking": "'messages' + chosen/rejected",
    "alpaca_ranking": "alpaca ranking",
    "explicit_prompt": "prompt/chosen/rejected",
    "implicit_prompt": "chosen/rejected (implicit prompt)",
}
UNTRUNCATED = 2**62


def _missing_pair_keys(error: DataError) -> bool:
    return error.field in ("chosen", "rejected") and "a preference pair needs" in str(error)


def pair_data_error(pair_error: DataError, sft_error: DataError | None) -> DataError | None:
    """`--stage auto`: which reading's error a user should see. Data read as pairs gave `pair_error`; the same
    data read as finetune.py's gave `sft_error` (None: not tried yet, or read well). Records without 'chosen' and
    'rejected' make it SFT data (None until read as such: then its error, if any); records refused for pair
    reasons of their own make it pair data."""
    errors = getattr(pair_error, "errors", [pair_error])
    if not any(_missing_pair_keys(e) for e in errors):
        return pair_error
    if sft_error is None:
        return None
    return pair_error if any(e.field is not None and not _missing_pair_keys(e) for e in errors) else sft_error


def shared_prompt_length(pair: dict) -> int:
    """The tokens both rows of a tokenised pair start with, up to the first trained one: the prompt training
    gives the model (after truncation's dropped turns) before either answer."""
    chosen, rejected = pair["chosen_input_ids"], pair["rejected_input_ids"]
    chosen_labels, rejected_labels = pair["chosen_labels"], pair["rejected_labels"]
    n = 0
    while (n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]
           and chosen_labels[n] == IGNORE_INDEX and rejected_labels[n] == IGNORE_INDEX):  # fmt: skip
        n += 1
    return n


def as_row(tokenized: TokenizedPair) -> dict:
    return {"chosen_input_ids": tokenized.chosen_ids, "chosen_labels": tokenized.chosen_labels,
            "rejected_input_ids": tokenized.rejected_ids, "rejected_labels": tokenized.rejected_labels}  # fmt: skip


@dataclass
class PairInspection:
    report: dict
    dataset: datasets.Dataset | None  # the training pairs: chosen/rejected input_ids and labels
    where: list[str]  # the first kept pairs' origins ("file, line N"), in the dataset's order
    lengths_by_fate: dict[str, list[int]]  # each pair's longer side, untruncated
    tokenizer: PreTrainedTokenizerBase
    format: Callable[[dict], str]  # the report as text


def inspect_pairs(
    model_args: ModelArguments,
    data_args: DataArguments,
    training_args: FinetuneTrainingArguments,
    preference_args: PreferenceArguments,
    world_size: int = 1,
    show: int = 3,
    tokenizer: PreTrainedTokenizerBase | None = None,
    lora_weight_path: str | None = None,
) -> PairInspection:
    """dpo.py's preprocessing of --data_path and what it did to each pair; the first `show` kept pairs' origins.
    Raises a UserError for what dpo.py would refuse (bad pair data, a prompt that is not a prefix of prompt +
    answer, a template's refusal). `lora_weight_path`: dpo.py's --lora_weight_path (an SFT adapter)."""
    check_required(model_args, data_args)
    check_preference_arguments(preference_args)
    max_length = training_args.model_max_length
    train, evaluation = load_train_eval(data_args, training_args.seed, parse=pair_sample)
    validation = len(evaluation) if data_args.val_size is not None and evaluation is not None else None
    if tokenizer is None:  # dpo.py's: an SFT adapter output's own tokenizer (its chat template), else the base's
        base, adapter = sft_adapter_of(model_args.model_name_or_path, lora_weight_path)
        source = adapter if adapter and Path(adapter, "tokenizer_config.json").is_file() else base
        tokenizer = tokenizer_or_error(replace(model_args, model_name_or_path=source), max_length)
    try:
        dataset, counts = tokenize_pairs(train, tokenizer, max_length, num_proc=data_args.preprocessing_num_workers,
                                         cache_dir=data_args.preprocessing_cache_dir, description="train",
                                         fold_system=data_args.fold_system_prompt)  # fmt: skip
    except NothingToTrainError:  # every pair dropped: the report below says why
        dataset, counts = None, None

    profile = template_profile(tokenizer)
    fates, formats, turns_dropped = Counter(), Counter(), 0
    lengths_by_fate: dict[str, list[int]] = {PLOTTED_FATES[fate]: [] for fate in PAIR_FATES}
    where, first_rows = [], []
    prompt, chosen, rejected, chosen_trained, rejected_trained = [], [], [], [], []
    for batch in train.iter(batch_size=BATCH_SIZE):
        for text, file, place, form in zip(batch["messages"], batch["file"], batch["place"], batch["format"]):
            pair = json.loads(text)
            tokenized = tokenize_pair(tokenizer, pair, max_length, data_args.fold_system_prompt, profile)
            fates[tokenized.status] += 1
            formats[form] += 1
            turns_dropped += tokenized.dropped_turns
            whole = tokenized if tokenized.status == "ok" else tokenize_pair(
                tokenizer, pair, UNTRUNCATED, data_args.fold_system_prompt, profile)  # fmt: skip
            if whole.chosen_ids:
                lengths_by_fate[PLOTTED_FATES[tokenized.status]].append(max(len(whole.chosen_ids),
                                                                         len(whole.rejected_ids)))  # fmt: skip
            if tokenized.status not in KEPT:
                continue
            row = as_row(tokenized)
            if len(first_rows) < show:
                first_rows.append(row)
                where.append(f"{file}, {place}")
            shared = shared_prompt_length(row)
            prompt.append(shared)
            chosen.append(len(tokenized.chosen_ids) - shared)
            rejected.append(len(tokenized.rejected_ids) - shared)
            chosen_trained.append(trained_count(tokenized.chosen_labels))
            rejected_trained.append(trained_count(tokenized.rejected_labels))
    shown = [] if dataset is None else [dataset[k] for k in range(min(show, len(dataset)))]
    agrees = not (fates["ok"] + fates["truncated"]) if counts is None else +counts == +fates
    if not agrees or [as_row_of(r) for r in shown] != first_rows[: len(shown)]:
        raise RuntimeError(f"sft.inspect disagrees with sft.data.pairs on the pairs' fates: {fates} != {counts}")

    kept = len(prompt)
    rows = len(dataset) if dataset is not None else 0
    per_device, accumulation = training_args.per_device_train_batch_size, training_args.gradient_accumulation_steps
    epoch_steps = steps_per_epoch(rows, per_device, accumulation, world_size, training_args.dataloader_drop_last)
    total_steps = training_args.max_steps if training_args.max_steps > 0 else int(
        np.ceil(training_args.num_train_epochs * epoch_steps))  # fmt: skip
    chosen_trained, rejected_trained = np.asarray(chosen_trained), np.asarray(rejected_trained)
    report = {
        "stage": "dpo",
        "data_path": list(data_args.data_path),
        "model": model_args.model_name_or_path,
        "model_max_length": max_length,
        "preference": asdict(preference_args),
        "system_prompt": data_args.system_prompt,
        "samples": len(train),
        "val_size": data_args.val_size,
        "validation_samples": validation,
        "formats": dict(formats),
        "fates": {fate: fates[fate] for fate in PAIR_FATES},
        "prompt_turns_dropped": turns_dropped,
        "kept_pairs": kept,
        "prompt_tokens": percentile_table(np.asarray(prompt)),
        "chosen_tokens": percentile_table(np.asarray(chosen)),
        "rejected_tokens": percentile_table(np.asarray(rejected)),
        "chosen_trained_mean": float(chosen_trained.mean()) if kept else 0.0,
        "rejected_trained_mean": float(rejected_trained.mean()) if kept else 0.0,
        "chosen_longer_share": float((chosen_trained > rejected_trained).mean()) if kept else 0.0,
        "rejected_longer_share": float((chosen_trained < rejected_trained).mean()) if kept else 0.0,
        "training_pairs": rows,
        "per_device_train_batch_size": per_device,
        "gradient_accumulation_steps": accumulation,
        "world_size": world_size,
        "pairs_per_step": per_device * accumulation * world_size,
        "steps_per_epoch": epoch_steps,
        "total_steps": total_steps,
        "num_train_epochs": training_args.num_train_epochs,
        "max_steps": training_args.max_steps,
    }
    return PairInspection(report, dataset, where, lengths_by_fate, tokenizer, format_pair_report)


def as_row_of(row: dict) -> dict:
    return {key: list(row[key]) for key in ("chosen_input_ids", "chosen_labels", "rejected_input_ids",
                                            "rejected_labels")}  # fmt: skip


def render_pair(tokenizer: PreTrainedTokenizerBase, row: dict, where: str, color: bool) -> str:
    """A training pair: its shared prompt once, then each answer with its trained tokens highlighted."""
    shared = shared_prompt_length(row)
    sides = [(side, row[f"{side}_input_ids"], row[f"{side}_labels"]) for side in ("chosen", "rejected")]
    summary = "; ".join(f"{side} {len(ids) - shared} ({trained_count(labels)} trained)" for side, ids, labels in sides)
    lines = [f"===== {where}: prompt {shared} tokens; {summary} =====", "--- prompt ---"]
    lines.append(render_row(tokenizer, row["chosen_input_ids"][:shared], [IGNORE_INDEX] * shared, None, color))
    for side, ids, labels in sides:
        lines += [f"--- {side} ---", render_row(tokenizer, ids, labels, None, color, from_token=shared).rstrip("\n")]
    return "\n".join(line.rstrip("\n") for line in lines)


def format_pair_report(report: dict) -> str:
    r = report
    lines = [f"Pairs: {' '.join(r['data_path'])} ({r['samples']} pairs), tokenizer of {r['model']}"]
    if r["validation_samples"] is not None:
        lines.append(f"  validation:     {r['validation_samples']} more pairs cut off by --val_size {r['val_size']:g} "
                     "(not in the figures below)")  # fmt: skip
    formats = ", ".join(f"{FORMAT_NAMES.get(k, k)} {v}" for k, v in sorted(r["formats"].items()))
    lines.append(f"  formats:        {formats}")
    lines.append(f"Preprocessing (--model_max_length {r['model_max_length']}, as dpo.py):")
    for fate, text in PAIR_FATES.items():
        if fate == "ok" or r["fates"][fate]:
            lines.append(f"  {r['fates'][fate]:>6} {text}")
    if r["prompt_turns_dropped"]:
        lines.append(f"         truncation drops {r['prompt_turns_dropped']} oldest prompt turns in all")
    lines.append(f"  kept:           {r['kept_pairs']} pairs")
    for name in ("prompt", "chosen", "rejected"):
        table = ", ".join(f"{k} {v:.0f}" for k, v in r[f"{name}_tokens"].items()) or "-"
        lines.append(f"  {name + ':':<16}{table} tokens")
    lines.append(
        f"  answer length:  chosen {r['chosen_trained_mean']:.1f}, rejected {r['rejected_trained_mean']:.1f} trained "
        "tokens on average"
    )
    lines.append(
        f"                  chosen longer in {r['chosen_longer_share']:.0%} of pairs, rejected in "
        f"{r['rejected_longer_share']:.0%} (DPO learns what tells them apart, length included)"
    )
    lines.append(
        f"Batches: {r['per_device_train_batch_size']} pairs x {r['gradient_accumulation_steps']} accumulation "
        f"x {r['world_size']} process(es) = {r['pairs_per_step']} pairs per optimizer step"
    )
    total = (f"--max_steps {r['max_steps']}" if r["max_steps"] > 0
             else f"{r['total_steps']} steps in {r['num_train_epochs']:g} epoch(s)")  # fmt: skip
    lines.append(f"  {r['steps_per_epoch']} optimizer steps per epoch; {total}")
    return "\n".join(lines)
