"""Stage 2 of the data pipeline, record formats: each record (Qwen/ShareGPT `conversations`, ChatML `messages`,
with tools and tool calls in either, trl's `prompt`/`completion`, alpaca, plain `text`) checked field by field and
turned into one list of messages. Message content may be a list of text parts; an assistant message may carry
`reasoning_content`, and `"train": false` (or `"loss_weight": 0`) to keep it out of the loss.

Anything wrong is a `DataError` naming the file, the line or sample and the field. No model is needed here.
"""

from __future__ import annotations

import difflib
import json
import os
from pathlib import Path
from typing import Any, Literal

from sft.data.reading import Conversations, DataError, read_records

# empty), a "tool" message the result of a call (with optional "name" and "tool_call_id"), as Hugging Face chat
# templates expect them. A conversation whose sample declares tools starts with a {"role": TOOLS_ROLE, "tools":
# [...]} entry: it keeps the tools with their conversation (prefixes included, JSON storage too) and `render` passes
# them to the template as `tools=`; it is never a message of its own.
Message = dict[str, Any]
Conversation = list[Message]
TrainOn = Literal["assistant", "last_assistant", "all"]
TOOLS_ROLE = "tools"
# A plain-text sample ({"text": ...}, continued pre-training) is one {"role": TEXT_ROLE, "content": text} entry:
# no chat template, every token trained, eos appended (sft.data.tokenizing.tokenize_text).
TEXT_ROLE = "text"

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


