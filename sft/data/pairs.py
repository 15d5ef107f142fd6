"""Preference pairs, the data stage of dpo.py: each record read as a prompt with a chosen and a rejected answer,
then tokenised with the model's chat template and labelled by the same rules as SFT data.

Formats, detected per sample (after the `chosen` and `rejected` keys that make a record a pair):
- `conversations` (ShareGPT from/value) or `messages` (role/content) holding the prompt, with `chosen` and
  `rejected` each one answer message (LLaMA-Factory's sharegpt ranking), a list of one, or a string;
- alpaca ranking: `instruction`, optional `input` and `system`, `chosen` and `rejected` strings;
- trl's explicit prompt: `prompt` a string (one user turn) or a message list; the answers strings or lists of one
  assistant message;
- trl's implicit prompt: `chosen` and `rejected` whole conversations (the prompt is their longest shared message
  prefix), or two strings (the prompt is their shared text prefix, as one user turn).
`tools` and system prompts are read as for SFT (`sft.data.formats`).

Tokenising (`tokenize_pair`): prompt = every message before the final answer, rendered with a generation prompt;
each side = prompt + answer, labelled as SFT labels the last answer (its end-of-turn or stop included). The prompt's
tokens must be a prefix of each side's, or the sample is an error. A side longer than `max_length` first loses the
prompt's oldest turns (system and tools stay; the final user turn always stays), then its answer's tail. Pairs
with equal answers, or with no answer token left in a side, are dropped. Every fate is counted and logged.
"""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from transformers import PreTrainedTokenizerBase

from sft.data.cache import NothingToTrainError, as_dataset, own_mapping, tokenized_key
from sft.data.formats import (
    TOOLS_ROLE,
    Conversation,
    Message,
    content_field,
    record_turns,
    text_field,
    tools_field,
    with_default_system,
)
from sft.data.housekeeping import cache_folder, mark_used
from sft.data.labels import IGNORE_INDEX
from sft.data.profile import TemplateProfile, template_profile
from sft.data.reading import DataError
from sft.data.templates import TemplateRefusal, fold_system_message, render
from sft.data.tokenizing import tokenize_many

logger = logging.getLogger("sft.data")

PAIR_KEYS = ("chosen", "rejected")
KEPT = ("ok", "truncated")


def _answer(record: dict, key: str, role_key: str, content_key: str, path: Path, where: str) -> Message:
    """One side's answer: a string, an answer message, or a list of one answer message."""
    value = record[key]
    if isinstance(value, str):
        return {"role": "assistant", "content": content_field(value, path, where, key)}
    messages = record_turns(
        {key: [value] if isinstance(value, dict) else value}, key, role_key, content_key, path, where
    )
    if len(messages) != 1 or messages[0]["role"] != "assistant":
        raise DataError(path, where, key, "expected one assistant answer (the prompt goes in its own field)")
    return messages[0]


def _implicit(record: dict, path: Path, where: str) -> tuple[Conversation, Message, Message]:
    """trl's implicit prompt: the longest shared prefix of two strings or of two conversations."""
    chosen, rejected = record["chosen"], record["rejected"]
    if isinstance(chosen, str) and isinstance(rejected, str):
        shared = os.path.commonprefix([chosen, rejected])
        if not shared.strip():
            raise DataError(path, where, "prompt", "missing, and the two answers share no prompt text")
        answers = [
            {"role": "assistant", "content": content_field(text[len(shared) :], path, where, key)}
            for key, text in (("chosen", chosen), ("rejected", rejected))
        ]
        return [{"role": "user", "content": shared}], answers[0], answers[1]
    if not isinstance(chosen, list) or not isinstance(rejected, list):
        raise DataError(path, where, "chosen", "chosen and rejected must both be strings or both message lists")
    sides = [record_turns(record, key, "role", "content", path, where) for key in PAIR_KEYS]
    common = 0
    while common < min(map(len, sides)) and sides[0][common] == sides[1][common]:
        common += 1
    for key, side in zip(PAIR_KEYS, sides):
        if len(side) - common != 1 or side[-1]["role"] != "assistant":
            raise DataError(
                path, where, key, "expected the shared prompt followed by one assistant answer that differs"
            )
    return sides[0][:common], sides[0][-1], sides[1][-1]


