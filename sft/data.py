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

from sft.errors import ConfigurationError, UserError

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

# A message is {"role", "content"}; an assistant message may also carry "tool_calls" (then its content may be
# empty), a "tool" message the result of a call (with optional "name" and "tool_call_id"), as Hugging Face chat
# templates expect them. A conversation whose sample declares tools starts with a {"role": TOOLS_ROLE, "tools":
# [...]} entry: it keeps the tools with their conversation (prefixes included, JSON storage too) and `render` passes
# them to the template as `tools=`; it is never a message of its own.
Message = dict[str, Any]
Conversation = list[Message]
TrainOn = Literal["assistant", "last_assistant", "all"]
TOOLS_ROLE = "tools"

ROLE_NAMES = {
    "system": "system",
    "user": "user",
    "human": "user",
    "assistant": "assistant",
    "gpt": "assistant",
    "tool": "tool",
    # ShareGPT as LLaMA-Factory writes it: a call is an assistant turn, its result a tool turn.
    "function_call": "assistant",
    "observation": "tool",
}
ALPACA_KEYS = ("instruction", "input", "output", "system")


class DataError(UserError, ValueError):
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


def _json_value(value: Any, path: Path, where: str, field: str, expected: type | tuple[type, ...], what: str) -> Any:
    """A value that may be given as JSON text or as the JSON value itself, checked to be of type `expected`."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except (ValueError, RecursionError):
            raise DataError(path, where, field, f"not valid JSON (expected {what})") from None
    if not isinstance(value, expected):
        raise DataError(path, where, field, f"expected {what}, got {type(value).__name__}")
    return value


def _tool_call(call: Any, path: Path, where: str, field: str) -> dict:
    """One call, OpenAI form {"type": "function", "function": {"name", "arguments"}} or bare {"name", "arguments"},
    as templates expect it: the OpenAI form with the arguments as an object."""
    if not isinstance(call, dict):
        raise DataError(path, where, field, f"expected an object, got {type(call).__name__}")
    function, function_field = (call["function"], f"{field}.function") if "function" in call else (call, field)
    if not isinstance(function, dict):
        raise DataError(path, where, function_field, f"expected an object, got {type(function).__name__}")
    if "name" not in function:
        raise DataError(path, where, f"{function_field}.name", "missing")
    name = _text(function["name"], path, where, f"{function_field}.name")
    arguments = _json_value(
        function.get("arguments", {}), path, where, f"{function_field}.arguments", dict, "a JSON object"
    )
    normal: dict[str, Any] = {"type": "function", "function": {"name": name, "arguments": arguments}}
    if call.get("id") is not None:
        normal["id"] = _text(call["id"], path, where, f"{field}.id")
    return normal


def _tools(value: Any, path: Path, where: str) -> list[dict]:
    """A sample's tool schemas (a list, or the JSON text of one, as LLaMA-Factory stores them), each in the OpenAI
    form {"type": "function", "function": {...}} that templates render."""
    tools = _json_value(value, path, where, "tools", list, "a JSON list of tool schemas")
    normal = []
    for index, tool in enumerate(tools):
        field = f"tools[{index}]"
        if not isinstance(tool, dict):
            raise DataError(path, where, field, f"expected an object, got {type(tool).__name__}")
        function = tool.get("function", tool)
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise DataError(path, where, f"{field}.name", "missing: a tool schema needs a function name")
        normal.append(tool if "function" in tool else {"type": "function", "function": tool})
    return normal


def _turns(record: dict, key: str, role_key: str, content_key: str, path: Path, where: str) -> Conversation:
    turns = record[key]
    if not isinstance(turns, list) or not turns:
        raise DataError(path, where, key, "expected a non-empty list of messages")
    messages: Conversation = []
    call_ids: set[str] | None = None  # ids of the calls the next tool results answer; None: no call to answer
    for index, turn in enumerate(turns):
        field = f"{key}[{index}]"
        if not isinstance(turn, dict):
            raise DataError(path, where, field, f"expected an object, got {type(turn).__name__}")
        if role_key not in turn:
            found = ", ".join(map(repr, turn)) or "none"
            raise DataError(path, where, f"{field}.{role_key}", f"missing (keys found: {found})")
        role = _role(turn[role_key], path, where, f"{field}.{role_key}")
        message: Message = {"role": role}
        if role == "assistant" and turn[role_key].lower() == "function_call":  # ShareGPT: the value is the call(s)
            value = _json_value(
                turn.get(content_key), path, where, f"{field}.{content_key}", (dict, list), "a JSON call or list"
            )
            calls = value if isinstance(value, list) else [value]
            message["content"] = ""
            message["tool_calls"] = [
                _tool_call(call, path, where, f"{field}.{content_key}" + (f"[{n}]" if isinstance(value, list) else ""))
                for n, call in enumerate(calls)
            ]
        elif role == "assistant" and turn.get("tool_calls") not in (None, []):  # [] as some writers put
            calls = turn["tool_calls"]
            if not isinstance(calls, list) or not calls:
                raise DataError(path, where, f"{field}.tool_calls", "expected a non-empty list of calls")
            content = turn.get(content_key)
            message["content"] = "" if content is None else _text(content, path, where, f"{field}.{content_key}", True)
            message["tool_calls"] = [
                _tool_call(call, path, where, f"{field}.tool_calls[{n}]") for n, call in enumerate(calls)
            ]
        else:
            if content_key not in turn:
                found = ", ".join(map(repr, turn)) or "none"
                raise DataError(path, where, f"{field}.{content_key}", f"missing (keys found: {found})")
            message["content"] = _text(turn[content_key], path, where, f"{field}.{content_key}", role == "tool")
        if role == "tool":
            if call_ids is None:
                raise DataError(path, where, field, "a tool result with no tool call before it")
            for optional in ("name", "tool_call_id"):
                if turn.get(optional) is not None:
                    message[optional] = _text(turn[optional], path, where, f"{field}.{optional}")
            if call_ids and message.get("tool_call_id", next(iter(call_ids))) not in call_ids:
                raise DataError(
                    path,
                    where,
                    f"{field}.tool_call_id",
                    f"{message['tool_call_id']!r} is not the id of a call before it",
                )
        else:
            call_ids = (
                {call.get("id", "") for call in message["tool_calls"]} - {""} if "tool_calls" in message else None
            )
        messages.append(message)
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
    if record.get("tools") not in (None, "", []):
        messages.insert(0, {"role": TOOLS_ROLE, "tools": _tools(record["tools"], path, where)})
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


def load_tools(path: str | os.PathLike) -> list[dict]:
    """Tool schemas from a JSON file holding a list of them (OpenAI form or bare functions), checked."""
    records = read_records(path)
    if len(records) == 1 and isinstance(records[0][1], list):
        return _tools(records[0][1], Path(path), "")
    return _tools([record for _, record in records], Path(path), "")


class Conversations(list):
    """The conversations of one data file, with where each came from (`path`, `wheres`), so that problems found
    later, when the chat template renders them, are reported at their place in the file too."""

    def __init__(self, conversations: list[Conversation], path: str | os.PathLike, wheres: list[str]):
        super().__init__(conversations)
        self.path, self.wheres = str(path), wheres


def load_conversations(path: str | os.PathLike, default_system: str | None = None) -> Conversations:
    """Reads and checks a whole data file; a sample without a system message gets `default_system`."""
    records = read_records(path)
    conversations = Conversations([parse_record(record, path, where) for where, record in records], path, [])
    conversations.wheres = [where for where, _ in records]
    if not conversations:
        raise DataError(path, "", None, "no samples in the file")
    if default_system:
        for messages in conversations:
            if not any(message["role"] == "system" for message in messages):
                messages.insert(0, {"role": "system", "content": default_system})
    return conversations


# ----------------------------------------------------------------------------------------------------------
# Rendering and labelling
# ----------------------------------------------------------------------------------------------------------


def chat_template_of(tokenizer: PreTrainedTokenizerBase) -> str:
    return tokenizer.chat_template or CHATML_TEMPLATE


def split_tools(messages: Conversation) -> tuple[Conversation, list[dict] | None]:
    """The messages as the template takes them, and the conversation's tools (None when it declares none)."""
    if not any(message["role"] == TOOLS_ROLE for message in messages):
        return messages, None
    tools = [tool for message in messages if message["role"] == TOOLS_ROLE for tool in message["tools"]]
    return [message for message in messages if message["role"] != TOOLS_ROLE], tools


