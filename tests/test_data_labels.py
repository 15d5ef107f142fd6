"""Labels are a function of (conversation, tokenizer, options): the template profile picks the strategy once, and
a conversation the strategy cannot label falls back on its own, whatever its batch or process."""

from __future__ import annotations

import logging
import random

import pytest
from chat_templates import GENERATION_TEMPLATE, LEAKING_TEMPLATE, RESPONSE_TEMPLATE, THINKING_TEMPLATE

from sft.data import (
    IGNORE_INDEX,
    TemplateRefusal,
    template_profile,
    tokenize_conversation,
    tokenize_conversations,
    tokenize_many,
)

WORDS = "the cat river model garden answer story 问题 天气 1 42 , . !".split()


def conversations(count: int, seed: int = 0) -> list[list[dict]]:
    """Plain chats mixed with ones the marked render cannot label (reasoning, marker characters, an answer
    first), so that every batch holds both kinds."""
    rng = random.Random(seed)
    odd = [
        [{"role": "user", "content": "q"}, {"role": "assistant", "content": "<think>hmm</think>sure"}],
        [{"role": "user", "content": "q"}, {"role": "assistant", "content": "holds \ue000 a marker \ue001"}],
        [{"role": "assistant", "content": "I speak first."}, {"role": "user", "content": "ok"}],
        [
            {"role": "system", "content": "Think before you answer."},
            {"role": "user", "content": "one"},
            {"role": "assistant", "content": "<think>so</think>yes"},
            {"role": "user", "content": "two"},
            {"role": "assistant", "content": "<think>then</think>no"},
        ],
    ]
    result = []
    for n in range(count):
        if n % 3 == 0:
            result.append(odd[n // 3 % len(odd)])
            continue
        messages = [{"role": "system", "content": "Be brief."}] if rng.random() < 0.3 else []
        for _ in range(rng.randint(1, 3)):
            messages.append({"role": "user", "content": " ".join(rng.choices(WORDS, k=rng.randint(1, 8)))})
            messages.append({"role": "assistant", "content": " ".join(rng.choices(WORDS, k=rng.randint(1, 12)))})
        result.append(messages)
    return result


def with_template(tokenizer, template: str | None):
    copy = tokenizer.__class__.from_pretrained(tokenizer.name_or_path)
    if template is not None:
        copy.chat_template = template
    return copy


def as_rows(tokenized) -> list[tuple]:
    return [(item.input_ids, item.labels, item.status) for item in tokenized]


@pytest.mark.parametrize("template", ["own", "thinking", "generation", "response"])
@pytest.mark.parametrize("train_on", ["assistant", "last_assistant", "all"])
def test_labels_do_not_depend_on_batch_composition_or_order(tokenizer, template, train_on):
    templated = with_template(
        tokenizer,
        {"own": None, "thinking": THINKING_TEMPLATE, "generation": GENERATION_TEMPLATE, "response": RESPONSE_TEMPLATE}[
            template
        ],
    )
    chats = conversations(24)
    alone = [as_rows([tokenize_conversation(templated, chat, 4096, train_on)])[0] for chat in chats]
    for size in (2, 5, 24):
        batched = []
        for start in range(0, len(chats), size):
            batched += as_rows(tokenize_many(templated, chats[start : start + size], 4096, train_on))
        assert batched == alone, f"batches of {size}"
    order = list(range(len(chats)))
    random.Random(1).shuffle(order)
    shuffled = as_rows(tokenize_many(templated, [chats[k] for k in order], 4096, train_on))
    assert [shuffled[order.index(k)] for k in range(len(chats))] == alone
    # Plain chats only: no neighbour that needs the fallback changes them.
    plain = [k for k in range(len(chats)) if k % 3]
    assert as_rows(tokenize_many(templated, [chats[k] for k in plain], 4096, train_on)) == [alone[k] for k in plain]


@pytest.mark.parametrize("template", ["own", "thinking"])
def test_labels_do_not_depend_on_the_number_of_processes(tokenizer, tmp_path, template):
    templated = with_template(tokenizer, {"own": None, "thinking": THINKING_TEMPLATE}[template])
    chats = conversations(30, seed=2)
    one, _ = tokenize_conversations(chats, templated, max_length=4096, num_proc=1, cache_dir=tmp_path / "one")
    two, _ = tokenize_conversations(chats, templated, max_length=4096, num_proc=2, cache_dir=tmp_path / "two")
    alone = [tokenize_conversation(templated, chat, 4096) for chat in chats]
    assert one["input_ids"] == two["input_ids"] == [item.input_ids for item in alone]
    assert one["labels"] == two["labels"] == [item.labels for item in alone]


def test_the_profile_picks_one_strategy_and_is_logged_once(tokenizer, tmp_path, caplog):
    assert template_profile(tokenizer).strategy == "markers"
    assert template_profile(tokenizer).end_of_turn == "<|im_end|>"
    assert template_profile(with_template(tokenizer, GENERATION_TEMPLATE)).strategy == "generation"
    assert template_profile(with_template(tokenizer, THINKING_TEMPLATE)).prefixes_are_prefixes is False
    fresh = with_template(tokenizer, None)  # a tokenizer whose profile no test has computed yet
    with caplog.at_level(logging.INFO, logger="sft.data"):
        tokenize_conversations(conversations(12), fresh, max_length=4096, num_proc=2, cache_dir=tmp_path / "a")
        tokenize_conversations(conversations(6), fresh, max_length=4096, description="eval", cache_dir=tmp_path / "b")
    assert sum("labelling by markers" in record.getMessage() for record in caplog.records) == 1


def test_generation_mask_labels_as_the_marked_render_does(tokenizer):
    generation = with_template(tokenizer, GENERATION_TEMPLATE)
    plain = with_template(
        tokenizer, GENERATION_TEMPLATE.replace("{% generation %}", "").replace("{% endgeneration %}", "")
    )
    assert template_profile(plain).strategy == "markers"
    chats = [chat for k, chat in enumerate(conversations(15)) if k % 3]
    assert as_rows(tokenize_many(generation, chats, 4096)) == as_rows(tokenize_many(plain, chats, 4096))


def test_train_on_all_gets_the_stop_token_and_the_checks_too(tokenizer):
    response = with_template(tokenizer, RESPONSE_TEMPLATE)
    chat = [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello!"}]
    everything = tokenize_conversation(response, chat, 4096, train_on="all")
    text = response.decode(everything.input_ids)
    assert "Hello!" + response.eos_token in text
    assert everything.labels == everything.input_ids and IGNORE_INDEX not in everything.labels
    leaking = with_template(tokenizer, LEAKING_TEMPLATE)
    chat = [{"role": "system", "content": "A long system prompt."}, *chat]
    for train_on in ("assistant", "all"):
        with pytest.raises(TemplateRefusal, match="writes the text of message 0"):
            tokenize_conversation(leaking, chat, 4096, train_on=train_on)
