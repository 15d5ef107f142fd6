"""Stage 7 of the data pipeline, collation: tokenised samples into padded batches for the Trainer."""

from __future__ import annotations

from transformers import DataCollatorForSeq2Seq, PreTrainedTokenizerBase

from sft.data.labels import IGNORE_INDEX


def make_collator(tokenizer: PreTrainedTokenizerBase, pad_to_length: int | None = None) -> DataCollatorForSeq2Seq:
    """Pads each batch to its longest sample (default), or every batch to `pad_to_length` (for comparison)."""
    return DataCollatorForSeq2Seq(
        tokenizer,
        padding="max_length" if pad_to_length else "longest",
        max_length=pad_to_length,
        label_pad_token_id=IGNORE_INDEX,
    )
