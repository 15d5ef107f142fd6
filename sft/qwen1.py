"""Qwen-1 (Qwen-7B-Chat and family) as native transformers models: no remote code.

Qwen-1 releases ship a tiktoken vocabulary (`qwen.tiktoken`) read by their own `tokenization_qwen.py`, which
does not run on transformers 5. `qwen_fast_tokenizer` turns that file into a fast tokenizer with identical ids.
"""

from __future__ import annotations

import os

from transformers import PreTrainedTokenizerFast
from transformers.convert_slow_tokenizer import TikTokenConverter

from sft.data import CHATML_TEMPLATE

# Qwen-1's pre-tokenizer split: GPT-4's (cl100k) pattern except that digits are split one by one (\p{N}).
QWEN1_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
ENDOFTEXT, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
# Ids follow the 151,643 BPE ranks in this order: <|endoftext|> 151643, <|im_start|> 151644, <|im_end|> 151645,
# then <|extra_0|> .. <|extra_204|> (151646 .. 151850).
QWEN1_SPECIAL_TOKENS = [ENDOFTEXT, IM_START, IM_END] + [f"<|extra_{index}|>" for index in range(205)]
QWEN1_RANKS = 151643
QWEN1_MAX_LENGTH = 8192


def qwen_fast_tokenizer(tiktoken_file: str | os.PathLike) -> PreTrainedTokenizerFast:
    """A fast (tokenizers) tokenizer with the same ids as Qwen-1's tiktoken tokenizer reading `tiktoken_file`.

    Byte-level BPE over the file's ranks, Qwen-1's split pattern, no normaliser (tiktoken has none); the special
    tokens get the ids Qwen-1 gives them. eos is <|im_end|> (the end of a ChatML turn, what a chat model stops at)
    and pad <|endoftext|>, as in Qwen2-Instruct; the chat template is ChatML with Qwen-1's default system prompt.
    """
    converter = TikTokenConverter(
        vocab_file=str(tiktoken_file), pattern=QWEN1_PATTERN, extra_special_tokens=QWEN1_SPECIAL_TOKENS
    )
    backend = converter.converted()
    ranks = backend.get_vocab_size(with_added_tokens=False)
    if ranks != QWEN1_RANKS:
        raise ValueError(f"{tiktoken_file} has {ranks} BPE ranks, Qwen-1's qwen.tiktoken has {QWEN1_RANKS}")
    # Added tokens take ids after the ranks in the order given; checked, since everything depends on these ids.
    expected = {token: QWEN1_RANKS + index for index, token in enumerate(QWEN1_SPECIAL_TOKENS)}
    actual = {token: backend.token_to_id(token) for token in QWEN1_SPECIAL_TOKENS}
    if actual != expected:
        raise ValueError(f"special tokens of {tiktoken_file} did not get Qwen-1's ids")
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token=IM_END,
        pad_token=ENDOFTEXT,
        additional_special_tokens=QWEN1_SPECIAL_TOKENS,
        chat_template=CHATML_TEMPLATE,
        model_max_length=QWEN1_MAX_LENGTH,
        padding_side="right",
        clean_up_tokenization_spaces=False,
    )