def parse_pair(record: Any, path: str | os.PathLike, where: str) -> tuple[dict, str]:
    """One record as a pair {"prompt": messages, "chosen": message, "rejected": message}, checked field by field,
    and its format's name; a DataError naming file, place and field otherwise."""
    path = Path(path)
    if not isinstance(record, dict):
        raise DataError(path, where, None, f"expected a JSON object, got {type(record).__name__}")
    missing = [key for key in PAIR_KEYS if key not in record]
    if missing:
        found = ", ".join(repr(k) for k in record) or "none"
        raise DataError(
            path, where, missing[0], f"missing: a preference pair needs 'chosen' and 'rejected' (keys found: {found})"
        )
    if "conversations" in record or "messages" in record:
        key, role_key, content_key = (
            ("conversations", "from", "value") if "conversations" in record else ("messages", "role", "content")
        )
        prompt = record_turns(record, key, role_key, content_key, path, where)
        chosen, rejected = (_answer(record, k, role_key, content_key, path, where) for k in PAIR_KEYS)
        form = "sharegpt_ranking" if key == "conversations" else "messages_ranking"
    elif "instruction" in record:
        instruction = text_field(record["instruction"], path, where, "instruction")
        extra = text_field(record.get("input") or "", path, where, "input", allow_empty=True)
        prompt = [{"role": "user", "content": f"{instruction}\n{extra}" if extra.strip() else instruction}]
        chosen, rejected = (_answer(record, k, "role", "content", path, where) for k in PAIR_KEYS)
        form = "alpaca_ranking"
    elif "prompt" in record:
        if isinstance(record["prompt"], str):
            prompt = [{"role": "user", "content": content_field(record["prompt"], path, where, "prompt")}]
        else:
            prompt = record_turns(record, "prompt", "role", "content", path, where)
        chosen, rejected = (_answer(record, k, "role", "content", path, where) for k in PAIR_KEYS)
        form = "explicit_prompt"
    else:
        prompt, chosen, rejected = _implicit(record, path, where)
        form = "implicit_prompt"
    if record.get("system") and not any(m["role"] == "system" for m in prompt):
        prompt.insert(0, {"role": "system", "content": text_field(record["system"], path, where, "system")})
    for index, message in enumerate(prompt):
        if message["role"] == "system" and index != 0:
            raise DataError(path, where, "prompt", f"message {index}: a system message may only come first")
    if not prompt or prompt[-1]["role"] not in ("user", "tool"):
        raise DataError(path, where, "prompt", "must end with a user turn (or a tool result) that the answers answer")
    if record.get("tools") not in (None, "", []):
        prompt.insert(0, {"role": TOOLS_ROLE, "tools": tools_field(record["tools"], path, where)})
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}, form


def pair_sample(record: Any, file: str, where: str, system: str | None) -> tuple[dict, str]:
    """`parse_pair` as a source reader (`sft.data.sources`) takes it: with the default system prompt."""
    pair, form = parse_pair(record, file, where)
    with_default_system(pair["prompt"], system)
    return pair, form


def pair_conversation(pair: dict) -> Conversation:
    """The pair's prompt and chosen answer as one conversation (a sample for checks such as merge_lora.py's)."""
    return [*pair["prompt"], pair["chosen"]]


@dataclass
class TokenizedPair:
    status: str  # "ok", "truncated", "dropped_equal", "dropped_no_label"
    chosen_ids: list[int] = field(default_factory=list)
    chosen_labels: list[int] = field(default_factory=list)
    rejected_ids: list[int] = field(default_factory=list)
    rejected_labels: list[int] = field(default_factory=list)
    dropped_turns: int = 0


class PromptMismatch(ValueError):
    """The prompt's tokens are not a prefix of prompt + answer's."""


def _oldest_turn_dropped(prompt: Conversation) -> Conversation | None:
    """The prompt without its oldest turn (a user message and what follows it up to the next user message);
    system and tools stay. None when only the final user turn is left."""
    head = [m for m in prompt if m["role"] in ("system", TOOLS_ROLE)]
    turns = [m for m in prompt if m["role"] not in ("system", TOOLS_ROLE)]
    users = [k for k, m in enumerate(turns) if m["role"] == "user"]
    if len(users) < 2:
        return None
    return head + turns[users[1] :]


