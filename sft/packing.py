"""Padding-free packing: many tokenised samples per training sequence, none attending to another.

Samples are placed into sequences of at most `max_length` tokens by best-fit decreasing bin packing, within windows
of consecutive samples (`pack_dataset`: bounded memory, rows as full as packing all at once to within 0.3%). Each
sample keeps its own `position_ids` (0, 1, 2, ... restarting at every sample) and no attention mask is passed,
which is what makes transformers keep packed samples apart (checked in transformers 5.23):

- sdpa, eager, flex_attention: `masking_utils.create_causal_mask` reads sample boundaries from `position_ids`
  when the attention mask is None (`find_packed_sequence_indices`) and builds a block-diagonal causal mask, row
  by row. So packed rows are batched as rows, padded to the longest one (padding is its own block, label -100):
  attention costs batch x length^2, not (batch x length)^2 as with one flattened row.
- flash_attention_2/3: the varlen kernel takes boundaries from `position_ids` only for a batch of one row
  (`_is_packed_sequence`); any other batch would attend across samples. So the whole batch is flattened into a
  single row, with `cu_seq_lens_q/k` and `max_length_q/k` precomputed (as `DataCollatorWithFlattening` does).
- anything else (a model's own remote code, other kernels): refused, unless the probe below shows it keeps
  samples apart.

Hybrid models (linear-attention layers: Gated DeltaNet, Mamba, short convolutions) are always batched flat, with
`seq_idx` besides `cu_seq_lens_q/k`, and their linear-attention layers restart at every sample; models whose forward
builds its masks without `position_ids` (GPT-OSS, Granite hybrids) get them built with them. Both in
sft.packing_models, set up by `packing_collator`.

`check_no_leak` is that probe: it runs the model once on two packed samples and compares the second sample's
logits with those it gets alone, so a model that ignores the boundaries is refused before training starts.
finetune.py runs it as `LeakProbe` when training begins: on the device and in the precision the Trainer trains in
(a flash-attention kernel refuses fp32 on the CPU, and a 72B forward pass does not belong there).

Each sample's first label is set to -100: the model shifts labels by one, so that label is what the previous
sample's last token would learn to predict. Unpacked training never trains on it either, so the loss is the same.
"""

from __future__ import annotations

import bisect
import hashlib
import logging
from pathlib import Path
from typing import Literal

import datasets
import numpy as np
import pyarrow.compute as pc
import torch
from transformers import PreTrainedModel, TrainerCallback

from sft.data import IGNORE_INDEX, bucketed_length, own_mapping
from sft.errors import UserError
from sft.packing_models import build_masks_from_positions, linear_mixers, mixer_leaks, restart_linear_mixers

logger = logging.getLogger(__name__)

PackingLayout = Literal["rows", "flat"]

# Attention implementations whose masks are built by transformers' masking_utils (packed rows supported).
MASKED_ATTENTION = ("sdpa", "eager", "flex_attention")


class PackingError(UserError, ValueError):
    """Packing was asked for with an attention implementation that would let samples attend to each other."""


def best_fit_decreasing(lengths: list[int], capacity: int) -> list[list[int]]:
    """Indices of `lengths` grouped into bins whose total length is at most `capacity`.

    Longest first, each into the fullest bin it still fits in (a new bin when none has room). Within a bin the
    samples keep that order. Lengths above `capacity` are an error: truncate or drop them first.
    """
    too_long = [index for index, length in enumerate(lengths) if length > capacity]
    if too_long:
        raise ValueError(f"sample {too_long[0]} has {lengths[too_long[0]]} tokens, more than the bin size {capacity}")
    bins: list[list[int]] = []
    # Room left in each open bin, kept sorted, and the bin each entry belongs to (same order).
    rooms: list[int] = []
    room_bins: list[int] = []
    for index in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        length = lengths[index]
        slot = bisect.bisect_left(rooms, length)  # the smallest room that still fits: best fit
        if slot == len(rooms):
            bins.append([index])
            bin_index, room = len(bins) - 1, capacity - length
        else:
            bin_index, room = room_bins.pop(slot), rooms.pop(slot) - length
            bins[bin_index].append(index)
        if room > 0:
            slot = bisect.bisect_left(rooms, room)
            rooms.insert(slot, room)
            room_bins.insert(slot, bin_index)
    return bins


