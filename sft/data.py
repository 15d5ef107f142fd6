"""Reading, checking and tokenising chat fine-tuning data.

Every entry point (finetune.py, merge_lora.py, run_gptq.py, the demos) goes through this module, so a data
file means the same thing everywhere:

1. `load_conversations(path)` reads a JSON list or a JSONL file and turns every sample, whatever its format
   (Qwen `conversations`, ChatML `messages`, alpaca), into a list of `{"role", "content"}` messages. Anything
   wrong raises `DataError` naming the file, the line or sample and the field. No model is needed for this.
2. `tokenize_conversations(conversations, tokenizer, ...)` renders each conversation with the tokenizer's chat
   template (ChatML when it has none), tokenises it and labels the assistant tokens, through `datasets.map`
   (batched, multi-process, cached on disk).
"""

from __future__ import annotations

import bisect
import difflib
import hashlib
import json
import logging
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import datasets
from transformers import DataCollatorForSeq2Seq, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100

# Qwen2's ChatML template: used for tokenizers that have no template of their own (Qwen-1's tiktoken
# tokenizer), and written into the tiny test model. Like Qwen2 it adds a default system message.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

Message = dict[str, str]
Conversation = list[Message]
TrainOn = Literal["assistant", "last_assistant", "all"]

ROLE_NAMES = {"system": "system", "user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant"}
ALPACA_KEYS = ("instruction", "input", "output", "system")


class DataError(ValueError):
    """A problem in a data file, with where it is: file, line or sample, and field."""

    def __init__(self, path: str | os.PathLike, where: str, field: str | None, message: str):
        self.path, self.where, self.field = str(path), where, field
        location = f"{self.path}, {where}" if where else self.path
        if field:
            location += f", field '{field}'"
        super().__init__(f"{location}: {message}")


# ----------------------------------------------------------------------------------------------------------
# Reading and checking
# ----------------------------------------------------------------------------------------------------------


def _parse_json(text: str, path: Path, first_line: int) -> Any:
    """json.loads, with every way it can fail turned into a DataError that names the line."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise DataError(path, f"line {first_line + error.lineno - 1}", None, f"invalid JSON: {error.msg}") from None
    except RecursionError:
        raise DataError(path, f"line {first_line}", None, "invalid JSON: nested too deeply") from None
    except ValueError as error:  # e.g. an integer with more digits than Python converts
        raise DataError(path, f"line {first_line}", None, f"invalid JSON: {error}") from None


def read_records(path: str | os.PathLike) -> list[tuple[str, Any]]:
    """Reads a JSON list (or a single JSON object) or JSONL file into (where, record) pairs.

    `where` is "line N" for JSONL and "sample N" (0-based, as in the list) for a JSON list.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(path, "", None, "no such file" if not path.exists() else "not a file")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = raw[: error.start].count(b"\n") + 1
        raise DataError(path, f"line {line}", None, f"not valid UTF-8 (byte offset {error.start})") from None

    stripped = text.lstrip()
    if not stripped:
        raise DataError(path, "", None, "the file is empty")
    if stripped[0] == "[":
        records = _parse_json(text, path, first_line=1)
        return [(f"sample {index}", record) for index, record in enumerate(records)]

    lines = text.splitlines()
    if stripped[0] == "{" and len(lines) > 1:
        try:  # a pretty-printed single JSON object rather than JSONL
            return [("sample 0", json.loads(text))]
        except (ValueError, RecursionError):
            pass
    records = []
    for line_number, line in enumerate(lines, start=1):
        if line.strip():
            records.append((f"line {line_number}", _parse_json(line, path, first_line=line_number)))
    return records