def with_tools(messages: Conversation, tools: list[dict] | None) -> Conversation:
    """`messages` with the tool schemas `tools` declared (as `load_conversations` keeps a sample's tools)."""
    return [{"role": TOOLS_ROLE, "tools": tools}, *messages] if tools else messages


def render(tokenizer: PreTrainedTokenizerBase, messages: Conversation, add_generation_prompt: bool = False) -> str:
    """The conversation as text, exactly as the model sees it at training and at inference."""
    messages, tools = split_tools(messages)
    return tokenizer.apply_chat_template(
        messages,
        tools=tools,
        chat_template=chat_template_of(tokenizer),
        tokenize=False,
        add_generation_prompt=add_generation_prompt,
    )


class TemplateRefusal(ValueError):
    """The chat template raised an error (or left tool calls out) rendering conversation `index` of a batch."""

    def __init__(self, index: int, message: str):
        super().__init__(index, message)  # both in args: the exception survives pickling between processes
        self.index, self.message = index, message

    def __str__(self) -> str:
        return self.message


def _try_render_many(
    tokenizer: PreTrainedTokenizerBase, conversations: list[Conversation], add_generation_prompt: bool = False
) -> tuple[list[str | None], list[str | None]]:
    """Each conversation rendered, or None and the reason where the template raised an error for it.

    Conversations are rendered in one batched `apply_chat_template` call per set of tools (same text as one call
    each, less overhead); only a batch the template refuses is rendered again one by one, to find which."""
    texts: list[str | None] = [None] * len(conversations)
    errors: list[str | None] = [None] * len(conversations)
    groups: dict[str, tuple[list[dict] | None, list[int], list[Conversation]]] = {}
    for k, messages in enumerate(conversations):
        plain, tools = split_tools(messages)
        group = groups.setdefault(json.dumps(tools, sort_keys=True) if tools else "", (tools, [], []))
        group[1].append(k)
        group[2].append(plain)
    template = chat_template_of(tokenizer)
    for tools, indices, plains in groups.values():
        options = dict(tools=tools, chat_template=template, tokenize=False, add_generation_prompt=add_generation_prompt)
        try:
            rendered = tokenizer.apply_chat_template(plains, **options)
        except Exception:  # a template raises whatever its author wrote (TemplateError, TypeError, ...)
            rendered = []
            for k, plain in zip(indices, plains):
                try:
                    rendered.append(tokenizer.apply_chat_template(plain, **options))
                except Exception as error:
                    rendered.append(None)
                    errors[k] = f"{type(error).__name__}: {error}" if not str(error) else str(error)
        for k, text in zip(indices, rendered):
            texts[k] = text
    return texts, errors