# Part of every packed cache file's key: raised when what packing writes changes (2: bins within windows).
PACK_FORMAT = 2
PACKED_FEATURES = datasets.Features(
    {
        "input_ids": datasets.List(datasets.Value("int32")),
        "labels": datasets.List(datasets.Value("int32")),
        "position_ids": datasets.List(datasets.Value("int32")),
        "length": datasets.Value("int32"),
    }
)
# Tokens of consecutive samples packed together (a window), at least: the memory packing holds at a time, whatever
# the data's size. Bins are best fits within a window; a window of at least 512 rows' worth keeps them within 0.3%
# as full as bins over all the data (measured on long-tailed lengths at 1k-8k tokens a row).
PACK_WINDOW_TOKENS = 1 << 20
PACK_WINDOW_ROWS = 512


def window_tokens(max_length: int) -> int:
    return max(PACK_WINDOW_TOKENS, PACK_WINDOW_ROWS * max_length)


def _pack_window(window: dict, samples: datasets.Dataset, max_length: int) -> dict:
    """The packed rows of one window of consecutive samples: bins by `best_fit_decreasing`, each bin's samples'
    tokens end to end, each sample's first label ignored and its positions counted from 0; numpy over Arrow, no
    Python int per token."""
    start, end = window["start"][0], window["end"][0]
    # Consecutive samples, read in file order through a mapping of their own (see sft.data.own_mapping).
    rows = own_mapping(samples).with_format("arrow")[start:end]
    sample_lengths = pc.list_value_length(rows.column("input_ids")).to_numpy().astype(np.int64)
    all_ids = pc.list_flatten(rows.column("input_ids")).to_numpy().astype(np.int32)
    all_labels = pc.list_flatten(rows.column("labels")).to_numpy().astype(np.int32)  # a copy: written below
    sample_starts = np.cumsum(sample_lengths) - sample_lengths
    all_labels[sample_starts] = IGNORE_INDEX
    packed: dict[str, list] = {"input_ids": [], "labels": [], "position_ids": [], "length": []}
    for members in best_fit_decreasing(sample_lengths.tolist(), max_length):
        tokens = np.concatenate([np.arange(sample_starts[k], sample_starts[k] + sample_lengths[k]) for k in members])
        packed["input_ids"].append(all_ids[tokens])
        packed["labels"].append(all_labels[tokens])
        packed["position_ids"].append(np.concatenate([np.arange(sample_lengths[k], dtype=np.int32) for k in members]))
        packed["length"].append(len(tokens))
    return packed


def pack_dataset(dataset: datasets.Dataset, max_length: int) -> datasets.Dataset:
    """Packed data set: columns input_ids, labels, position_ids and length (tokens in the row), one row per bin.

    `dataset` holds tokenised samples (input_ids, labels), each at most `max_length` tokens long. Consecutive
    samples of about `window_tokens(max_length)` tokens in all make a window, packed by best fit; `datasets.map`
    writes the rows window by window, next to `dataset`'s cache file when it has one (found there again by a key
    of its fingerprint and `max_length`). So packing holds one window in memory and reads the samples in order,
    rather than every token as a Python int or the samples at random.
    """
    arrow = dataset.with_format("arrow")
    lengths = arrow["length"] if "length" in dataset.column_names else pc.list_value_length(arrow["input_ids"])
    lengths = lengths.to_numpy().astype(np.int64)
    if len(lengths) and lengths.max() > max_length:
        too_long = int(np.argmax(lengths > max_length))
        raise ValueError(f"sample {too_long} has {lengths[too_long]} tokens, more than the bin size {max_length}")
    packed = pack_windows(dataset, lengths, max_length, _pack_window, PACKED_FEATURES, f"{PACK_FORMAT}")
    total = int(lengths.sum())
    logger.info(
        "Packed %d samples (%d tokens) into %d sequences of at most %d tokens: %.1f%% full",
        len(lengths),
        total,
        len(packed),
        max_length,
        100 * total / max(1, len(packed) * max_length),
    )
    return packed


