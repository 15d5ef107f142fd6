"""Stage 4 of the data pipeline, labelling (the spans): where each trained answer lies in a conversation's
rendered text, as character spans running through the end-of-turn marker that follows the answer.

Three ways to find them, each a function of one conversation alone (a batch only shares template calls):
- `spans_by_generation`: the template marks answers itself with `{% generation %}`; transformers' assistant-token
  mask says which tokens they are. Used for such templates.
- `spans_by_markers`: one render with private-use characters around each answer. One render per conversation, so
  the fast way; used where the template profile found that it gives the same spans as rendering prefixes.
- `spans_by_prefixes`: render the prefix before each answer (with the generation prompt) and through it. The
  definition of a turn; costs a render per turn, so it is the fallback for a conversation the others cannot label.
`sft.data.labels` says which runs when; `sft.data.profile` decides it once per template.
"""

from __future__ import annotations

from typing import Any

from transformers import PreTrainedTokenizerBase

from sft.data.formats import Conversation
from sft.data.templates import (
    TemplateRefusal,
    assistant_header,
    chat_template_of,
    end_of_turn,
    split_tools,
    try_render_many,
)

Spans = list[tuple[int, int]]

# Private-use characters put around each trained answer, so one render shows where the answers are. A
# conversation that already holds them, or whose text they change, is labelled by rendering prefixes instead.
ANSWER_OPEN, ANSWER_CLOSE = "\ue000", "\ue001"


def spans_by_markers(
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
    marked_texts, _ = try_render_many(tokenizer, marked)
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


def spans_by_prefixes(
    tokenizer: PreTrainedTokenizerBase,
    conversations: list[Conversation],
    turns_of: list[list[int]],
    texts: list[str],
    by_markers: list[list[tuple[int, int]] | None] | None = None,
) -> list[list[tuple[int, int]]]:
    """Each trained answer's span: from where the generation prompt of its prefix ends to the end of its turn as
    the template renders it, with all prefixes rendered in two batched calls. Where the template renders a
    prefix differently (it rewrites earlier turns), the span is the conversation's own marked answer (`by_markers`,
    when given), or the answer searched for in the text."""
    if by_markers is None:
        by_markers = [None] * len(conversations)
    befores = iter(
        try_render_many(
            tokenizer,
            # A conversation that opens with an answer renders its empty prefix: what the template writes before
            # the first answer (a default system message, the header) is no part of it.
            [messages[:i] for messages, turns in zip(conversations, turns_of) for i in turns],
            add_generation_prompt=True,
        )[0]
    )
    # A turn that ends the conversation renders as the whole text: no need to render it again.
    throughs = iter(
        try_render_many(
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
            before = next(befores)
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
                if turn_end is None or header is None:
                    turn_end, header = end_of_turn(tokenizer), assistant_header(tokenizer)
                # The answer is searched for from its own turn's header where there is one header per answer: an
                # earlier message may hold the same words.
                anchor = max(cursor, turn_start(messages, i, text, header))
                start = text.find(messages[i]["content"], anchor) if messages[i]["content"] else -1
                if start >= 0:
                    end = start + len(messages[i]["content"])
                    if turn_end and text.startswith(turn_end, end):
                        end += len(turn_end)
                else:  # the template rewrote the answer (Qwen3's drops earlier turns' reasoning)
                    try:
                        start, end = rendered_turn(messages, i, text, header, turn_end)
                    except ValueError as error:
                        raise TemplateRefusal(k, str(error)) from None
            spans.append((start, end))
            cursor = end
        results.append(spans)
    return results


def turn_start(messages: Conversation, i: int, text: str, header: str) -> int:
    """Where assistant message `i`'s turn starts in the text: the end of its assistant `header`, found by counting
    headers (so only where the text holds one header per assistant message), or -1."""
    headers = []
    position = text.find(header) if header else -1
    while position >= 0:
        headers.append(position + len(header))
        position = text.find(header, position + len(header))
    assistants = [k for k, message in enumerate(messages) if message["role"] == "assistant"]
    return headers[assistants.index(i)] if len(headers) == len(assistants) else -1


def rendered_turn(messages: Conversation, i: int, text: str, header: str, turn_end: str) -> tuple[int, int]:
    """The span of assistant message `i` as the template rendered it, when it did not render it verbatim: from
    the end of its assistant `header` to its end-of-turn marker (`turn_start`)."""
    start = turn_start(messages, i, text, header)
    end = text.find(turn_end, start) if start >= 0 and turn_end else -1
    if end < 0:
        between = f"between {header!r} and {turn_end!r}" if header and turn_end else "(no generation prompt)"
        raise ValueError(
            f"the chat template renders assistant message {i} ({messages[i]['content'][:60]!r}) neither verbatim "
            f"nor as a turn of its own {between}, so its tokens cannot be found"
        )
    return start, end + len(turn_end)


def spans_by_generation(
    tokenizer: PreTrainedTokenizerBase,
    conversations: list[Conversation],
    turns_of: list[list[int]],
    texts: list[str],
    turn_end: str,
) -> list[Spans | None]:
    """Each trained answer's span from transformers' assistant-token mask, for templates that mark answers with
    `{% generation %}`; None for a conversation where the mask does not give one run of tokens per answer over the
    same tokens as the text (then it is labelled by prefixes). Needs a fast tokenizer (token offsets)."""
    template = chat_template_of(tokenizer)
    results: list[Spans | None] = []
    for messages, turns, text in zip(conversations, turns_of, texts):
        plain, tools = split_tools(messages)
        try:
            out = tokenizer.apply_chat_template(
                plain,
                tools=tools,
                chat_template=template,
                tokenize=True,
                return_dict=True,
                return_assistant_tokens_mask=True,
            )
        except Exception:  # whatever the template raises: the prefix fallback reports it if it matters
            results.append(None)
            continue
        encoding = tokenizer.backend_tokenizer.encode(text, add_special_tokens=False)
        runs = _mask_runs(list(out["assistant_masks"]))
        assistants = [i for i, message in enumerate(messages) if message["role"] == "assistant"]
        if list(out["input_ids"]) != encoding.ids or len(runs) != len(assistants):
            results.append(None)
            continue
        spans = []
        for i in turns:
            first, last = runs[assistants.index(i)]
            start, end = encoding.offsets[first][0], encoding.offsets[last][1]
            end = start + len(text[start:end].rstrip())  # trailing whitespace is never trained, as on other paths
            if turn_end and not text[start:end].rstrip().endswith(turn_end) and text.startswith(turn_end, end):
                end += len(turn_end)
            spans.append((start, end))
        results.append(spans)
    return results


def _mask_runs(mask: list[Any]) -> list[tuple[int, int]]:
    """(first, last) token index of each run of ones in the mask."""
    runs, start = [], None
    for index, value in enumerate([*mask, 0]):
        if value and start is None:
            start = index
        elif not value and start is not None:
            runs.append((start, index - 1))
            start = None
    return runs