def _sides(tokenizer, pair: dict, prompt: Conversation, fold_system: bool, profile: TemplateProfile):
    """(ids, labels) of prompt + chosen and prompt + rejected, checked against the prompt's own tokens; None when
    the labelling rules leave a side nothing to train."""
    sides = tokenize_many(
        tokenizer,
        [prompt + [pair["chosen"]], prompt + [pair["rejected"]]],
        max_length=2**62,
        train_on="last_assistant",
        fold_system=fold_system,
        profile=profile,
    )
    if any(side.status == "dropped_no_label" for side in sides):
        return None, 0
    shown = fold_system_message(prompt) if sides[0].folded and fold_system_message(prompt) else prompt
    prompt_ids = tokenizer.encode(render(tokenizer, shown, add_generation_prompt=True), add_special_tokens=False)
    result = []
    for key, side in zip(PAIR_KEYS, sides):
        if side.input_ids[: len(prompt_ids)] != prompt_ids:
            raise PromptMismatch(
                f"the prompt's {len(prompt_ids)} tokens, rendered alone with a generation prompt, are not the first "
                f"tokens of prompt + {key} answer (the chat template writes the prompt differently before an answer)"
            )
        labels = list(side.labels)
        labels[: len(prompt_ids)] = [IGNORE_INDEX] * len(prompt_ids)  # the answer alone is trained
        result.append((side.input_ids, labels))
    return result, len(prompt_ids)


def tokenize_pair(
    tokenizer: PreTrainedTokenizerBase,
    pair: dict,
    max_length: int,
    fold_system: bool = True,
    profile: TemplateProfile | None = None,
) -> TokenizedPair:
    """A pair's two token rows and labels, truncated to `max_length` tokens each (see the module's docstring).
    Raises PromptMismatch, or TemplateRefusal (index 0) when the template refuses the pair."""
    profile = profile or template_profile(tokenizer)
    if pair["chosen"] == pair["rejected"]:
        return TokenizedPair("dropped_equal")
    prompt, dropped = pair["prompt"], 0
    sides, _ = _sides(tokenizer, pair, prompt, fold_system, profile)
    while sides is not None and max(len(ids) for ids, _ in sides) > max_length:
        shorter = _oldest_turn_dropped(prompt)
        if shorter is None:
            break
        prompt, dropped = shorter, dropped + 1
        sides, _ = _sides(tokenizer, pair, prompt, fold_system, profile)
    if sides is None:
        return TokenizedPair("dropped_no_label", dropped_turns=dropped)
    chosen, rejected = sides
    status = "truncated" if dropped else "ok"
    if max(len(chosen[0]), len(rejected[0])) > max_length:  # the answers keep their start
        chosen, rejected = [(ids[:max_length], labels[:max_length]) for ids, labels in (chosen, rejected)]
        status = "truncated"
    if any(all(label == IGNORE_INDEX for label in labels) for _, labels in (chosen, rejected)):
        return TokenizedPair("dropped_no_label", dropped_turns=dropped)
    if chosen[0] == rejected[0]:  # answers that differed only in their cut tails
        return TokenizedPair("dropped_equal", dropped_turns=dropped)
    return TokenizedPair(status, chosen[0], chosen[1], rejected[0], rejected[1], dropped)


PAIR_FEATURES = datasets.Features(
    {
        "chosen_input_ids": datasets.List(datasets.Value("int32")),
        "chosen_labels": datasets.List(datasets.Value("int32")),
        "rejected_input_ids": datasets.List(datasets.Value("int32")),
        "rejected_labels": datasets.List(datasets.Value("int32")),
        "status": datasets.Value("string"),
        "dropped_turns": datasets.Value("int32"),
    }
)


def _tokenize_pair_batch(batch: dict, tokenizer, max_length: int, fold_system: bool, profile) -> dict:
    out: dict[str, list] = {name: [] for name in PAIR_FEATURES}
    for text, file, place in zip(batch["messages"], batch["file"], batch["place"]):
        try:
            tokenized = tokenize_pair(tokenizer, json.loads(text), max_length, fold_system, profile)
        except PromptMismatch as error:
            raise DataError(file, place, "prompt", str(error)) from None
        except TemplateRefusal as error:
            raise DataError(file, place, None, error.message) from None
        for name, value in zip(
            PAIR_FEATURES,
            (
                tokenized.chosen_ids,
                tokenized.chosen_labels,
                tokenized.rejected_ids,
                tokenized.rejected_labels,
                tokenized.status,
                tokenized.dropped_turns,
            ),
        ):
            out[name].append(value)
    return out


def _tokenize_pairs_from(plan: dict, samples: datasets.Dataset, **options: Any) -> dict:
    """`_tokenize_pair_batch` of the PAIR_BATCH pairs from `plan`'s start, read through a mapping of their own (as
    sft.data.cache tokenises conversations: memory stays bounded however many pairs there are)."""
    start = plan["start"][0]
    return _tokenize_pair_batch(own_mapping(samples)[start : start + PAIR_BATCH], **options)


