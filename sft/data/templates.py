"""Stage 3 of the data pipeline, templates: a conversation rendered as text with the tokenizer's own chat template
(ChatML for tokenizers without one), exactly as the model sees it at training and at inference.

Also here: what a template refuses (`TemplateRefusal`, a user error naming the sample), the system message put
into the first user message for templates that refuse a system role, and the checks that the rendered text holds
every answer and all tool use.
"""

from __future__ import annotations

import json

from transformers import PreTrainedTokenizerBase

from sft.data.formats import TOOLS_ROLE, Conversation
from sft.errors import UserError

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


class TemplateRefusal(UserError, ValueError):
    """The chat template raised an error (or left tool calls out) rendering conversation `index` of a batch."""

    def __init__(self, index: int, message: str):
        super().__init__(index, message)  # both in args: the exception survives pickling between processes
        self.index, self.message = index, message

    def __str__(self) -> str:
        return self.message


def try_render_many(
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


def render_many(
    tokenizer: PreTrainedTokenizerBase, conversations: list[Conversation], add_generation_prompt: bool = False
) -> list[str]:
    """`render` of many conversations, batched; `TemplateRefusal` for the first one the template refuses."""
    texts, errors = try_render_many(tokenizer, conversations, add_generation_prompt)
    for k, error in enumerate(errors):
        if error is not None:
            raise TemplateRefusal(k, f"the chat template refuses this conversation: {error}")
    return texts  # type: ignore[return-value]


def fold_system_message(messages: Conversation) -> Conversation | None:
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


def missing_tool_text(messages: Conversation, text: str) -> str | None:
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


def render_for_training(
    tokenizer: PreTrainedTokenizerBase, conversations: list[Conversation], fold_system: bool
) -> tuple[list[Conversation], list[str], list[bool]]:
    """The conversations as rendered (system messages folded where the template refuses them and `fold_system`),
    their texts and which were folded; `TemplateRefusal` for the first conversation that cannot be rendered."""
    texts, errors = try_render_many(tokenizer, conversations)
    folded = [False] * len(conversations)
    if any(error is not None for error in errors):
        conversations = list(conversations)
        for k, error in enumerate(errors):
            if error is None:
                continue
            without_system = fold_system_message(conversations[k])
            if without_system is not None:
                (text,), (folded_error,) = try_render_many(tokenizer, [without_system])
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
            missing = missing_tool_text(messages, text)
            if missing:
                raise TemplateRefusal(
                    k,
                    f"the chat template does not render tool use: {missing} is not in its text (a model whose "
                    "template supports tools is needed for this sample)",
                )
    return conversations, texts, folded  # type: ignore[return-value]


def assistant_header(tokenizer: PreTrainedTokenizerBase) -> str:
    """What the template writes before an assistant answer, e.g. "<|im_start|>assistant\n": the text that the
    generation prompt adds after a user message."""
    question = [{"role": "user", "content": "?"}]
    try:
        plain, prompted = render(tokenizer, question), render(tokenizer, question, add_generation_prompt=True)
    except Exception:  # a template that wants more than this (a system message, tools, ...): no header known
        return ""
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
