"""Packing of preference pairs (dpo.py --packing): whole pairs per packed row, log-probs summed per sequence.

A pair's chosen and rejected sequences always land in the same row, one after the other, so a micro-batch holds
whole pairs. Rows are filled by the best-fit-decreasing bins of SFT packing (`sft.packing.best_fit_decreasing`,
within windows of consecutive pairs: `sft.packing.pack_windows`), a pair's size being its two sequences' tokens.
A row holds at most `model_max_length` tokens; a pair longer than that (each side is at most `model_max_length`,
so the pair at most twice that) gets a row of its own rather than being cut or dropped: unpacked training would
have run its sides as two rows of that length, so the memory of a step stays about what it was.

Each sequence keeps its own `position_ids` counting from 0 and its first label ignored, as in SFT packing, and
the batches are laid out as SFT packing decides for the model (`sft.packing.packing_collator`: rows for sdpa,
eager and flex attention, one flat row for flash attention and hybrid models), with the same leak probe
(`sft.packing.LeakProbe`). The batch carries `sequence_index`, the sequence each token belongs to, numbered as
`sft.data.pairs.PairCollator` orders its rows (the chosen sides of the batch's pairs, then their rejected sides;
-1 for padding), so `sft.sequence_logps` sums log-probs per sequence and the preference loss reads them as it
reads unpacked ones. Where the reference's log-probs are precomputed (`sft.preference.PrecomputedReference`, on the
unpacked pairs), each pair's `pair_id` travels into its row and comes back as the batch's `pair_ids`, in the order
of its chosen sequences.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager

import datasets
import numpy as np
import pyarrow.compute as pc
import torch
from torch import nn

from sft.data import IGNORE_INDEX, own_mapping
from sft.packing import PackedCollator, best_fit_decreasing, pack_windows, packing_collator
from sft.packing_models import build_masks_from_positions, restart_linear_mixers

logger = logging.getLogger(__name__)

# Part of every packed pairs file's key: raised when what pair packing writes changes.
PAIR_PACK_FORMAT = "pairs-2"
SIDES = ("chosen", "rejected")
_ROW_KEYS = ("input_ids", "labels", "position_ids")


def packed_pair_features(with_ids: bool) -> datasets.Features:
    """The columns of packed pairs: the row's tokens, labels and positions; `sides`, the token count of each of its
    sequences (chosen, rejected of its first pair, then of its second...); `length`, its tokens; `pair_ids`, its
    pairs' numbers, where they are numbered."""
    ints = datasets.List(datasets.Value("int32"))
    features = {name: ints for name in ("input_ids", "labels", "position_ids", "sides")}
    features["length"] = datasets.Value("int32")
    if with_ids:
        features["pair_ids"] = datasets.List(datasets.Value("int64"))
    return datasets.Features(features)


def _pack_pair_window(window: dict, samples: datasets.Dataset, max_length: int) -> dict:
    """The packed rows of one window of consecutive pairs (numpy over Arrow, as `sft.packing` packs samples)."""
    start, end = window["start"][0], window["end"][0]
    rows = own_mapping(samples).with_format("arrow")[start:end]
    tokens, labels, lengths, starts = {}, {}, {}, {}
    for side in SIDES:
        lengths[side] = pc.list_value_length(rows.column(f"{side}_input_ids")).to_numpy().astype(np.int64)
        tokens[side] = pc.list_flatten(rows.column(f"{side}_input_ids")).to_numpy().astype(np.int32)
        labels[side] = pc.list_flatten(rows.column(f"{side}_labels")).to_numpy().astype(np.int32)  # a copy
        starts[side] = np.cumsum(lengths[side]) - lengths[side]
        labels[side][starts[side]] = IGNORE_INDEX
    ids = rows.column("pair_id").to_numpy() if "pair_id" in rows.column_names else None
    packed: dict[str, list] = {name: [] for name in ("input_ids", "labels", "position_ids", "sides", "length")}
    if ids is not None:
        packed["pair_ids"] = []
    # A pair longer than a row counts as a full row: it gets one of its own.
    sizes = np.minimum(lengths["chosen"] + lengths["rejected"], max_length)
    for members in best_fit_decreasing(sizes.tolist(), max_length):
        pieces = [(side, k) for k in members for side in SIDES]
        spans = [np.arange(starts[side][k], starts[side][k] + lengths[side][k]) for side, k in pieces]
        packed["input_ids"].append(np.concatenate([tokens[side][span] for (side, _), span in zip(pieces, spans)]))
        packed["labels"].append(np.concatenate([labels[side][span] for (side, _), span in zip(pieces, spans)]))
        packed["position_ids"].append(np.concatenate([np.arange(len(span), dtype=np.int32) for span in spans]))
        packed["sides"].append([len(span) for span in spans])
        packed["length"].append(sum(len(span) for span in spans))
        if ids is not None:
            packed["pair_ids"].append([int(ids[k]) for k in members])
    return packed