PAIRS_FORMAT = 1  # part of the cache key: raised when what tokenising pairs writes changes
PAIR_BATCH = 256  # pairs tokenised per map batch


def tokenize_pairs(
    pairs: list[dict] | datasets.Dataset,
    tokenizer: PreTrainedTokenizerBase,
    max_length: int,
    num_proc: int | None = None,
    cache_dir: str | os.PathLike | None = None,
    description: str = "train",
    fold_system: bool = True,
) -> tuple[datasets.Dataset, Counter]:
    """Every pair tokenised (`tokenize_pair`), cached on disk under a key of the pairs, the tokenizer and the
    options; the fates counted and logged; dropped pairs left out. `pairs` is `read_data(..., parse=pair_sample)`'s
    data set or a list of pairs."""
    cache_dir = cache_folder(cache_dir)
    dataset, data_key = as_dataset(pairs, description)
    fingerprint = tokenized_key(data_key, tokenizer, max_length, "pairs", False, fold_system, PAIRS_FORMAT)
    options = dict(tokenizer=tokenizer, max_length=max_length, fold_system=fold_system,
                   profile=template_profile(tokenizer))  # fmt: skip
    # A memory-mapped data set is read batch by batch through mappings of the batch's own; a list's is mapped as is.
    if dataset.cache_files:
        work = datasets.Dataset.from_dict({"start": list(range(0, len(dataset), PAIR_BATCH))})
        function, batch_size, options["samples"] = _tokenize_pairs_from, 1, dataset
    else:
        work, function, batch_size = dataset, _tokenize_pair_batch, PAIR_BATCH
    tokenized = work.map(
        function,
        batched=True,
        batch_size=batch_size,
        num_proc=num_proc if num_proc and num_proc > 1 and len(dataset) > PAIR_BATCH else None,
        remove_columns=work.column_names,
        features=PAIR_FEATURES,
        fn_kwargs=options,
        cache_file_name=str(cache_dir / f"pairs-{fingerprint}.arrow"),
        new_fingerprint=fingerprint,
        desc=f"Tokenising {description} pairs",
    )
    for file in tokenized.cache_files:
        mark_used(file["filename"])
    table = tokenized.with_format("arrow")
    status = table["status"]
    counts = Counter({entry["values"]: entry["counts"] for entry in pc.value_counts(status).to_pylist()})
    turns = pc.sum(table["dropped_turns"]).as_py() or 0
    kept = counts["ok"] + counts["truncated"]
    logger.info(
        "%s pairs: %d kept; %d truncated to model_max_length=%d (%d oldest prompt turns dropped, then answer tails "
        "cut); %d dropped with equal answers; %d dropped with no answer token left",
        description,
        kept,
        counts["truncated"],
        max_length,
        turns,
        counts["dropped_equal"],
        counts["dropped_no_label"],
    )
    if kept == 0:
        raise NothingToTrainError(f"no {description} pair is left to train on: {dict(counts)}")
    if kept < len(tokenized):
        keep = pc.is_in(status, value_set=pa.array(list(KEPT)))
        tokenized = tokenized.select(np.flatnonzero(keep.to_numpy(zero_copy_only=False)))
    return tokenized.remove_columns(["status", "dropped_turns"]), counts


def _pad(rows: list[list[int]], value: int) -> torch.Tensor:
    width = max(map(len, rows))
    return torch.tensor([row + [value] * (width - len(row)) for row in rows], dtype=torch.long)


@dataclass
class PairCollator:
    """A batch of pairs as one padded batch of rows: the chosen sides, then the rejected sides, in pair order
    (with the pairs' numbers, `pair_ids`, where the reference's log-probs were precomputed)."""

    pad_token_id: int

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        ids = [list(f["chosen_input_ids"]) for f in features] + [list(f["rejected_input_ids"]) for f in features]
        labels = [list(f["chosen_labels"]) for f in features] + [list(f["rejected_labels"]) for f in features]
        batch = {
            "input_ids": _pad(ids, self.pad_token_id),
            "attention_mask": _pad([[1] * len(row) for row in ids], 0),
            "labels": _pad(labels, IGNORE_INDEX),
        }
        if "pair_id" in features[0]:  # the pairs' numbers, where the reference's log-probs were precomputed
            batch["pair_ids"] = torch.tensor([f["pair_id"] for f in features])
        return batch