def text_field(value: Any, path: Path, where: str, field: str, allow_empty: bool = False) -> str:
    if not isinstance(value, str):
        raise DataError(path, where, field, f"expected a string, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise DataError(path, where, field, "is empty")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as error:
        raise DataError(path, where, field, f"invalid unicode: {error.reason} at character {error.start}") from None
    return value


def content_field(value: Any, path: Path, where: str, field: str, allow_empty: bool = False) -> str:
    """Message content: a string, or a list of text parts (OpenAI {"type": "text", "text": ...}, LLaMA-Factory
    {"type": "text", "value": ...}) joined into one; parts we cannot train on (images, audio) are an error."""
    if not isinstance(value, list):
        return text_field(value, path, where, field, allow_empty)
    texts = []
    for index, part in enumerate(value):
        part_field = f"{field}[{index}]"
        if isinstance(part, str):
            texts.append(part)
            continue
        if not isinstance(part, dict):
            raise DataError(path, where, part_field, f"expected a text part, got {type(part).__name__}")
        kind = part.get("type") or "text"  # None where Arrow gave every part of a column the same keys
        if kind != "text":
            raise DataError(path, where, f"{part_field}.type", f"a {kind!r} part: only text can be trained on")
        key = "text" if part.get("text") is not None else "value"
        texts.append(text_field(part.get(key), path, where, f"{part_field}.{key}", allow_empty=True))
    return text_field("".join(texts), path, where, field, allow_empty)


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
    name = text_field(function["name"], path, where, f"{function_field}.name")
    arguments = _json_value(
        function.get("arguments", {}), path, where, f"{function_field}.arguments", dict, "a JSON object"
    )
    normal: dict[str, Any] = {"type": "function", "function": {"name": name, "arguments": arguments}}
    if call.get("id") is not None:
        normal["id"] = text_field(call["id"], path, where, f"{field}.id")
    return normal


def tools_field(value: Any, path: Path, where: str) -> list[dict]:
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


def record_turns(record: dict, key: str, role_key: str, content_key: str, path: Path, where: str) -> Conversation:
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
            message["content"] = (
                "" if content is None else content_field(content, path, where, f"{field}.{content_key}", True)
            )
            message["tool_calls"] = [
                _tool_call(call, path, where, f"{field}.tool_calls[{n}]") for n, call in enumerate(calls)
            ]
        else:
            if content_key not in turn:
                found = ", ".join(map(repr, turn)) or "none"
                raise DataError(path, where, f"{field}.{content_key}", f"missing (keys found: {found})")
            message["content"] = content_field(turn[content_key], path, where, f"{field}.{content_key}", role == "tool")
        if role == "assistant" and turn.get("reasoning_content") not in (None, ""):
            message["reasoning_content"] = text_field(
                turn["reasoning_content"], path, where, f"{field}.reasoning_content"
            )
        if role == "assistant" and (turn.get("train") is False or turn.get("loss_weight") in (0, 0.0)):
            message["train"] = False  # this answer is context only: no loss on it (sft.data.labels)
        if role == "tool":
            if call_ids is None:
                raise DataError(path, where, field, "a tool result with no tool call before it")
            for optional in ("name", "tool_call_id"):
                if turn.get(optional) is not None:
                    message[optional] = text_field(turn[optional], path, where, f"{field}.{optional}")
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
    instruction = text_field(record["instruction"], path, where, "instruction")
    extra_input = text_field(record.get("input") or "", path, where, "input", allow_empty=True)
    prompt = f"{instruction}\n{extra_input}" if extra_input.strip() else instruction
    output = text_field(record["output"], path, where, "output")
    messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": output}]
    if record.get("system"):
        messages.insert(0, {"role": "system", "content": text_field(record["system"], path, where, "system")})
    return messages


def _prompt_completion(record: dict, path: Path, where: str) -> Conversation:
    """trl's prompt/completion form: two strings (a user turn and its answer), or two message lists; only the
    completion is trained on (answers inside the prompt are context)."""
    prompt, completion = record["prompt"], record["completion"]
    if isinstance(prompt, list) or isinstance(completion, list):
        if not isinstance(prompt, list) or not isinstance(completion, list):
            raise DataError(path, where, "prompt", "prompt and completion must both be strings or both message lists")
        messages = record_turns(record, "prompt", "role", "content", path, where)
        messages = [{**m, "train": False} if m["role"] == "assistant" else m for m in messages]
        return messages + record_turns(record, "completion", "role", "content", path, where)
    return [
        {"role": "user", "content": content_field(prompt, path, where, "prompt")},
        {"role": "assistant", "content": content_field(completion, path, where, "completion")},
    ]


def with_default_system(messages: Conversation, system: str | None) -> Conversation:
    """`messages` with `system` as their first message when they have no system message (plain text never)."""
    if system and not any(m["role"] in ("system", TEXT_ROLE) for m in messages):
        messages.insert(0, {"role": "system", "content": system})
    return messages


def parse_record(record: Any, path: str | os.PathLike, where: str) -> Conversation:
    """Turns one record of any supported format into messages, checking every field."""
    path = Path(path)
    if not isinstance(record, dict):
        raise DataError(path, where, None, f"expected a JSON object, got {type(record).__name__}")
    if "conversations" in record:
        messages = record_turns(record, "conversations", "from", "value", path, where)
        key = "conversations"
    elif "messages" in record:
        messages = record_turns(record, "messages", "role", "content", path, where)
        key = "messages"
    elif "prompt" in record and "completion" in record:
        messages = _prompt_completion(record, path, where)
        key = "completion"
    elif any(key in record for key in ALPACA_KEYS):
        return _alpaca(record, path, where)
    elif "text" in record:
        return [{"role": TEXT_ROLE, "content": content_field(record["text"], path, where, "text")}]
    else:
        found = ", ".join(repr(k) for k in record) or "none"
        candidates = ["conversations", "messages", "prompt", "completion", "text", *ALPACA_KEYS]
        hints = {m for k in record if isinstance(k, str) for m in difflib.get_close_matches(k, candidates, n=1)}
        hint = f"; did you mean {', '.join(sorted(hints))}?" if hints else ""
        raise DataError(
            path,
            where,
            None,
            f"unknown format: keys found {found}; expected 'conversations' (Qwen), 'messages' (ChatML), "
            f"'prompt'/'completion', 'instruction'/'input'/'output' (alpaca) or 'text' (plain text){hint}",
        )
    for index, message in enumerate(messages):
        if message["role"] == "system" and index != 0:
            raise DataError(path, where, f"{key}[{index}]", "a system message may only come first")
    if not any(message["role"] == "assistant" for message in messages):
        raise DataError(path, where, key, "no assistant turn: nothing to learn from this sample")
    if record.get("tools") not in (None, "", []):
        messages.insert(0, {"role": TOOLS_ROLE, "tools": tools_field(record["tools"], path, where)})
    return messages


def record_format(record: Any) -> str:
    """Which format `parse_record` reads `record` as: "qwen" ('conversations'), "chatml" ('messages'), "alpaca",
    or "unknown" (for reports such as sft.inspect's; parse_record tests the same keys in the same order)."""
    if isinstance(record, dict):
        if "conversations" in record:
            return "qwen"
        if "messages" in record:
            return "chatml"
        if "prompt" in record and "completion" in record:
            return "prompt_completion"
        if any(key in record for key in ALPACA_KEYS):
            return "alpaca"
        if "text" in record:
            return "text"
    return "unknown"


def load_tools(path: str | os.PathLike) -> list[dict]:
    """Tool schemas from a JSON file holding a list of them (OpenAI form or bare functions), checked."""
    records = read_records(path)
    if len(records) == 1 and isinstance(records[0][1], list):
        return tools_field(records[0][1], Path(path), "")
    return tools_field([record for _, record in records], Path(path), "")


def load_conversations(path: str | os.PathLike, default_system: str | None = None) -> Conversations:
    """Reads and checks a whole data file; a sample without a system message gets `default_system`."""
    records = read_records(path)
    conversations = Conversations([parse_record(record, path, where) for where, record in records], path, [])
    conversations.wheres = [where for where, _ in records]
    if not conversations:
        raise DataError(path, "", None, "no samples in the file")
    for messages in conversations:
        with_default_system(messages, default_system)
    return conversations
