"""Stage 5 of the data pipeline, tokenising: the labelled text of each conversation as token ids and labels
(IGNORE_INDEX outside the trained spans), truncated or dropped by length.

A fast tokenizer encodes a whole batch in one call and labels come from the tokens at the span edges; a slow one
(Qwen-1's tiktoken) is encoded piece by piece at the span edges.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Any, Literal

from transformers import PreTrainedTokenizerBase

from sft.data.formats import TEXT_ROLE, Conversation, TrainOn
from sft.data.labels import IGNORE_INDEX, label_many
from sft.data.profile import TemplateProfile
from sft.data.templates import TemplateRefusal


def labels_from_offsets(
    input_ids: list[int], offsets: list[tuple[int, int]], spans: list[tuple[int, int]]
) -> list[int]:
    """Labels of the tokens that overlap a span. Token offsets never decrease, so the tokens of each span are
    one run, found by bisection rather than by a loop over every token."""
    labels = [IGNORE_INDEX] * len(input_ids)
    if not offsets:
        return labels
    starts, ends = zip(*offsets)
    for span_start, span_end in spans:
        first = bisect.bisect_right(ends, span_start)  # first token ending after the span starts
        last = bisect.bisect_left(starts, span_end)  # tokens starting before the span ends
        labels[first:last] = input_ids[first:last]
    return labels


def labels_of_encoding(encoding: Any, input_ids: list[int], spans: list[tuple[int, int]]) -> list[int]:
    """`labels_from_offsets` from a Rust `tokenizers.Encoding` of `input_ids`, asking it only for the tokens at
    the span edges: turning every token's offsets into Python tuples costs more than the encoding itself."""
    labels = [IGNORE_INDEX] * len(input_ids)
    for span_start, span_end in spans:
        first, last = encoding.char_to_token(span_start), encoding.char_to_token(span_end - 1)
        if first is None or last is None:  # an edge on a character no token covers (trimmed whitespace)
            return labels_from_offsets(input_ids, encoding.offsets, spans)
        # Byte-level tokens can split one character, so neighbours may share the edge character.
        while first > 0 and encoding.token_to_chars(first - 1)[1] > span_start:
            first -= 1
        while last + 1 < len(input_ids) and encoding.token_to_chars(last + 1)[0] < span_end:
            last += 1
        labels[first : last + 1] = input_ids[first : last + 1]
    return labels


def tokenize_pieces(
    tokenizer: PreTrainedTokenizerBase, text: str, spans: list[tuple[int, int]]
) -> tuple[list[int], list[int]]:
    """For tokenizers without offsets (Qwen-1's tiktoken one): tokenise the text piece by piece at span edges."""
    input_ids: list[int] = []
    labels: list[int] = []
    edges = sorted({0, len(text), *(edge for span in spans for edge in span)})
    trained = set(spans)
    for start, end in zip(edges, edges[1:]):
        ids = tokenizer.encode(text[start:end], add_special_tokens=False)
        inside = any(span_start <= start and end <= span_end for span_start, span_end in trained)
        input_ids += ids
        labels += ids if inside else [IGNORE_INDEX] * len(ids)
    return input_ids, labels


@dataclass
class Tokenized:
    input_ids: list[int]
    labels: list[int]
    status: Literal["ok", "truncated", "dropped_too_long", "dropped_no_label"]
    folded: bool = False  # its system message was put into the first user message (the template refuses one)


def tokenize_conversation(
    tokenizer: PreTrainedTokenizerBase,
    messages: Conversation,
    max_length: int,
    train_on: TrainOn = "assistant",
    drop_long: bool = False,
) -> Tokenized:
    """Token ids and labels of one conversation; labels are IGNORE_INDEX outside the trained spans."""
    return tokenize_many(tokenizer, [messages], max_length, train_on, drop_long)[0]