def pack_windows(dataset, lengths: np.ndarray, max_length: int, pack_window, features, version: str):
    """`pack_window(window, samples, max_length)` mapped over windows of consecutive samples of `dataset` (whose
    token counts are `lengths`), about `window_tokens(max_length)` tokens each; the rows written next to `dataset`'s
    cache file when it has one, under a key of its fingerprint, `max_length` and `version` (what the packer writes),
    and read from there again."""
    cache_file = None
    key = f"{dataset._fingerprint}-{max_length}-{window_tokens(max_length)}-{version}"
    fingerprint = hashlib.sha256(key.encode()).hexdigest()[:24]
    if dataset.cache_files:
        cache_file = Path(dataset.cache_files[0]["filename"]).parent / f"packed-{fingerprint}.arrow"
    if cache_file is not None and cache_file.is_file():
        return datasets.Dataset.from_file(str(cache_file))
    # A window ends where the running token count passes the next multiple of the window's tokens.
    window = window_tokens(max_length)
    ends = np.searchsorted(np.cumsum(lengths), np.arange(window, lengths.sum(), window))
    bounds = np.unique(np.concatenate([[0], ends + 1, [len(lengths)]]).clip(0, len(lengths)))
    plan = datasets.Dataset.from_dict({"start": bounds[:-1].tolist(), "end": bounds[1:].tolist()})
    return plan.map(
        pack_window,
        batched=True,
        batch_size=1,
        remove_columns=["start", "end"],
        features=features,
        fn_kwargs={"samples": dataset, "max_length": max_length},
        cache_file_name=str(cache_file) if cache_file else None,
        new_fingerprint=fingerprint,
        desc="Packing (windows of consecutive samples)",
    )


def pad_block(length: int, target: int, pad_token_id: int) -> dict[str, list[int]]:
    """The padding that brings a packed row of `length` tokens to `target`: pad tokens with label -100 and positions
    0, 1, ... of their own, so that any boundary list read from positions (transformers' masks, cu_seq_lens) makes
    them a separate block, attended to by no real token and trained on by none."""
    pad = target - length
    return {"input_ids": [pad_token_id] * pad, "labels": [IGNORE_INDEX] * pad, "position_ids": list(range(pad))}


class PackedCollator:
    """Batches packed rows without an attention mask, so that transformers masks by `position_ids`.

    layout "rows": rows padded to the longest, rounded up to a multiple of `pad_to_multiple_of` but not past
    `max_length` (sft.data.bucketed_length); the padding is a `pad_block`, so no real token attends to it. layout
    "flat": all rows of the batch concatenated into one (and the total rounded up the same way, with no cap), with
    the flash-attention varlen arguments; a pad block is a segment of its own there too.
    """

    def __init__(
        self,
        pad_token_id: int,
        layout: PackingLayout = "rows",
        pad_to_multiple_of: int = 1,
        max_length: int | None = None,
        seq_idx: bool = False,
    ):
        self.pad_token_id = pad_token_id
        self.layout = layout
        self.pad_to_multiple_of = pad_to_multiple_of
        self.max_length = max_length
        self.seq_idx = seq_idx  # the sample index of every token too, for linear-attention kernels (flat layout)

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor | int]:
        if self.layout == "flat":
            total = sum(len(f["input_ids"]) for f in features)
            features = [*features, pad_block(total, bucketed_length(total, self.pad_to_multiple_of), self.pad_token_id)]
            position_ids = torch.tensor([[p for f in features for p in f["position_ids"]]])
            return {
                "input_ids": torch.tensor([[t for f in features for t in f["input_ids"]]]),
                "labels": torch.tensor([[t for f in features for t in f["labels"]]]),
                "position_ids": position_ids,
                **flat_boundaries(position_ids[0], self.seq_idx),
            }
        longest = max(len(f["input_ids"]) for f in features)
        length = bucketed_length(longest, self.pad_to_multiple_of, self.max_length)
        input_ids, labels, position_ids = [], [], []
        for f in features:
            pad = pad_block(len(f["input_ids"]), length, self.pad_token_id)
            input_ids.append(list(f["input_ids"]) + pad["input_ids"])
            labels.append(list(f["labels"]) + pad["labels"])
            position_ids.append(list(f["position_ids"]) + pad["position_ids"])
        return {
            "input_ids": torch.tensor(input_ids),
            "labels": torch.tensor(labels),
            "position_ids": torch.tensor(position_ids),
        }