def _render_many(
    tokenizer: PreTrainedTokenizerBase, conversations: list[Conversation], add_generation_prompt: bool = False
) -> list[str]:
    """`render` of many conversations, batched; `TemplateRefusal` for the first one the template refuses."""
    texts, errors = _try_render_many(tokenizer, conversations, add_generation_prompt)
    for k, error in enumerate(errors):
        if error is not None:
            raise TemplateRefusal(k, f"the chat template refuses this conversation: {error}")
    return texts  # type: ignore[return-value]


def _fold_system(messages: Conversation) -> Conversation | None:
    """The conversation with its system message put at the start of the first user message (what the cards of
    models whose templates refuse a system role recommend), or None when it has no system message to fold."""
    system = next((k for k, message in enumerate(messages) if message["role"] == "system"), None)
    user = next((k for k, message in enumerate(messages) if message["role"] == "user"), None)
    if system is None or user is None or user < system:
        return None
    folded = [message for k, message in enumerate(messages) if k != system]
    first = folded.index(messages[user])
    folded[first] = {**messages[user], "content": messages[system]["content"] + "\n\n" + messages[user]["content"]}
    return folded


def _missing_tool_text(messages: Conversation, text: str) -> str | None:
    """What of the conversation's tool use the rendered text leaves out (a template without tool support drops
    tools, calls or results silently), or None when it is all there."""
    plain, tools = split_tools(messages)
    for tool in tools or []:
        name = tool.get("function", tool).get("name")
        if name not in text:
            return f"the declared tool {name!r}"
    for message in plain:
        for call in message.get("tool_calls", []):
            if call["function"]["name"] not in text:
                return f"the call of {call['function']['name']!r}"
        result = message["content"].strip() if message["role"] == "tool" else ""
        if result not in text and json.dumps(result, ensure_ascii=False)[1:-1] not in text:
            return f"the tool result {result[:40]!r}"
    return None