def pack_pairs(dataset: datasets.Dataset, max_length: int) -> datasets.Dataset:
    """Tokenised pairs (`sft.data.pairs.tokenize_pairs`, with their `pair_id` if numbered) packed
    into rows of at most `max_length` tokens, whole pairs only (one longer than that alone in a row); written next
    to `dataset`'s cache file and found there again, window by window as `sft.packing.pack_dataset` does."""
    arrow = dataset.with_format("arrow")
    lengths = sum(pc.list_value_length(arrow[f"{side}_input_ids"]).to_numpy().astype(np.int64) for side in SIDES)
    with_ids = "pair_id" in dataset.column_names
    version = f"{PAIR_PACK_FORMAT}-{with_ids}"
    packed = pack_windows(dataset, lengths, max_length, _pack_pair_window, packed_pair_features(with_ids), version)
    total = int(lengths.sum())
    logger.info(
        "Packed %d pairs (%d tokens) into %d rows of at most %d tokens, each pair whole (%d longer pairs alone in "
        "a row): %.1f%% full",
        len(lengths),
        total,
        len(packed),
        max_length,
        int((lengths > max_length).sum()),
        100 * total / max(1, np.maximum(packed.with_format("arrow")["length"].to_numpy(), max_length).sum()),
    )
    return packed


class PackedPairCollator:
    """Batches packed pair rows as `packed` (SFT packing's collator for the model) does, adding `sequence_index`
    (each token's sequence, in PairCollator's row order; -1 for padding) and `pair_ids` where numbered."""

    def __init__(self, packed: PackedCollator):
        self.packed = packed
        self.layout = packed.layout

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor | int]:
        batch = self.packed([{key: f[key] for key in _ROW_KEYS} for f in features])
        pairs = sum(len(f["sides"]) // 2 for f in features)
        owners, first = [], 0
        for f in features:
            row = []
            for k, (chosen, rejected) in enumerate(zip(f["sides"][0::2], f["sides"][1::2])):
                row += [first + k] * chosen + [pairs + first + k] * rejected
            owners.append(row)
            first += len(f["sides"]) // 2
        if self.layout == "flat":
            owners = [[owner for row in owners for owner in row]]
        width = batch["input_ids"].shape[1]
        batch["sequence_index"] = torch.tensor([row + [-1] * (width - len(row)) for row in owners])
        if "pair_ids" in features[0]:
            batch["pair_ids"] = torch.tensor([pair_id for f in features for pair_id in f["pair_ids"]])
        return batch


def pair_packing_collator(
    model: nn.Module,
    pad_token_id: int,
    use_cache: bool = False,
    pad_to_multiple_of: int = 1,
    max_length: int | None = None,
    device_type: str | None = None,
) -> PackedPairCollator:
    """The collator of packed pairs for the model's attention implementation (`sft.packing.packing_collator`: a
    PackingError where packed samples would see each other; the model set up to keep them apart)."""
    return PackedPairCollator(
        packing_collator(model, pad_token_id, use_cache, pad_to_multiple_of, max_length, device_type)
    )


@contextmanager
def _quiet(name: str):
    named = logging.getLogger(name)
    was = named.disabled
    named.disabled = True
    try:
        yield
    finally:
        named.disabled = was


def keep_samples_apart(model: nn.Module, device_type: str) -> None:
    """Sets up a second model that scores the same packed batches (the frozen reference copy) as
    `pair_packing_collator` set up the policy; silently, since the policy's set-up was logged."""
    with _quiet("sft.packing_models"):
        restart_linear_mixers(model, device_type)
        build_masks_from_positions(model)