def flat_boundaries(position_ids: torch.Tensor, seq_idx: bool = False) -> dict[str, torch.Tensor | int]:
    """The varlen arguments of one flat row whose samples' positions restart at 0 (`seq_idx`: with the sample
    index of every token, int32 as the convolution and Mamba kernels take it)."""
    starts = (position_ids == 0).nonzero().flatten()
    cu_seq_lens = torch.cat([starts, torch.tensor([position_ids.shape[0]])]).to(torch.int32)
    max_length = int(cu_seq_lens.diff().max())
    boundaries = {
        "cu_seq_lens_q": cu_seq_lens,
        "cu_seq_lens_k": cu_seq_lens,
        "max_length_q": max_length,
        "max_length_k": max_length,
    }
    if seq_idx:
        boundaries["seq_idx"] = (torch.cumsum(position_ids == 0, 0) - 1).to(torch.int32)[None]
    return boundaries


def packing_layout(model: PreTrainedModel) -> PackingLayout:
    """How packed rows must be batched for the model's attention implementation; PackingError if unsupported.
    Hybrid models are batched flat whatever their attention: their linear-attention kernels take boundaries for a
    single row only."""
    implementation = getattr(model.config, "_attn_implementation", None) or "eager"
    if "flash" in implementation:  # flash_attention_2/3 and hub kernels of flash attention
        return "flat"
    if implementation in MASKED_ATTENTION:
        return "flat" if linear_mixers(model) else "rows"
    raise PackingError(
        f"--packing: attention implementation {implementation!r} is not known to keep packed samples apart "
        f"(supported: {', '.join(MASKED_ATTENTION)}, flash_attention_2); pick one with --attn_implementation or "
        "train without --packing"
    )


@torch.no_grad()
def check_no_leak(model: PreTrainedModel, layout: PackingLayout, tolerance: float = 0.05) -> None:
    """Raises PackingError unless the model keeps two packed samples apart.

    A sample's logits alone, packed after another sample, and packed with a plain causal mask (which does let it
    attend to the first) are compared: packed must be within `tolerance` of alone, relative to what attending
    to the other sample changes. Relative, so it holds in bf16 as in fp32. A hybrid model's linear-attention
    layers are checked first, one of each type on its own (sft.packing_models.mixer_leaks).
    """
    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        generator = torch.Generator().manual_seed(0)
        vocabulary = model.config.get_text_config().vocab_size
        first = torch.randint(0, vocabulary, (7,), generator=generator).tolist()
        second = torch.randint(0, vocabulary, (9,), generator=generator).tolist()
        row = {"input_ids": first + second, "labels": first + second, "position_ids": [*range(7), *range(9)]}
        mixers = linear_mixers(model)
        mixers_leaking = mixer_leaks(model, tolerance) if mixers else []
        if mixers_leaking:
            raise PackingError(
                f"--packing: this model's linear-attention layers carry one packed sample into the next: "
                f"{'; '.join(mixers_leaking)}. sft.packing.packing_collator (which finetune.py --packing calls) "
                "restarts them per sample: one call per sample, or on a GPU with flash-linear-attention, "
                "causal-conv1d and mamba-ssm as they need, in those kernels. Otherwise train without --packing"
            )
        batch = PackedCollator(0, layout, seq_idx=bool(mixers))([row])
        batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items() if k != "labels"}
        # No cache, as in training: with one, transformers does not look for packed samples at all.
        packed = model(**batch, use_cache=False).logits[0, 7:].float()
        alone = model(input_ids=torch.tensor([second], device=device), use_cache=False).logits[0].float()
        leaked = (
            model(
                input_ids=batch["input_ids"],
                position_ids=batch["position_ids"],
                attention_mask=torch.ones_like(batch["input_ids"]),
                use_cache=False,
            )
            .logits[0, 7:]
            .float()
        )
    finally:
        model.train(was_training)
    error = (packed - alone).abs().max().item()
    leak = (leaked - alone).abs().max().item()
    implementation = getattr(model.config, "_attn_implementation", None)
    if not error <= tolerance * leak:
        raise PackingError(
            f"--packing: with attention implementation {implementation!r} this model lets packed samples attend "
            f"to each other (a sample's logits change by {error:.3g} when packed after another; {leak:.3g} with "
            f"full cross-sample attention). {_ways_out(model, implementation)}"
        )
    logger.info(
        "Packing check passed (%s, %s layout): packed samples do not attend to each other", implementation, layout
    )


