"""Stage 4 of the data pipeline, labelling (the decision): a template profile, computed once per tokenizer and
chat template, that says how answers are found in its texts.

The profile renders a few fixed probe conversations and records what the template does: its end-of-turn marker,
its assistant header, whether it takes a system message and tools, whether a conversation's prefixes render as
prefixes of its text, whether it marks answers with `{% generation %}`. From that, one strategy for every
conversation (see `sft.data.spans`):
- "generation" where the template has `{% generation %}` (and the tokenizer is fast): the template's own word on
  what an answer is;
- "markers" where one marked render gives exactly the spans that rendering prefixes gives on every probe;
- "prefixes" otherwise.
A conversation the chosen way cannot label (its answer rewritten, tool calls, ...) is labelled by prefixes on its
own; nothing depends on the other conversations of a batch, so labels are a function of the conversation, the
tokenizer and the options alone.
"""

from __future__ import annotations

import logging
import re
import weakref
from dataclasses import dataclass
from typing import Literal

from transformers import PreTrainedTokenizerBase

from sft.data.formats import TOOLS_ROLE, Conversation
from sft.data.spans import spans_by_markers, spans_by_prefixes
from sft.data.templates import (
    TemplateRefusal,
    assistant_header,
    chat_template_of,
    end_of_turn,
    missing_tool_text,
    try_render_many,
)

logger = logging.getLogger("sft.data")

Strategy = Literal["generation", "markers", "prefixes"]
GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")

_SYSTEM = {"role": "system", "content": "You answer in one short sentence."}
_PROBES: list[Conversation] = [
    [{"role": "user", "content": "What is the capital of France?"}, {"role": "assistant", "content": "Paris."}],
    [_SYSTEM, {"role": "user", "content": "Name a river."}, {"role": "assistant", "content": "The Loire."}],
    [
        {"role": "user", "content": "Count to two."},
        {"role": "assistant", "content": "One, two."},
        {"role": "user", "content": "And to three?"},
        {"role": "assistant", "content": "One, two, three."},
    ],
    [
        _SYSTEM,
        {"role": "user", "content": "Say hello."},
        {"role": "assistant", "content": "Hello there."},
        {"role": "user", "content": "Say goodbye."},
        {"role": "assistant", "content": "Goodbye now."},
    ],
]
_TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {}}}}
_TOOL_PROBE: Conversation = [
    {"role": TOOLS_ROLE, "tools": [_TOOL]},
    {"role": "user", "content": "Weather in Paris?"},
    {
        "role": "assistant",
        "content": "",
        "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}],
    },
    {"role": "tool", "content": "sunny"},
    {"role": "assistant", "content": "It is sunny."},
]


@dataclass(frozen=True)
class TemplateProfile:
    """What a chat template does, as the labelling needs it, and the labelling strategy that follows."""

    end_of_turn: str
    assistant_header: str
    system: bool  # renders a system message
    tools: bool  # renders declared tools, calls and results
    prefixes_are_prefixes: bool  # each prefix of a probe conversation renders as a prefix of its text
    generation: bool  # marks answers with {% generation %}
    strategy: Strategy

    def describe(self) -> str:
        """One line for the log: the strategy and what it was chosen from."""

        def yes(flag: bool) -> str:
            return "yes" if flag else "no"

        return (
            f"labelling by {self.strategy} (end of turn {self.end_of_turn!r}, assistant header "
            f"{self.assistant_header!r}, system {yes(self.system)}, tools {yes(self.tools)}, "
            f"prefixes render as prefixes: {yes(self.prefixes_are_prefixes)}, "
            f"{{% generation %}}: {yes(self.generation)})"
        )


# Per tokenizer, per (template, special tokens): the profile is computed once, not per batch.
_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def template_profile(tokenizer: PreTrainedTokenizerBase) -> TemplateProfile:
    """The profile of the tokenizer's chat template, computed on first use, logged then, and remembered."""
    key = (chat_template_of(tokenizer), tokenizer.bos_token, tokenizer.eos_token, tokenizer.is_fast)
    profiles = _CACHE.setdefault(tokenizer, {})
    if key not in profiles:
        profiles[key] = compute_profile(tokenizer)
        logger.info("chat template: %s", profiles[key].describe())
    return profiles[key]


def compute_profile(tokenizer: PreTrainedTokenizerBase) -> TemplateProfile:
    """Renders the probe conversations and derives the profile (a few dozen template calls)."""
    turn_end = end_of_turn(tokenizer)
    texts, errors = try_render_many(tokenizer, _PROBES)
    probes = [(messages, text) for messages, text in zip(_PROBES, texts) if text is not None]
    system = errors[1] is None and _SYSTEM["content"] in (texts[1] or "")
    (tool_text,), (tool_error,) = try_render_many(tokenizer, [_TOOL_PROBE])
    tools = tool_error is None and missing_tool_text(_TOOL_PROBE, tool_text) is None

    conversations = [messages for messages, _ in probes]
    turns_of = [[i for i, message in enumerate(messages) if message["role"] == "assistant"] for messages in _PROBES]
    turns_of = [turns for turns, text in zip(turns_of, texts) if text is not None]
    rendered = [text for _, text in probes]
    prefixes = _prefixes_render_as_prefixes(tokenizer, conversations, turns_of, rendered)
    try:
        expected = spans_by_prefixes(tokenizer, conversations, turns_of, rendered)
    except TemplateRefusal:
        expected = None
    generation = bool(GENERATION_TAG.search(chat_template_of(tokenizer))) and tokenizer.is_fast
    markers = spans_by_markers(tokenizer, conversations, turns_of, rendered, turn_end)
    strategy: Strategy = "prefixes"
    if generation:
        strategy = "generation"
    elif probes and expected is not None and markers == expected:
        strategy = "markers"
    return TemplateProfile(turn_end, assistant_header(tokenizer), system, tools, prefixes, generation, strategy)


def _prefixes_render_as_prefixes(
    tokenizer: PreTrainedTokenizerBase, conversations: list[Conversation], turns_of: list[list[int]], texts: list[str]
) -> bool:
    """Whether every prefix up to and through each answer renders as the start of the whole text."""
    prefixes = [messages[: i + 1] for messages, turns in zip(conversations, turns_of) for i in turns]
    owners = [text for text, turns in zip(texts, turns_of) for _ in turns]
    rendered, _ = try_render_many(tokenizer, prefixes)
    return bool(prefixes) and all(
        part is not None and text.startswith(part.rstrip()) for part, text in zip(rendered, owners)
    )
