"""Stage 6 of the data pipeline, whole data sets: every conversation tokenised and labelled through
`datasets.map` (batched, multi-process) and cached on disk under a key of the conversations, the tokenizer and the
options, so that an unchanged rerun skips tokenisation.

The template profile is computed once (`sft.data.profile`, which logs it), before the map, and handed to every
batch: the batch size and the number of processes change how the work is split, never a label.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
from collections import Counter
from typing import Any

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from transformers import PreTrainedTokenizerBase

from sft.data.formats import Conversation, TrainOn
from sft.data.housekeeping import cache_folder, mark_used
from sft.data.profile import TemplateProfile, template_profile
from sft.data.reading import DataError
from sft.data.templates import TemplateRefusal, chat_template_of, render
from sft.data.tokenizing import tokenize_samples
from sft.errors import UserError

logger = logging.getLogger("sft.data")


class NothingToTrainError(UserError, ValueError):
    """No sample of a data set is left to train on (all too long, or with no trained token)."""


def _tokenize_batch(
    batch: dict,
    indices: list[int],
    tokenizer,
    max_length: int,
    train_on: TrainOn,
    drop_long: bool,
    fold_system: bool,
    profile: TemplateProfile,
) -> dict:
    conversations = [json.loads(messages) for messages in batch["messages"]]
    out: dict[str, list] = {"input_ids": [], "labels": [], "length": [], "status": [], "folded": []}
    try:
        samples = tokenize_samples(tokenizer, conversations, max_length, train_on, drop_long, fold_system, profile)
    except TemplateRefusal as error:  # name the sample by its index in the whole data set
        raise TemplateRefusal(indices[error.index], error.message) from None
    # Plain texts (continued pre-training) in their places, as one row per chunk.
    tokenized_many = [row for rows in samples for row in rows]
    for tokenized in tokenized_many:
        out["input_ids"].append(tokenized.input_ids)
        out["labels"].append(tokenized.labels)
        out["length"].append(len(tokenized.input_ids))
        out["status"].append(tokenized.status)
        out["folded"].append(tokenized.folded)
    return out


def own_mapping(dataset: datasets.Dataset) -> datasets.Dataset:
    """The same data set over memory mappings of its own, closed once it is dropped (unpickling maps the files
    again). A map batch reads through one: pages read through the data set's long-lived mapping would stay
    resident, counted in the process's memory, until every sample had been read once, so memory would grow with
    the data."""
    return pickle.loads(pickle.dumps(dataset)) if dataset.cache_files else dataset


# Samples tokenised per map batch, and scanned per slice for reasoning.
TOKENIZE_BATCH = 1000
SCAN_SLICE = 10_000


def _tokenize_from(plan: dict, samples: datasets.Dataset, **options: Any) -> dict:
    """`_tokenize_batch` of the TOKENIZE_BATCH samples from `plan`'s start, read through a mapping of their own."""
    start = plan["start"][0]
    batch = own_mapping(samples)[start : start + TOKENIZE_BATCH]
    return _tokenize_batch(batch, list(range(start, start + len(batch["messages"]))), **options)


# Part of every cache key: raised when what tokenisation writes changes (2: eos after unmarked answers, the
# "folded" column; 3: one labelling story, with stops and checks under --train_on all too; 4: read from Arrow,
# tokens stored as int32), so that no older cache file is read as a new one.
CACHE_FORMAT = 4

# Token ids fit in 32 bits (the largest vocabularies have about 260,000): half the disk and page cache of int64.
TOKENIZED_FEATURES = datasets.Features(
    {
        "input_ids": datasets.List(datasets.Value("int32")),
        "labels": datasets.List(datasets.Value("int32")),
        "length": datasets.Value("int32"),
        "status": datasets.Value("string"),
        "folded": datasets.Value("bool"),
    }
)