def _ways_out(model: PreTrainedModel, implementation: str | None) -> str:
    """What could keep this model's packed samples apart once the probe found them attending to each other. Its
    masked attention (sdpa, eager, flex) got the model's own mask, so another masked implementation gets the same
    one; flash attention reads the boundaries from the position ids instead, where the model class supports it.
    A model's own code (--trust_remote_code) may build its mask its own way: transformers' class may not."""
    ways = []
    if not type(model).__module__.startswith("transformers."):
        ways.append("load the model with its transformers class (without --trust_remote_code)")
    elif "flash" not in (implementation or "") and getattr(model, "_supports_flash_attn", False):
        ways.append("use --attn_implementation flash_attention_2 (a GPU with flash-attn)")
    way_out = "; or ".join([*ways, "train without --packing"])
    return way_out[0].upper() + way_out[1:]


class LeakProbe(TrainerCallback):
    """Runs `check_no_leak` once, when training begins: the Trainer has then put the model on its device (and
    sharded it), and the forward pass runs under the autocast of --bf16/--fp16, as training does."""

    def __init__(self, layout: PackingLayout):
        self.layout = layout
        self.ran_with: tuple[str, torch.dtype] | None = None  # (device type, autocast dtype), once it ran

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if self.ran_with is not None or model is None:
            return control
        device_type = next(model.parameters()).device.type
        dtype = torch.bfloat16 if args.bf16 else torch.float16 if args.fp16 else torch.float32
        with torch.autocast(device_type, dtype=dtype, enabled=dtype != torch.float32):
            check_no_leak(model, self.layout)
        self.ran_with = (device_type, dtype)
        return control


def packing_collator(
    model: PreTrainedModel,
    pad_token_id: int,
    use_cache: bool = False,
    pad_to_multiple_of: int = 1,
    max_length: int | None = None,
    device_type: str | None = None,
) -> PackedCollator:
    """The collator of packed rows for the model's attention implementation; a PackingError where packing would
    let samples attend to each other. `use_cache` is the Trainer's --use_cache, which must stay off; rows are
    padded to a multiple of `pad_to_multiple_of` (sft.data.pad_multiple), at most `max_length`. Sets the model
    up to keep samples apart where its own code does not (sft.packing_models), for `device_type`, the device it
    trains on (default: where it is now)."""
    if use_cache:
        raise PackingError("--packing needs --use_cache off: with a KV cache transformers does not separate samples")
    layout = packing_layout(model)
    device_type = device_type or next(model.parameters()).device.type
    hybrid = restart_linear_mixers(model, device_type) is not None
    build_masks_from_positions(model)
    return PackedCollator(pad_token_id, layout, pad_to_multiple_of, max_length, seq_idx=hybrid)


def prepare_packing(
    model: PreTrainedModel,
    pad_token_id: int,
    max_length: int,
    train_dataset: datasets.Dataset,
    eval_dataset: datasets.Dataset | None = None,
    check: bool = True,
    use_cache: bool = False,
) -> tuple[datasets.Dataset, datasets.Dataset | None, PackedCollator]:
    """Packed training (and evaluation) data and their collator, after checking the model keeps samples apart
    (`check`: one probe forward pass here; finetune.py packs before the model loads and runs the probe as a
    `LeakProbe` once training begins)."""
    collator = packing_collator(model, pad_token_id, use_cache)
    if check:
        check_no_leak(model, collator.layout)
    train_dataset = pack_dataset(train_dataset, max_length)
    if eval_dataset is not None:
        eval_dataset = pack_dataset(eval_dataset, max_length)
    return train_dataset, eval_dataset, collator