def _render_for_training(
    tokenizer: PreTrainedTokenizerBase, conversations: list[Conversation], fold_system: bool
) -> tuple[list[Conversation], list[str], list[bool]]:
    """The conversations as rendered (system messages folded where the template refuses them and `fold_system`),
    their texts and which were folded; `TemplateRefusal` for the first conversation that cannot be rendered."""
    texts, errors = _try_render_many(tokenizer, conversations)
    folded = [False] * len(conversations)
    if any(error is not None for error in errors):
        conversations = list(conversations)
        for k, error in enumerate(errors):
            if error is None:
                continue
            without_system = _fold_system(conversations[k])
            if without_system is not None:
                (text,), (folded_error,) = _try_render_many(tokenizer, [without_system])
                if folded_error is None and fold_system:
                    conversations[k], texts[k], folded[k] = without_system, text, True
                    continue
                if folded_error is None:
                    error += (
                        " (it renders with the system message put into the first user message: "
                        "--fold_system_prompt true does that)"
                    )
            raise TemplateRefusal(k, f"the chat template refuses this conversation: {error}")
    for k, (messages, text) in enumerate(zip(conversations, texts)):
        for i, message in enumerate(messages):
            # Some templates (vision models') render only content given as a list of parts, and leave a plain
            # answer out: nothing of it would be trained. Its end is checked (after any closing tag: Qwen3's drops
            # the reasoning of earlier answers). Text beside tool calls may be dropped (Llama 3.1's).
            if message["role"] != "assistant" or "tool_calls" in message:
                continue
            end = message["content"].rsplit(">", 1)[-1].strip()[-32:]
            if end not in text:
                raise TemplateRefusal(
                    k,
                    f"the chat template does not write assistant message {i} ({message['content'][:40]!r}) as given: "
                    f"its end {end!r} is not in the text, so its tokens cannot be found (does the template take "
                    "content only as a list of parts?)",
                )
        if messages[0]["role"] == TOOLS_ROLE or any("tool_calls" in message for message in messages):
            missing = _missing_tool_text(messages, text)
            if missing:
                raise TemplateRefusal(
                    k,
                    f"the chat template does not render tool use: {missing} is not in its text (a model whose "
                    "template supports tools is needed for this sample)",
                )
    return conversations, texts, folded  # type: ignore[return-value]


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
    """`label_spans` of many conversations."""
    return [(text, spans) for text, spans, _ in _label_many(tokenizer, conversations, train_on)]


def _label_many(
    tokenizer: PreTrainedTokenizerBase,
    conversations: list[Conversation],
    train_on: TrainOn = "assistant",
    fold_system: bool = True,
) -> list[tuple[str, list[tuple[int, int]], bool]]:
    """The training text of each conversation, its trained spans, and whether its system message was folded into
    the first user message (`_render_for_training`).

    Rendering every prefix of every conversation costs a render per turn, so the answers are first found in
    one render with markers around them (`_spans_by_markers`). That shortcut is only taken where it gives the
    prefix spans exactly: one conversation of each role sequence in the batch is checked against
    `_spans_by_prefixes`, and any conversation the markers would change takes the prefix path itself.
    Then every answer the template ends with no end-of-turn marker gets the tokenizer's eos token after it
    (`_add_stops`), so that the model learns to stop.
    """
    conversations, texts, folded = _render_for_training(tokenizer, conversations, fold_system)
    if train_on == "all":
        return [(text, [(0, len(text))], was_folded) for text, was_folded in zip(texts, folded)]
    turns_of = []
    for messages in conversations:
        turns = [i for i, message in enumerate(messages) if message["role"] == "assistant"]
        turns_of.append(turns[-1:] if train_on == "last_assistant" else turns)

    turn_end = end_of_turn(tokenizer) if conversations else ""
    by_markers = _spans_by_markers(tokenizer, conversations, turns_of, texts, turn_end)
    one_of_each_shape = {}
    for k, (messages, spans) in enumerate(zip(conversations, by_markers)):
        if spans is not None:
            one_of_each_shape.setdefault(tuple(message["role"] for message in messages), k)
    checked = list(one_of_each_shape.values())
    expected = _spans_of(tokenizer, checked, conversations, turns_of, texts, by_markers)
    fast = all(by_markers[k] == spans for k, spans in zip(checked, expected))
    slow = [k for k, spans in enumerate(by_markers) if spans is None or not fast]
    spans_of = list(by_markers)
    for k, spans in zip(slow, _spans_of(tokenizer, slow, conversations, turns_of, texts, by_markers)):
        spans_of[k] = spans
        for i, (start, end) in zip(turns_of[k], spans):
            repeated = _repeated_prompt(conversations[k], i, texts[k][start:end])
            if repeated is not None:
                raise TemplateRefusal(
                    k,
                    f"the chat template writes the text of message {repeated} into assistant message {i}'s turn, "
                    "so that text would be trained on as the answer",
                )
    eos = tokenizer.eos_token or ""
    # A tool-call turn may end with a marker of its own (Llama 3.1's <|eom_id|>): any special token counts.
    call_ends: tuple[str, ...] = ()
    if any("tool_calls" in messages[i] for messages, turns in zip(conversations, turns_of) for i in turns):
        call_ends = tuple(str(token) for token in tokenizer.added_tokens_decoder.values() if token.special)
    results = []
    for messages, turns, text, spans, was_folded in zip(conversations, turns_of, texts, spans_of, folded):
        text, spans = _add_stops(messages, turns, text, spans, turn_end, eos, call_ends)
        results.append((text, spans, was_folded))
    return results