def tokenized_key(data_key: str, tokenizer, max_length: int, train_on: str, drop_long: bool, *more: Any) -> str:
    digest = hashlib.sha256(data_key.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    vocabulary = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    parts = (CACHE_FORMAT, vocabulary, chat_template_of(tokenizer), type(tokenizer).__name__, max_length, train_on)
    parts += (drop_long, *more)
    for part in parts:
        digest.update(str(part).encode())
    return digest.hexdigest()[:24]


Data = list[Conversation] | datasets.Dataset


def as_dataset(conversations: Data, description: str = "train") -> tuple[datasets.Dataset, str]:
    """(data set with columns messages (JSON), file and place; a key of its content). `read_data`'s data set is
    used as it is, keyed by its fingerprint (which follows its files, named by their content's key); a list of
    conversations (`load_data`'s, or any) is put into one, keyed by a hash of every conversation."""
    if isinstance(conversations, datasets.Dataset):
        return conversations, conversations._fingerprint
    # Each conversation as one JSON string: Arrow stores and hands back strings far faster than nested lists of
    # dicts, and the same strings make the key.
    records = [json.dumps(messages, ensure_ascii=False) for messages in conversations]
    places = [_place(conversations, index, description) for index in range(len(records))]
    digest = hashlib.sha256()
    for record in records:
        digest.update(record.encode())
    files = [file for file, _ in places]
    wheres = [where for _, where in places]
    return datasets.Dataset.from_dict({"messages": records, "file": files, "place": wheres}), digest.hexdigest()


def _place(conversations: Data, index: int, description: str) -> tuple[str, str]:
    """(file, place) of a sample: from `read_data`'s columns, `load_data`'s lists, else its index."""
    if isinstance(conversations, datasets.Dataset):
        if "place" in conversations.column_names:
            row = conversations[index]
            return row["file"], row["place"]
        return f"{description} data", f"sample {index}"
    paths = getattr(conversations, "paths", None)
    wheres = getattr(conversations, "wheres", None)
    if wheres is not None and len(wheres) != len(conversations):  # a list grown after it was read
        paths = wheres = None
    path = paths[index] if paths else getattr(conversations, "path", f"{description} data")
    return path, wheres[index] if wheres else f"sample {index}"


REASONING_PROBE = "reasoning-probe-7f3a"


def _first_with_reasoning(conversations: Data) -> int | None:
    if isinstance(conversations, datasets.Dataset):
        # A scan of the JSON text, in Arrow (no conversation is parsed), in slices each read through a mapping of
        # its own (see own_mapping): a whole-column scan would hold every page of the file resident at its end.
        for start in range(0, len(conversations), SCAN_SLICE):
            messages = own_mapping(conversations).with_format("arrow")[start : start + SCAN_SLICE]["messages"]
            index = pc.index(pc.match_substring(messages, '"reasoning_content"'), True).as_py()
            if index != -1:
                return start + index
        return None
    with_reasoning = (k for k, messages in enumerate(conversations) if any("reasoning_content" in m for m in messages))
    return next(with_reasoning, None)


def check_reasoning_rendered(conversations: Data, tokenizer, description: str = "train") -> None:
    """A DataError naming the first sample with `reasoning_content` when the chat template never writes it (the
    reasoning would silently not be trained on). Templates that drop it only from earlier turns (Qwen3) pass."""
    first = _first_with_reasoning(conversations)
    if first is None:
        return
    probe = [
        {"role": "user", "content": "question"},
        {"role": "assistant", "content": "answer", "reasoning_content": REASONING_PROBE},
    ]
    try:
        rendered = render(tokenizer, probe)
    except Exception:  # noqa: BLE001 - a template that refuses the probe writes no reasoning either
        rendered = ""
    if REASONING_PROBE not in rendered:
        path, where = _place(conversations, first, description)
        raise DataError(
            path,
            where,
            "reasoning_content",
            "the chat template never writes an assistant message's reasoning_content, so it would not be "
            "trained on: use a template that renders it (Qwen3's), or put the reasoning into the content",
        )


def tokenize_conversations(
    conversations: Data,
    tokenizer: PreTrainedTokenizerBase,
    max_length: int,
    train_on: TrainOn = "assistant",
    drop_long: bool = False,
    num_proc: int | None = None,
    cache_dir: str | os.PathLike | None = None,
    description: str = "train",
    fold_system: bool = True,
) -> tuple[datasets.Dataset, Counter]:
    """Tokenised, labelled data set (columns input_ids, labels, length) and the count of each sample's fate
    ("ok", "truncated", "dropped_too_long", "dropped_no_label"), which is also logged.

    `conversations` is `read_data`'s memory-mapped data set (training: no conversation is held in memory) or a
    list of conversations. Results are cached in `cache_dir` (default: the datasets cache) under a key of the
    conversations, the tokenizer and the options, so an unchanged rerun skips tokenisation.

    A conversation the chat template refuses is a `DataError` naming its file and line or sample (when the
    conversations come from `read_data` or `load_data`), and the template's message. Where the template refuses
    only the system message and `fold_system`, the system text goes into the first user message instead.
    """
    check_reasoning_rendered(conversations, tokenizer, description)
    cache_dir = cache_folder(cache_dir)
    dataset, data_key = as_dataset(conversations, description)
    fingerprint = tokenized_key(data_key, tokenizer, max_length, train_on, drop_long, fold_system, tokenizer.eos_token)
    profile = template_profile(tokenizer)  # once, here: the batches and processes of the map all get this one
    options = dict(
        tokenizer=tokenizer,
        max_length=max_length,
        train_on=train_on,
        drop_long=drop_long,
        fold_system=fold_system,
        profile=profile,
    )
    # A memory-mapped data set is read batch by batch through mappings of the batch's own (`own_mapping`): the map
    # runs over the batches' starts. A list's small in-memory data set is mapped directly.
    samples = dataset
    if samples.cache_files:
        plan = datasets.Dataset.from_dict({"start": list(range(0, len(samples), TOKENIZE_BATCH))})
        function, work, batch_size, with_indices = _tokenize_from, plan, 1, False
        options["samples"] = samples
    else:
        function, work, batch_size, with_indices = _tokenize_batch, dataset, TOKENIZE_BATCH, True
    try:
        dataset = work.map(
            function,
            batched=True,
            batch_size=batch_size,
            with_indices=with_indices,
            num_proc=num_proc if num_proc and num_proc > 1 and len(work) > 1 else None,
            remove_columns=work.column_names,
            features=TOKENIZED_FEATURES,
            fn_kwargs=options,
            cache_file_name=str(cache_dir / f"tokenized-{fingerprint}.arrow"),
            new_fingerprint=fingerprint,
            desc=f"Tokenising {description} data" + (f" (batches of {TOKENIZE_BATCH})" if work is not samples else ""),
        )
    except TemplateRefusal as error:
        raise DataError(*_place(samples, error.index, description), None, error.message) from None
    # Counted in Arrow, over the columns alone: no Python object per sample.
    status = dataset.with_format("arrow")["status"]
    folded = pc.sum(dataset.with_format("arrow")["folded"]).as_py() or 0
    if folded:
        logger.info(
            "%s data: the chat template refuses a system message; in %d samples its text was put at the start of "
            "the first user message instead (--fold_system_prompt false makes this an error)",
            description,
            folded,
        )
    for file in dataset.cache_files:
        mark_used(file["filename"])
    counts = Counter({entry["values"]: entry["counts"] for entry in pc.value_counts(status).to_pylist()})
    kept = counts["ok"] + counts["truncated"]
    logger.info(
        "%s data: %d samples kept; %d truncated to model_max_length=%d; %d dropped as longer than it "
        "(--drop_long_samples); %d dropped with no trainable token left",
        description,
        kept,
        counts["truncated"],
        max_length,
        counts["dropped_too_long"],
        counts["dropped_no_label"],
    )
    if kept == 0:
        raise NothingToTrainError(
            f"no {description} sample is left to train on: {dict(counts)} (raise --model_max_length?)"
        )
    if kept < len(dataset):
        keep = pc.is_in(status, value_set=pa.array(["ok", "truncated"]))
        dataset = dataset.select(np.flatnonzero(keep.to_numpy(zero_copy_only=False)))
    return dataset.remove_columns(["status", "folded"]), counts


if __name__ == "__main__":  # python -m sft.data.cache: list or clean the cache (sft.data.housekeeping)
    from sft.data.housekeeping import main

    raise SystemExit(main())
