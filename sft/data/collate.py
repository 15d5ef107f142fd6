"""Stage 7 of the data pipeline, collation: tokenised samples into padded batches for the Trainer.

Shape-stable batches: a batch padded only to its longest row has a new length almost every step, and an attention
kernel that builds an execution plan per shape (cuDNN attention, which recent torch prefers on Hopper GPUs; also
torch.compile) pays for each new one again, all run long. So on CUDA rows are padded to a multiple of a bucket size
(`pad_multiple`, 64 unless --pad_to_multiple_of says otherwise), never past the training length: a run meets a
handful of shapes. Elsewhere (the CPU) no bucketing by default: its kernels build nothing per shape, and the padding
would only be extra work. The padding is never trained (label -100) and is masked (padded batches) or its own
block (packed rows, sft.packing), so the loss is the same either way.
"""

from __future__ import annotations

import logging

from transformers import DataCollatorForSeq2Seq, PreTrainedTokenizerBase

from sft.data.labels import IGNORE_INDEX

logger = logging.getLogger(__name__)

# Rows' lengths are rounded up to a multiple of this on CUDA by default (--pad_to_multiple_of).
CUDA_PAD_MULTIPLE = 64


def pad_multiple(requested: int | None, device_type: str) -> int:
    """The bucket size batches are padded to a multiple of, decided (and logged) once per run: `requested`
    (--pad_to_multiple_of; 1 means none), else `CUDA_PAD_MULTIPLE` where `device_type` is "cuda", else 1."""
    if requested is not None:
        multiple, why = requested, "--pad_to_multiple_of"
    elif device_type == "cuda":
        multiple, why = CUDA_PAD_MULTIPLE, "the default on CUDA: few shapes for the attention kernels"
    else:
        multiple, why = 1, f"the default on {device_type}: its kernels build nothing per shape"
    if multiple > 1:
        logger.info("Batches: rows padded to a multiple of %d tokens (%s)", multiple, why)
    else:
        logger.info("Batches: rows padded to the longest of each batch (%s)", why)
    return multiple


def bucketed_length(longest: int, multiple: int, cap: int | None = None) -> int:
    """The length a batch whose longest row has `longest` tokens is padded to: rounded up to a multiple of
    `multiple`, but not past `cap` (the training length, for models with learned positions), nor below `longest`."""
    rounded = -(-longest // multiple) * multiple
    return max(longest, min(rounded, cap)) if cap is not None else rounded


class BucketedCollator:
    """Pads each batch of tokenised samples to `bucketed_length` of its longest (input_ids with the pad token and
    an attention mask of 0, labels with -100, on the tokenizer's padding side)."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, multiple: int, cap: int | None = None):
        self.tokenizer = tokenizer
        self.multiple = multiple
        self.cap = cap

    def __call__(self, features: list[dict]) -> dict:
        length = bucketed_length(max(len(f["input_ids"]) for f in features), self.multiple, self.cap)
        padder = DataCollatorForSeq2Seq(
            self.tokenizer, padding="max_length", max_length=length, label_pad_token_id=IGNORE_INDEX
        )
        return padder(features)


def make_collator(
    tokenizer: PreTrainedTokenizerBase,
    pad_to_length: int | None = None,
    pad_to_multiple_of: int = 1,
    max_length: int | None = None,
) -> DataCollatorForSeq2Seq | BucketedCollator:
    """Pads each batch to its longest sample (default), rounded up to a multiple of `pad_to_multiple_of` (at most
    `max_length`, see `bucketed_length`), or every batch to `pad_to_length` (for comparison)."""
    if pad_to_multiple_of > 1 and not pad_to_length:
        return BucketedCollator(tokenizer, pad_to_multiple_of, max_length)
    return DataCollatorForSeq2Seq(
        tokenizer,
        padding="max_length" if pad_to_length else "longest",
        max_length=pad_to_length,
        label_pad_token_id=IGNORE_INDEX,
    )
