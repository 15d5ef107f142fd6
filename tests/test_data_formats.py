"""The sample formats of sft.data.formats beyond chat messages: plain text (continued pre-training), trl's
prompt/completion, content as text parts, reasoning_content, per-answer "train": false; and the labels of every
example file in data/ unchanged by the source-reading pipeline (sft.data.sources)."""

from __future__ import annotations

import hashlib
import json

import pytest
from chat_templates import QWEN25_STYLE, REASONING_TEMPLATE

import sft.data.cache
from sft.data import (
    IGNORE_INDEX,
    DataError,
    load_data,
    parse_record,
    read_data,
    tokenize_conversation,
    tokenize_conversations,
    tokenize_text,
)

PLAIN = [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"}]


def test_prompt_completion_and_text_parts_read_as_plain_messages():
    assert parse_record({"prompt": "What is 2+2?", "completion": "4"}, "f", "line 1") == PLAIN
    listed = {"prompt": [PLAIN[0]], "completion": [PLAIN[1]]}
    assert parse_record(listed, "f", "line 1") == PLAIN
    openai = [{"type": "text", "text": "What is "}, {"type": "text", "text": "2+2?"}]
    factory = [{"type": "text", "value": "4"}]
    parts = {"messages": [{"role": "user", "content": openai}, {"role": "assistant", "content": factory}]}
    assert parse_record(parts, "f", "line 1") == PLAIN


def test_answers_inside_a_prompt_list_are_context_only():
    record = {
        "prompt": [*PLAIN, {"role": "user", "content": "And 3+3?"}],
        "completion": [{"role": "assistant", "content": "6"}],
    }
    messages = parse_record(record, "f", "line 1")
    assert [m.get("train", True) for m in messages] == [True, False, True, True]


def test_parts_we_cannot_train_on_and_mixed_prompt_forms_are_errors():
    image = {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}, PLAIN[1]]}
    with pytest.raises(DataError, match=r"f, line 3, field 'messages\[0\].content\[0\].type': a 'image_url' part"):
        parse_record(image, "f", "line 3")
    with pytest.raises(DataError, match="both be strings or both message lists"):
        parse_record({"prompt": "q", "completion": [PLAIN[1]]}, "f", "line 1")
    with pytest.raises(DataError, match="field 'text': is empty"):
        parse_record({"text": " "}, "f", "line 1")