def tokenize_many(
    tokenizer: PreTrainedTokenizerBase,
    conversations: list[Conversation],
    max_length: int,
    train_on: TrainOn = "assistant",
    drop_long: bool = False,
    fold_system: bool = True,
    profile: TemplateProfile | None = None,
) -> list[Tokenized]:
    """`tokenize_conversation` of many conversations: rendered in batched template calls and, with a fast
    tokenizer, encoded in one batched call (the Rust tokenizer spreads it over threads).

    `TemplateRefusal` names the first conversation the chat template cannot render (with its system message
    folded into the first user message too, where `fold_system`)."""
    labelled = label_many(tokenizer, conversations, train_on, fold_system, profile)
    rendered = [(text, spans) for text, spans, _ in labelled]
    if tokenizer.is_fast:
        backend = tokenizer.backend_tokenizer
        # The Rust tokenizer keeps the truncation or padding of the last call that set one; we want neither.
        if backend.truncation is not None:
            backend.no_truncation()
        if backend.padding is not None:
            backend.no_padding()
        encodings = backend.encode_batch([text for text, _ in rendered], add_special_tokens=False)
        pieces = []
        for encoding, (_, spans) in zip(encodings, rendered):
            input_ids = encoding.ids  # a new Python list on each access
            pieces.append((input_ids, labels_of_encoding(encoding, input_ids, spans)))
    else:
        pieces = [tokenize_pieces(tokenizer, text, spans) for text, spans in rendered]
    results = []
    for (input_ids, labels), (_, _, folded) in zip(pieces, labelled):
        status = "ok"
        if len(input_ids) > max_length:
            if drop_long:
                results.append(Tokenized([], [], "dropped_too_long", folded))
                continue
            input_ids, labels, status = input_ids[:max_length], labels[:max_length], "truncated"
        if labels.count(IGNORE_INDEX) == len(labels):
            results.append(Tokenized([], [], "dropped_no_label", folded))
            continue
        results.append(Tokenized(input_ids, labels, status, folded))
    return results


def tokenize_text(tokenizer: PreTrainedTokenizerBase, text: str, max_length: int) -> list[Tokenized]:
    """A plain text for continued pre-training: its tokens and eos, every token trained, no chat template; split
    into chunks of `max_length` tokens. Every chunk has a token to predict (each token is predicted from the ones
    before it in its chunk): a last chunk of one token takes the previous chunk's last token, so that no target is
    lost and no row has none; a text of one token (or rows of one) is "dropped_no_label", counted with the others."""
    input_ids = tokenizer.encode(text, add_special_tokens=False)
    if tokenizer.eos_token_id is not None:
        input_ids.append(tokenizer.eos_token_id)
    chunks = [input_ids[start : start + max_length] for start in range(0, len(input_ids), max_length)]
    if len(chunks) > 1 and len(chunks[-1]) == 1:
        chunks[-2], chunks[-1] = chunks[-2][:-1], chunks[-2][-1:] + chunks[-1]
    if len(input_ids) < 2 or max_length < 2:
        return [Tokenized([], [], "dropped_no_label")]
    return [Tokenized(chunk, list(chunk), "ok") for chunk in chunks]


def tokenize_samples(
    tokenizer: PreTrainedTokenizerBase,
    conversations: list[Conversation],
    max_length: int,
    train_on: TrainOn = "assistant",
    drop_long: bool = False,
    fold_system: bool = True,
    profile: TemplateProfile | None = None,
) -> list[list[Tokenized]]:
    """Each sample's training rows, in order: a conversation's one (`tokenize_many`, its chats in one batch), a
    plain text's chunks (`tokenize_text`). `TemplateRefusal` names the sample by its index in `conversations`."""
    chats = [k for k, messages in enumerate(conversations) if messages[0]["role"] != TEXT_ROLE]
    try:
        tokenized_chats = tokenize_many(
            tokenizer, [conversations[k] for k in chats], max_length, train_on, drop_long, fold_system, profile
        )
    except TemplateRefusal as error:
        raise TemplateRefusal(chats[error.index], error.message) from None
    by_sample = dict(zip(chats, tokenized_chats))
    return [
        [by_sample[k]] if k in by_sample else tokenize_text(tokenizer, messages[0]["content"], max_length)
        for k, messages in enumerate(conversations)
    ]