def _text(value: Any, path: Path, where: str, field: str, allow_empty: bool = False) -> str:
    if not isinstance(value, str):
        raise DataError(path, where, field, f"expected a string, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise DataError(path, where, field, "is empty")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as error:
        raise DataError(path, where, field, f"invalid unicode: {error.reason} at character {error.start}") from None
    return value


def _role(value: Any, path: Path, where: str, field: str) -> str:
    if not isinstance(value, str) or value.lower() not in ROLE_NAMES:
        raise DataError(path, where, field, f"unknown role {value!r} (expected one of: {', '.join(ROLE_NAMES)})")
    return ROLE_NAMES[value.lower()]


def _turns(record: dict, key: str, role_key: str, content_key: str, path: Path, where: str) -> Conversation:
    turns = record[key]
    if not isinstance(turns, list) or not turns:
        raise DataError(path, where, key, "expected a non-empty list of messages")
    messages = []
    for index, turn in enumerate(turns):
        field = f"{key}[{index}]"
        if not isinstance(turn, dict):
            raise DataError(path, where, field, f"expected an object, got {type(turn).__name__}")
        for needed in (role_key, content_key):
            if needed not in turn:
                found = ", ".join(map(repr, turn)) or "none"
                raise DataError(path, where, f"{field}.{needed}", f"missing (keys found: {found})")
        role = _role(turn[role_key], path, where, f"{field}.{role_key}")
        content = _text(turn[content_key], path, where, f"{field}.{content_key}")
        messages.append({"role": role, "content": content})
    return messages


def _alpaca(record: dict, path: Path, where: str) -> Conversation:
    for key in ("instruction", "output"):
        if key not in record:
            hint = difflib.get_close_matches(key, [k for k in record if isinstance(k, str)], n=1, cutoff=0.75)
            found = f" (found {hint[0]!r}: misspelled?)" if hint else ""
            raise DataError(path, where, key, f"missing in an alpaca sample{found}")
    instruction = _text(record["instruction"], path, where, "instruction")
    extra_input = _text(record.get("input") or "", path, where, "input", allow_empty=True)
    prompt = f"{instruction}\n{extra_input}" if extra_input.strip() else instruction
    output = _text(record["output"], path, where, "output")
    messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": output}]
    if record.get("system"):
        messages.insert(0, {"role": "system", "content": _text(record["system"], path, where, "system")})
    return messages


def parse_record(record: Any, path: str | os.PathLike, where: str) -> Conversation:
    """Turns one record of any supported format into messages, checking every field."""
    path = Path(path)
    if not isinstance(record, dict):
        raise DataError(path, where, None, f"expected a JSON object, got {type(record).__name__}")
    if "conversations" in record:
        messages = _turns(record, "conversations", "from", "value", path, where)
        key = "conversations"
    elif "messages" in record:
        messages = _turns(record, "messages", "role", "content", path, where)
        key = "messages"
    elif any(key in record for key in ALPACA_KEYS):
        return _alpaca(record, path, where)
    else:
        found = ", ".join(repr(k) for k in record) or "none"
        candidates = ["conversations", "messages", *ALPACA_KEYS]
        hints = {m for k in record if isinstance(k, str) for m in difflib.get_close_matches(k, candidates, n=1)}
        hint = f"; did you mean {', '.join(sorted(hints))}?" if hints else ""
        raise DataError(
            path,
            where,
            None,
            f"unknown format: keys found {found}; expected 'conversations' (Qwen), 'messages' (ChatML) "
            f"or 'instruction'/'input'/'output' (alpaca){hint}",
        )
    for index, message in enumerate(messages):
        if message["role"] == "system" and index != 0:
            raise DataError(path, where, f"{key}[{index}]", "a system message may only come first")
    if not any(message["role"] == "assistant" for message in messages):
        raise DataError(path, where, key, "no assistant turn: nothing to learn from this sample")
    return messages


def record_format(record: Any) -> str:
    """Which format `parse_record` reads `record` as: "qwen" ('conversations'), "chatml" ('messages'), "alpaca",
    or "unknown" (for reports such as sft.inspect's; parse_record tests the same keys in the same order)."""
    if isinstance(record, dict):
        if "conversations" in record:
            return "qwen"
        if "messages" in record:
            return "chatml"
        if any(key in record for key in ALPACA_KEYS):
            return "alpaca"
    return "unknown"


def load_conversations(path: str | os.PathLike, default_system: str | None = None) -> list[Conversation]:
    """Reads and checks a whole data file; a sample without a system message gets `default_system`."""
    conversations = [parse_record(record, path, where) for where, record in read_records(path)]
    if not conversations:
        raise DataError(path, "", None, "no samples in the file")
    if default_system:
        for messages in conversations:
            if messages[0]["role"] != "system":
                messages.insert(0, {"role": "system", "content": default_system})
    return conversations


# ----------------------------------------------------------------------------------------------------------
# Rendering and labelling
# ----------------------------------------------------------------------------------------------------------


def chat_template_of(tokenizer: PreTrainedTokenizerBase) -> str:
    return tokenizer.chat_template or CHATML_TEMPLATE


def render(tokenizer: PreTrainedTokenizerBase, messages: Conversation, add_generation_prompt: bool = False) -> str:
    """The conversation as text, exactly as the model sees it at training and at inference."""
    return tokenizer.apply_chat_template(
        messages, chat_template=chat_template_of(tokenizer), tokenize=False, add_generation_prompt=add_generation_prompt
    )


def _render_many(
    tokenizer: PreTrainedTokenizerBase, conversations: list[Conversation], add_generation_prompt: bool = False
) -> list[str]:
    """`render` of many conversations in one batched `apply_chat_template` call (same text, less overhead)."""
    if not conversations:
        return []
    return tokenizer.apply_chat_template(
        conversations,
        chat_template=chat_template_of(tokenizer),
        tokenize=False,
        add_generation_prompt=add_generation_prompt,
    )


def label_spans(
    tokenizer: PreTrainedTokenizerBase, messages: Conversation, train_on: TrainOn = "assistant"
) -> tuple[str, list[tuple[int, int]]]:
    """The rendered text and the character spans whose tokens are trained on.

    An assistant turn's span runs from where the generation prompt ends to the end of that turn as the template
    renders it, end-of-turn token included, trailing whitespace excluded. Both ends come from rendering the
    conversation's prefixes, so this holds for any template that renders a conversation's prefix as a prefix
    of its text (ChatML, Llama-3, Mistral, ...). Where a template does not (some drop earlier reasoning), the
    turn's content is searched for in the text instead.
    """
    return label_spans_many(tokenizer, [messages], train_on)[0]


def label_spans_many(
    tokenizer: PreTrainedTokenizerBase, conversations: list[Conversation], train_on: TrainOn = "assistant"
) -> list[tuple[str, list[tuple[int, int]]]]:
    """`label_spans` of many conversations.

    Rendering every prefix of every conversation costs a render per turn, so the answers are first found in
    one render with markers around them (`_spans_by_markers`). That shortcut is only taken where it gives the
    prefix spans exactly: one conversation of each role sequence in the batch is checked against
    `_spans_by_prefixes`, and any conversation the markers would change takes the prefix path itself.
    """
    texts = _render_many(tokenizer, conversations)
    if train_on == "all":
        return [(text, [(0, len(text))]) for text in texts]
    turns_of = []
    for messages in conversations:
        turns = [i for i, message in enumerate(messages) if message["role"] == "assistant"]
        turns_of.append(turns[-1:] if train_on == "last_assistant" else turns)

    by_markers = _spans_by_markers(tokenizer, conversations, turns_of, texts)
    one_of_each_shape = {}
    for k, (messages, spans) in enumerate(zip(conversations, by_markers)):
        if spans is not None:
            one_of_each_shape.setdefault(tuple(message["role"] for message in messages), k)
    checked = list(one_of_each_shape.values())
    expected = _spans_by_prefixes(tokenizer, *_pick(checked, conversations, turns_of, texts, by_markers))
    fast = all(by_markers[k] == spans for k, spans in zip(checked, expected))
    slow = [k for k, spans in enumerate(by_markers) if spans is None or not fast]
    spans_of = list(by_markers)
    for k, spans in zip(slow, _spans_by_prefixes(tokenizer, *_pick(slow, conversations, turns_of, texts, by_markers))):
        spans_of[k] = spans
    return list(zip(texts, spans_of))


def _pick(indices: list[int], *columns: list) -> list[list]:
    return [[column[k] for k in indices] for column in columns]


# Private-use characters put around each trained answer, so one render shows where the answers are. A
# conversation that already holds them, or whose text they change, is labelled by rendering prefixes instead.
ANSWER_OPEN, ANSWER_CLOSE = "\ue000", "\ue001"


def _spans_by_markers(
    tokenizer: PreTrainedTokenizerBase, conversations: list[Conversation], turns_of: list[list[int]], texts: list[str]
) -> list[list[tuple[int, int]] | None]:
    """Each trained answer's span: from its first character through the end-of-turn marker that follows it,
    or None for a conversation where the markers do not come out around the unchanged answers."""
    marked = []
    for messages, turns in zip(conversations, turns_of):
        marked_messages = list(messages)
        for i in turns:
            marked_messages[i] = {**messages[i], "content": ANSWER_OPEN + messages[i]["content"] + ANSWER_CLOSE}
        marked.append(marked_messages)
    turn_end = end_of_turn(tokenizer) if conversations else ""
    results: list[list[tuple[int, int]] | None] = []
    for messages, turns, text, marked_text in zip(conversations, turns_of, texts, _render_many(tokenizer, marked)):
        if marked_text.count(ANSWER_OPEN) != len(turns) or marked_text.count(ANSWER_CLOSE) != len(turns):
            results.append(None)
            continue
        spans, pieces, length, cursor = [], [], 0, 0
        for i in turns:
            opening = marked_text.index(ANSWER_OPEN, cursor)
            closing = marked_text.find(ANSWER_CLOSE, opening)
            content = marked_text[opening + 1 : closing]
            if closing < 0 or content != messages[i]["content"]:
                break
            pieces += [marked_text[cursor:opening], content]
            length += opening - cursor
            start, end = length, length + len(content)
            length, cursor = end, closing + 1
            if turn_end and marked_text.startswith(turn_end, cursor):
                end += len(turn_end)
            spans.append((start, end))
        pieces.append(marked_text[cursor:])
        results.append(spans if len(spans) == len(turns) and "".join(pieces) == text else None)
    return results


def _spans_by_prefixes(
    tokenizer: PreTrainedTokenizerBase,
    conversations: list[Conversation],
    turns_of: list[list[int]],
    texts: list[str],
    by_markers: list[list[tuple[int, int]] | None],
) -> list[list[tuple[int, int]]]:
    """Each trained answer's span: from where the generation prompt of its prefix ends to the end of its turn as
    the template renders it, with all prefixes rendered in two batched calls. Where the template renders a
    prefix differently (it rewrites earlier turns), the span is the marked answer, or the answer searched for."""
    befores = iter(
        _render_many(
            tokenizer,
            [messages[:i] for messages, turns in zip(conversations, turns_of) for i in turns if i],
            add_generation_prompt=True,
        )
    )
    # A turn that ends the conversation renders as the whole text: no need to render it again.
    throughs = iter(
        _render_many(
            tokenizer,
            [
                messages[: i + 1]
                for messages, turns in zip(conversations, turns_of)
                for i in turns
                if i + 1 < len(messages)
            ],
        )
    )
    results = []
    turn_end = header = None  # rendered once, on first need
    for messages, turns, text, marked in zip(conversations, turns_of, texts, by_markers):
        spans = []
        cursor = 0
        for n, i in enumerate(turns):
            before = next(befores) if i else ""
            through = (next(throughs) if i + 1 < len(messages) else text).rstrip()
            if text.startswith(before) and text.startswith(through) and len(before) < len(through):
                start, end = len(before), len(through)
            elif marked is not None:
                start, end = marked[n]
            else:
                if turn_end is None:
                    turn_end = end_of_turn(tokenizer)
                start = text.find(messages[i]["content"], cursor)
                if start >= 0:
                    end = start + len(messages[i]["content"])
                    if turn_end and text.startswith(turn_end, end):
                        end += len(turn_end)
                else:  # the template rewrote the answer (Qwen3's drops earlier turns' reasoning)
                    if header is None:
                        header = assistant_header(tokenizer)
                    start, end = _rendered_turn(messages, i, text, header, turn_end)
            spans.append((start, end))
            cursor = end
        results.append(spans)
    return results


def _rendered_turn(messages: Conversation, i: int, text: str, header: str, turn_end: str) -> tuple[int, int]:
    """The span of assistant message `i` as the template rendered it, when it did not render it verbatim: from
    the end of its assistant `header` to its end-of-turn marker. Found by counting headers, so it needs as many
    assistant headers in the text as there are assistant messages."""
    headers = []
    position = text.find(header) if header else -1
    while position >= 0:
        headers.append(position + len(header))
        position = text.find(header, position + len(header))
    assistants = [k for k, message in enumerate(messages) if message["role"] == "assistant"]
    start = headers[assistants.index(i)] if len(headers) == len(assistants) else -1
    end = text.find(turn_end, start) if start >= 0 and turn_end else -1
    if end < 0:
        between = f"between {header!r} and {turn_end!r}" if header and turn_end else "(no generation prompt)"
        raise ValueError(
            f"the chat template renders assistant message {i} ({messages[i]['content'][:60]!r}) neither verbatim "
            f"nor as a turn of its own {between}, so its tokens cannot be found"
        )
    return start, end + len(turn_end)


def assistant_header(tokenizer: PreTrainedTokenizerBase) -> str:
    """What the template writes before an assistant answer, e.g. "<|im_start|>assistant\n": the text that the
    generation prompt adds after a user message."""
    question = [{"role": "user", "content": "?"}]
    plain, prompted = render(tokenizer, question), render(tokenizer, question, add_generation_prompt=True)
    return prompted[len(plain) :] if prompted.startswith(plain) else ""


def template_overhead(tokenizer: PreTrainedTokenizerBase) -> int:
    """Tokens the chat template adds around a one-turn exchange of one-character messages."""
    text = render(tokenizer, [{"role": "user", "content": "?"}, {"role": "assistant", "content": "?"}])
    return len(tokenizer.encode(text, add_special_tokens=False)) - 2


def end_of_turn(tokenizer: PreTrainedTokenizerBase) -> str:
    """What the template writes after an assistant message's content, e.g. "<|im_end|>" or "<|eot_id|>"."""
    marker = "\u2063end-of-turn-probe\u2063"
    text = render(tokenizer, [{"role": "user", "content": "?"}, {"role": "assistant", "content": marker}])
    return text[text.rindex(marker) + len(marker) :].strip()


def _labels_from_offsets(
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


def _labels_of_encoding(encoding: Any, input_ids: list[int], spans: list[tuple[int, int]]) -> list[int]:
    """`_labels_from_offsets` from a Rust `tokenizers.Encoding` of `input_ids`, asking it only for the tokens at
    the span edges: turning every token's offsets into Python tuples costs more than the encoding itself."""
    labels = [IGNORE_INDEX] * len(input_ids)
    for span_start, span_end in spans:
        first, last = encoding.char_to_token(span_start), encoding.char_to_token(span_end - 1)
        if first is None or last is None:  # an edge on a character no token covers (trimmed whitespace)
            return _labels_from_offsets(input_ids, encoding.offsets, spans)
        # Byte-level tokens can split one character, so neighbours may share the edge character.
        while first > 0 and encoding.token_to_chars(first - 1)[1] > span_start:
            first -= 1
        while last + 1 < len(input_ids) and encoding.token_to_chars(last + 1)[0] < span_end:
            last += 1
        labels[first : last + 1] = input_ids[first : last + 1]
    return labels


def _tokenize_pieces(
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
) -> list[Tokenized]:
    """`tokenize_conversation` of many conversations: rendered in batched template calls and, with a fast
    tokenizer, encoded in one batched call (the Rust tokenizer spreads it over threads)."""
    rendered = label_spans_many(tokenizer, conversations, train_on)
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
            pieces.append((input_ids, _labels_of_encoding(encoding, input_ids, spans)))
    else:
        pieces = [_tokenize_pieces(tokenizer, text, spans) for text, spans in rendered]
    results = []
    for input_ids, labels in pieces:
        status = "ok"
        if len(input_ids) > max_length:
            if drop_long:
                results.append(Tokenized([], [], "dropped_too_long"))
                continue
            input_ids, labels, status = input_ids[:max_length], labels[:max_length], "truncated"
        if labels.count(IGNORE_INDEX) == len(labels):
            results.append(Tokenized([], [], "dropped_no_label"))
            continue
        results.append(Tokenized(input_ids, labels, status))
    return results


# ----------------------------------------------------------------------------------------------------------
# Whole data sets
# ----------------------------------------------------------------------------------------------------------


def _tokenize_batch(batch: dict, tokenizer, max_length: int, train_on: TrainOn, drop_long: bool) -> dict:
    conversations = [json.loads(messages) for messages in batch["messages"]]
    out: dict[str, list] = {"input_ids": [], "labels": [], "length": [], "status": []}
    for tokenized in tokenize_many(tokenizer, conversations, max_length, train_on, drop_long):
        out["input_ids"].append(tokenized.input_ids)
        out["labels"].append(tokenized.labels)
        out["length"].append(len(tokenized.input_ids))
        out["status"].append(tokenized.status)
    return out


def _fingerprint(records: list[str], tokenizer, max_length: int, train_on: str, drop_long: bool) -> str:
    digest = hashlib.sha256()
    for record in records:
        digest.update(record.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    vocabulary = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    for part in (vocabulary, chat_template_of(tokenizer), type(tokenizer).__name__, max_length, train_on, drop_long):
        digest.update(str(part).encode())
    return digest.hexdigest()[:24]


def tokenize_conversations(
    conversations: list[Conversation],
    tokenizer: PreTrainedTokenizerBase,
    max_length: int,
    train_on: TrainOn = "assistant",
    drop_long: bool = False,
    num_proc: int | None = None,
    cache_dir: str | os.PathLike | None = None,
    description: str = "train",
) -> tuple[datasets.Dataset, Counter]:
    """Tokenised, labelled data set (columns input_ids, labels, length) and the count of each sample's fate
    ("ok", "truncated", "dropped_too_long", "dropped_no_label"), which is also logged.

    Results are cached in `cache_dir` (default: the datasets cache) under a hash of the conversations, the
    tokenizer and the options, so an unchanged rerun skips tokenisation.
    """
    cache_dir = Path(cache_dir or datasets.config.HF_DATASETS_CACHE) / "llm_finetuning"
    cache_dir.mkdir(parents=True, exist_ok=True)
    # Each conversation as one JSON string: Arrow stores and hands back strings far faster than nested lists of
    # dicts, and the same strings make the cache key.
    records = [json.dumps(messages, ensure_ascii=False) for messages in conversations]
    fingerprint = _fingerprint(records, tokenizer, max_length, train_on, drop_long)
    dataset = datasets.Dataset.from_dict({"messages": records})
    dataset = dataset.map(
        _tokenize_batch,
        batched=True,
        num_proc=num_proc if num_proc and num_proc > 1 and len(dataset) > 1 else None,
        remove_columns=["messages"],
        fn_kwargs=dict(tokenizer=tokenizer, max_length=max_length, train_on=train_on, drop_long=drop_long),
        cache_file_name=str(cache_dir / f"tokenized-{fingerprint}.arrow"),
        new_fingerprint=fingerprint,
        desc=f"Tokenising {description} data",
    )
    counts = Counter(dataset["status"])
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
        raise ValueError(f"no {description} sample is left to train on: {dict(counts)} (raise --model_max_length?)")
    if kept < len(dataset):
        dataset = dataset.select([k for k, status in enumerate(dataset["status"]) if status in ("ok", "truncated")])
    return dataset.remove_columns("status"), counts


def make_collator(tokenizer: PreTrainedTokenizerBase, pad_to_length: int | None = None) -> DataCollatorForSeq2Seq:
    """Pads each batch to its longest sample (default), or every batch to `pad_to_length` (for comparison)."""
    return DataCollatorForSeq2Seq(
        tokenizer,
        padding="max_length" if pad_to_length else "longest",
        max_length=pad_to_length,
        label_pad_token_id=IGNORE_INDEX,
    )