def test_plain_text_trains_every_token_with_eos_and_long_texts_are_chunked(tokenizer, tmp_path):
    text = " ".join(f"word{k}" for k in range(300))
    (tmp_path / "cpt.jsonl").write_text(json.dumps({"text": text}) + "\n" + json.dumps({"text": "short one"}) + "\n")
    dataset, counts = tokenize_conversations(load_data(str(tmp_path / "cpt.jsonl")), tokenizer, 64, cache_dir=tmp_path)
    expected = tokenizer.encode(text, add_special_tokens=False) + [tokenizer.eos_token_id]
    rows = list(dataset["input_ids"])
    assert len(expected) > 64 * 2 and all(len(row) <= 64 for row in rows)
    chunks = -(-len(expected) // 64)
    assert [token for row in rows[:chunks] for token in row] == expected  # nothing dropped, in order
    assert rows[chunks] == tokenizer.encode("short one", add_special_tokens=False) + [tokenizer.eos_token_id]
    assert list(dataset["labels"]) == rows  # every token trained, no chat template
    assert "<|im_start|>" not in tokenizer.decode(rows[chunks])


def test_no_plain_text_chunk_is_left_without_a_token_to_predict(tokenizer, tmp_path):
    # Issue 29, item 7: tokens plus eos one more than model_max_length would leave a last chunk of one token, which
    # predicts nothing (each token is predicted from those before it in its row).
    text = " ".join(f"word{k}" for k in range(40))
    tokens = tokenizer.encode(text, add_special_tokens=False) + [tokenizer.eos_token_id]
    for max_length in (len(tokens) - 1, (len(tokens) - 1) // 2):
        chunks = tokenize_text(tokenizer, text, max_length)
        assert all(len(chunk.input_ids) >= 2 and len(chunk.input_ids) <= max_length for chunk in chunks)
        assert [token for chunk in chunks for token in chunk.input_ids] == tokens  # every token, in order
        assert [chunk.labels for chunk in chunks] == [chunk.input_ids for chunk in chunks]
    (tmp_path / "t.jsonl").write_text(json.dumps({"text": text}) + "\n")
    dataset, counts = tokenize_conversations(load_data(str(tmp_path / "t.jsonl")), tokenizer, len(tokens) - 1)
    assert min(dataset["length"]) >= 2 and counts == {"ok": 2}
    assert [chunk.status for chunk in tokenize_text(tokenizer, text, 1)] == ["dropped_no_label"]  # rows of one


def test_an_answer_marked_train_false_or_loss_weight_zero_is_not_trained(tokenizer):
    for mark in ({"train": False}, {"loss_weight": 0}):
        record = {
            "messages": [
                PLAIN[0],
                {"role": "assistant", "content": "five", **mark},
                {"role": "user", "content": "Again?"},
                {"role": "assistant", "content": "four"},
            ]
        }
        tokenized = tokenize_conversation(tokenizer, parse_record(record, "f", "line 1"), max_length=256)
        trained = [k for k, label in enumerate(tokenized.labels) if label != IGNORE_INDEX]
        assert trained == list(range(trained[0], trained[-1] + 1))  # one run of trained tokens: the last answer's
        assert tokenizer.decode([tokenized.input_ids[k] for k in trained]) == "four<|im_end|>"
    only = {"messages": [PLAIN[0], {"role": "assistant", "content": "four", "train": False}]}
    tokenized = tokenize_conversation(tokenizer, parse_record(only, "f", "line 1"), max_length=256)
    assert tokenized.status == "dropped_no_label"


def test_reasoning_content_is_trained_where_the_template_renders_it_and_an_error_where_it_never_does(
    tokenizer, tmp_path
):
    record = {"messages": [PLAIN[0], {"role": "assistant", "content": "4", "reasoning_content": "two and two"}]}
    (tmp_path / "r.jsonl").write_text(json.dumps({"messages": PLAIN}) + "\n" + json.dumps(record) + "\n")
    conversations = load_data(str(tmp_path / "r.jsonl"))
    thinking = tokenizer.__class__.from_pretrained(tokenizer.name_or_path)
    thinking.chat_template = REASONING_TEMPLATE
    dataset, _ = tokenize_conversations(conversations, thinking, 256, cache_dir=tmp_path)
    trained = [token for token, label in zip(dataset["input_ids"][1], dataset["labels"][1]) if label != IGNORE_INDEX]
    assert "two and two" in thinking.decode(trained)
    with pytest.raises(DataError, match=r"r.jsonl, line 2, field 'reasoning_content': the chat template never"):
        tokenize_conversations(conversations, tokenizer, 256, cache_dir=tmp_path)


# sha256 of the input_ids and labels of every example file, computed with the code before sft.data.sources existed
# (load_conversations; the tiny test tokenizer, ChatML and the Qwen2.5-style tool template, model_max_length 256).
EXAMPLE_ROWS = {
    "chatml:example_alpaca.json": "2f3c7411a1401aab",
    "chatml:example_chatml.jsonl": "0ff39d7c2c21bf23",
    "chatml:example_qwen.json": "cef7b456f374b940",
    "tools:example_alpaca.json": "80ba53b0ee8937af",
    "tools:example_chatml.jsonl": "5d28708d1d987ae7",
    "tools:example_qwen.json": "98de461369f4756e",
    "tools:example_tools.jsonl": "cdc7ffe8fac4ce15",
}


def test_labels_of_the_example_files_are_unchanged(tokenizer, tmp_path, monkeypatch):
    monkeypatch.setattr(sft.data.cache, "TOKENIZE_BATCH", 2)
    tools = tokenizer.__class__.from_pretrained(tokenizer.name_or_path)
    tools.chat_template = QWEN25_STYLE
    for key, expected in EXAMPLE_ROWS.items():
        template, name = key.split(":")
        # Both ways in: training's memory-mapped data set (read in batches of 2, so that every batch boundary is
        # crossed), and a check's list of conversations.
        for data in (read_data(f"data/{name}", cache_dir=tmp_path), load_data(f"data/{name}")):
            dataset, _ = tokenize_conversations(
                data, tools if template == "tools" else tokenizer, 256, cache_dir=tmp_path
            )
            rows = json.dumps([list(dataset["input_ids"]), list(dataset["labels"])])
            assert hashlib.sha256(rows.encode()).hexdigest()[:16] == expected, (key, type(data).__name__)