def _repeated_prompt(messages: Conversation, i: int, trained: str) -> int | None:
    """The index of a system or user message whose text (of 8 characters or more) a template repeats inside the
    turn of assistant message `i` (some write the system prompt before every turn), or None."""
    trained = trained.replace(messages[i]["content"], "", 1)
    for k, message in enumerate(messages):
        if message["role"] in ("system", "user") and len(message["content"].strip()) >= 8:
            if message["content"].strip() in trained:
                return k
    return None


def _add_stops(
    messages: Conversation,
    turns: list[int],
    text: str,
    spans: list[tuple[int, int]],
    turn_end: str,
    eos: str,
    call_ends: tuple[str, ...] = (),
) -> tuple[str, list[tuple[int, int]]]:
    """The text and spans with `eos` inserted and trained after each answer that the template ends with nothing
    (its span ends with the answer's own text, or a tool call's with no end-of-turn marker or other special token
    in `call_ends`): a model trained on such text never learns to stop. Answers followed by the template's
    end-of-turn marker are left alone."""
    if not eos:
        return text, spans
    pieces, new_spans, shift, cursor = [], [], 0, 0
    for i, (start, end) in zip(turns, spans):
        trained = text[start:end].rstrip()
        stopped = (turn_end and trained.endswith(turn_end)) or trained.endswith(eos)
        if "tool_calls" in messages[i]:
            stopped = stopped or trained.endswith(call_ends)
        if not stopped and ("tool_calls" in messages[i] or trained.endswith(messages[i]["content"].rstrip())):
            pieces += [text[cursor:end], eos]
            new_spans.append((start + shift, end + shift + len(eos)))
            shift += len(eos)
            cursor = end
        else:
            new_spans.append((start + shift, end + shift))
    if not shift:
        return text, spans
    pieces.append(text[cursor:])
    return "".join(pieces), new_spans


def _pick(indices: list[int], *columns: list) -> list[list]:
    return [[column[k] for k in indices] for column in columns]


def _spans_of(tokenizer: PreTrainedTokenizerBase, indices: list[int], *columns: list) -> list[list[tuple[int, int]]]:
    """`_spans_by_prefixes` of the conversations at `indices`, a refusal naming its index among all."""
    try:
        return _spans_by_prefixes(tokenizer, *_pick(indices, *columns))
    except TemplateRefusal as error:
        raise TemplateRefusal(indices[error.index], error.message) from None


# Private-use characters put around each trained answer, so one render shows where the answers are. A
# conversation that already holds them, or whose text they change, is labelled by rendering prefixes instead.
ANSWER_OPEN, ANSWER_CLOSE = "\ue000", "\ue001"


