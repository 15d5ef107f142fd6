"""Stage 4 of the data pipeline, labelling (the story): the training text of each conversation and the
character spans whose tokens are trained on.

One story for every conversation, whatever its batch:
1. render it for training (`render_for_training`: its system message folded where the template refuses one,
   every answer and all tool use checked to be in the text);
2. find every answer's span the way the template profile chose (`sft.data.profile`), or by rendering prefixes
   where that way cannot label this conversation;
3. check that no system or user text is written inside an answer's turn (the prompt-leak check);
4. add the eos token after each answer that the template ends with no end-of-turn marker (the stop-token rule);
5. keep the spans of the turns `train_on` asks for: every answer, the last one, or the whole text ("all");
6. drop the spans of answers the data marks `"train": false`.
Steps 1 to 4 run for every `train_on`, "all" included, so its texts and refusals are those of the other options.
"""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase

from sft.data.formats import Conversation, TrainOn
from sft.data.profile import TemplateProfile, template_profile
from sft.data.spans import Spans, spans_by_generation, spans_by_markers, spans_by_prefixes
from sft.data.templates import TemplateRefusal, render_for_training

IGNORE_INDEX = -100


def label_spans(
    tokenizer: PreTrainedTokenizerBase, messages: Conversation, train_on: TrainOn = "assistant"
) -> tuple[str, Spans]:
    """The rendered text and the character spans whose tokens are trained on.

    An assistant turn's span runs from where the generation prompt ends to the end of that turn as the template
    renders it, end-of-turn token included, trailing whitespace excluded (see `sft.data.spans`).
    """
    return label_spans_many(tokenizer, [messages], train_on)[0]


def label_spans_many(
    tokenizer: PreTrainedTokenizerBase, conversations: list[Conversation], train_on: TrainOn = "assistant"
) -> list[tuple[str, Spans]]:
    """`label_spans` of many conversations (batched template calls; the same result as one at a time)."""
    return [(text, spans) for text, spans, _ in label_many(tokenizer, conversations, train_on)]


def label_many(
    tokenizer: PreTrainedTokenizerBase,
    conversations: list[Conversation],
    train_on: TrainOn = "assistant",
    fold_system: bool = True,
    profile: TemplateProfile | None = None,
) -> list[tuple[str, Spans, bool]]:
    """The training text of each conversation, its trained spans, and whether its system message was folded into
    the first user message. `TemplateRefusal` names the first conversation that cannot be labelled."""
    profile = profile or template_profile(tokenizer)
    conversations, texts, folded = render_for_training(tokenizer, conversations, fold_system)
    # The spans of every answer are found for "all" too: the checks and the stops below need them.
    turns_of = []
    for messages in conversations:
        turns = [i for i, message in enumerate(messages) if message["role"] == "assistant"]
        turns_of.append(turns[-1:] if train_on == "last_assistant" else turns)

    turn_end = profile.end_of_turn
    spans_of: list[Spans | None] = [None] * len(conversations)
    if profile.strategy == "generation":
        spans_of = spans_by_generation(tokenizer, conversations, turns_of, texts, turn_end)
    elif profile.strategy == "markers":
        spans_of = spans_by_markers(tokenizer, conversations, turns_of, texts, turn_end)
    # Each conversation the chosen way could not label falls back on prefixes, on its own.
    fallback = [k for k, spans in enumerate(spans_of) if spans is None]
    if fallback:
        picked = [[column[k] for k in fallback] for column in (conversations, turns_of, texts)]
        by_markers = spans_by_markers(tokenizer, *picked, turn_end) if profile.strategy != "markers" else None
        try:
            found = spans_by_prefixes(tokenizer, *picked, by_markers)
        except TemplateRefusal as error:
            raise TemplateRefusal(fallback[error.index], error.message) from None
        for k, spans in zip(fallback, found):
            spans_of[k] = spans

    eos = tokenizer.eos_token or ""
    # A tool-call turn may end with a marker of its own (Llama 3.1's <|eom_id|>): any special token counts.
    call_ends = tuple(str(token) for token in tokenizer.added_tokens_decoder.values() if token.special)
    results = []
    for k, (messages, turns, text, spans) in enumerate(zip(conversations, turns_of, texts, spans_of)):
        for i, (start, end) in zip(turns, spans):
            repeated = repeated_prompt(messages, i, text[start:end])
            if repeated is not None:
                raise TemplateRefusal(
                    k,
                    f"the chat template writes the text of message {repeated} into assistant message {i}'s turn, "
                    "so that text would be trained on as the answer",
                )
        text, spans = add_stops(messages, turns, text, spans, turn_end, eos, call_ends)
        # 6. an answer marked "train": false in the data is context only.
        spans = [span for i, span in zip(turns, spans) if messages[i].get("train", True)]
        if train_on == "all":
            spans = [(0, len(text))]
        results.append((text, spans, folded[k]))
    return results


def repeated_prompt(messages: Conversation, i: int, trained: str) -> int | None:
    """The index of a system or user message whose text (of 8 characters or more) a template repeats inside the
    turn of assistant message `i` (some write the system prompt before every turn), or None."""
    trained = trained.replace(messages[i]["content"], "", 1)
    for k, message in enumerate(messages):
        if message["role"] in ("system", "user") and len(message["content"].strip()) >= 8:
            if message["content"].strip() in trained:
                return k
    return None


def add_stops(
    messages: Conversation,
    turns: list[int],
    text: str,
    spans: Spans,
    turn_end: str,
    eos: str,
    call_ends: tuple[str, ...] = (),
) -> tuple[str, Spans]:
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