def _spans_by_markers(
    tokenizer: PreTrainedTokenizerBase,
    conversations: list[Conversation],
    turns_of: list[list[int]],
    texts: list[str],
    turn_end: str | None = None,
) -> list[list[tuple[int, int]] | None]:
    """Each trained answer's span: from its first character through the end-of-turn marker that follows it,
    or None for a conversation where the markers do not come out around the unchanged answers, or where a
    trained turn holds tool calls (the template writes them outside the content the markers go around)."""
    marked = []
    for messages, turns in zip(conversations, turns_of):
        marked_messages = list(messages)
        for i in turns:
            marked_messages[i] = {**messages[i], "content": ANSWER_OPEN + messages[i]["content"] + ANSWER_CLOSE}
        marked.append(marked_messages)
    if turn_end is None:
        turn_end = end_of_turn(tokenizer) if conversations else ""
    results: list[list[tuple[int, int]] | None] = []
    marked_texts, _ = _try_render_many(tokenizer, marked)
    for messages, turns, text, marked_text in zip(conversations, turns_of, texts, marked_texts):
        if (
            marked_text is None
            or any("tool_calls" in messages[i] for i in turns)
            or marked_text.count(ANSWER_OPEN) != len(turns)
            or marked_text.count(ANSWER_CLOSE) != len(turns)
        ):
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
        _try_render_many(
            tokenizer,
            [messages[:i] for messages, turns in zip(conversations, turns_of) for i in turns if i],
            add_generation_prompt=True,
        )[0]
    )
    # A turn that ends the conversation renders as the whole text: no need to render it again.
    throughs = iter(
        _try_render_many(
            tokenizer,
            [
                messages[: i + 1]
                for messages, turns in zip(conversations, turns_of)
                for i in turns
                if i + 1 < len(messages)
            ],
        )[0]
    )
    results = []
    turn_end = header = None  # rendered once, on first need
    for k, (messages, turns, text, marked) in enumerate(zip(conversations, turns_of, texts, by_markers)):
        spans = []
        cursor = 0
        for n, i in enumerate(turns):
            before = next(befores) if i else ""
            through = next(throughs) if i + 1 < len(messages) else text
            if before is not None and through is not None:
                through = through.rstrip()
            if before is None or through is None:  # the template refuses the prefix: look for the answer
                before = through = ""
            if text.startswith(before) and text.startswith(through) and len(before) < len(through):
                start, end = len(before), len(through)
            elif marked is not None:
                start, end = marked[n]
            elif (
                "tool_calls" in messages[i]
                and through.startswith(before)
                and through[len(before) :].strip() in text[cursor:]
            ):
                # The template puts something before the turn elsewhere in the full text (Mistral's tool list goes
                # before the last user message): the turn as its prefix renders it is still in the text.
                segment = through[len(before) :].strip()
                start = text.index(segment, cursor)
                end = start + len(segment)
            else:
                if turn_end is None:
                    turn_end = end_of_turn(tokenizer)
                start = text.find(messages[i]["content"], cursor) if messages[i]["content"] else -1
                if start >= 0:
                    end = start + len(messages[i]["content"])
                    if turn_end and text.startswith(turn_end, end):
                        end += len(turn_end)
                else:  # the template rewrote the answer (Qwen3's drops earlier turns' reasoning)
                    if header is None:
                        header = assistant_header(tokenizer)
                    try:
                        start, end = _rendered_turn(messages, i, text, header, turn_end)
                    except ValueError as error:
                        raise TemplateRefusal(k, str(error)) from None
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
    try:
        text = render(tokenizer, [{"role": "user", "content": "?"}, {"role": "assistant", "content": marker}])
    except Exception:  # a template that wants more than this (a system message, ...): no marker known
        return ""
    return text[text.rindex(marker) + len(marker) :].strip() if marker in text else ""


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
) -> list[Tokenized]:
    """`tokenize_conversation` of many conversations: rendered in batched template calls and, with a fast
    tokenizer, encoded in one batched call (the Rust tokenizer spreads it over threads).

    `TemplateRefusal` names the first conversation the chat template cannot render (with its system message
    folded into the first user message too, where `fold_system`)."""
    labelled = _label_many(tokenizer, conversations, train_on, fold_system)
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
            pieces.append((input_ids, _labels_of_encoding(encoding, input_ids, spans)))
    else:
        pieces = [_tokenize_pieces(tokenizer, text, spans) for text, spans in rendered]
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


# ----------------------------------------------------------------------------------------------------------
# Whole data sets
# ----------------------------------------------------------------------------------------------------------


def _tokenize_batch(
    batch: dict, indices: list[int], tokenizer, max_length: int, train_on: TrainOn, drop_long: bool, fold_system: bool
) -> dict:
    conversations = [json.loads(messages) for messages in batch["messages"]]
    out: dict[str, list] = {"input_ids": [], "labels": [], "length": [], "status": [], "folded": []}
    try:
        tokenized_many = tokenize_many(tokenizer, conversations, max_length, train_on, drop_long, fold_system)
    except TemplateRefusal as error:  # name the sample by its index in the whole data set
        raise TemplateRefusal(indices[error.index], error.message) from None
    for tokenized in tokenized_many:
        out["input_ids"].append(tokenized.input_ids)
        out["labels"].append(tokenized.labels)
        out["length"].append(len(tokenized.input_ids))
        out["status"].append(tokenized.status)
        out["folded"].append(tokenized.folded)
    return out


# Part of every cache key: raised when what tokenisation writes changes (2: eos after unmarked answers, the
# "folded" column), so that no older cache file is read as a new one.
CACHE_FORMAT = 2


def _fingerprint(records: list[str], tokenizer, max_length: int, train_on: str, drop_long: bool, *more: Any) -> str:
    digest = hashlib.sha256()
    for record in records:
        digest.update(record.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    vocabulary = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    parts = (CACHE_FORMAT, vocabulary, chat_template_of(tokenizer), type(tokenizer).__name__, max_length, train_on)
    parts += (drop_long, *more)
    for part in parts:
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
    fold_system: bool = True,
) -> tuple[datasets.Dataset, Counter]:
    """Tokenised, labelled data set (columns input_ids, labels, length) and the count of each sample's fate
    ("ok", "truncated", "dropped_too_long", "dropped_no_label"), which is also logged.

    Results are cached in `cache_dir` (default: the datasets cache) under a hash of the conversations, the
    tokenizer and the options, so an unchanged rerun skips tokenisation.

    A conversation the chat template refuses is a `DataError` naming its file and line or sample (when the
    conversations come from `load_conversations`), and the template's message. Where the template refuses
    only the system message and `fold_system`, the system text goes into the first user message instead.
    """
    cache_dir = Path(cache_dir or datasets.config.HF_DATASETS_CACHE) / "llm_finetuning"
    cache_dir.mkdir(parents=True, exist_ok=True)
    # Each conversation as one JSON string: Arrow stores and hands back strings far faster than nested lists of
    # dicts, and the same strings make the cache key.
    records = [json.dumps(messages, ensure_ascii=False) for messages in conversations]
    fingerprint = _fingerprint(records, tokenizer, max_length, train_on, drop_long, fold_system, tokenizer.eos_token)
    dataset = datasets.Dataset.from_dict({"messages": records})
    options = dict(
        tokenizer=tokenizer, max_length=max_length, train_on=train_on, drop_long=drop_long, fold_system=fold_system
    )
    try:
        dataset = dataset.map(
            _tokenize_batch,
            batched=True,
            with_indices=True,
            num_proc=num_proc if num_proc and num_proc > 1 and len(dataset) > 1 else None,
            remove_columns=["messages"],
            fn_kwargs=options,
            cache_file_name=str(cache_dir / f"tokenized-{fingerprint}.arrow"),
            new_fingerprint=fingerprint,
            desc=f"Tokenising {description} data",
        )
    except TemplateRefusal as error:
        wheres = getattr(conversations, "wheres", None)
        path = getattr(conversations, "path", f"{description} data")
        raise DataError(path, wheres[error.index] if wheres else f"sample {error.index}", None, error.message) from None
    folded = sum(dataset["folded"])
    if folded:
        logger.info(
            "%s data: the chat template refuses a system message; in %d samples its text was put at the start of "
            "the first user message instead (--fold_system_prompt false makes this an error)",
            description,
            folded,
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
        raise ConfigurationError(
            f"no {description} sample is left to train on: {dict(counts)} (raise --model_max_length?)"
        )
    if kept < len(dataset):
        dataset = dataset.select([k for k, status in enumerate(dataset["status"]) if status in ("ok", "truncated")])
    return dataset.remove_columns(["status", "folded"]), counts


def make_collator(tokenizer: PreTrainedTokenizerBase, pad_to_length: int | None = None) -> DataCollatorForSeq2Seq:
    """Pads each batch to its longest sample (default), or every batch to `pad_to_length` (for comparison)."""
    return DataCollatorForSeq2Seq(
        tokenizer,
        padding="max_length" if pad_to_length else "longest",
        max_length=pad_to_length,
        label_pad_token_id=IGNORE_INDEX,
    )
