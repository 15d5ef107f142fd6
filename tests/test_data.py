from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from chat_templates import LLAMA3_TEMPLATE, THINKING_TEMPLATE
from transformers import AutoModelForCausalLM

from sft.data import (
    CUDA_PAD_MULTIPLE,
    IGNORE_INDEX,
    DataError,
    bucketed_length,
    label_spans,
    label_spans_many,
    labels_from_offsets,
    labels_of_encoding,
    load_conversations,
    make_collator,
    pad_multiple,
    spans_by_prefixes,
    tokenize_conversation,
    tokenize_conversations,
    tokenize_pieces,
)

MULTI_TURN = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi there"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "你好吗？"},
    {"role": "assistant", "content": "很好。"},
]


WORDS = "the cat river model garden question answer story bridge 问题 天气 中文 1 42 , . !".split()


def generate_conversations(count: int, seed: int, high: int) -> list[list[dict]]:
    """Multi-turn chats (1-4 turns, some with a system message) of up to about `high` words."""
    rng = random.Random(seed)
    conversations = []
    for _ in range(count):
        messages = [{"role": "system", "content": "You are a careful assistant."}] if rng.random() < 0.3 else []
        turns = rng.randint(1, 4)
        share = max(2, rng.randint(10, high) // turns)
        for _ in range(turns):
            user = max(1, share // 3)
            messages.append({"role": "user", "content": " ".join(rng.choices(WORDS, k=user))})
            messages.append({"role": "assistant", "content": " ".join(rng.choices(WORDS, k=max(1, share - user)))})
        conversations.append(messages)
    return conversations


def write(path: Path, content: str) -> Path:
    path.write_text(content, encoding="utf-8")
    return path


def write_jsonl(path: Path, records: list) -> Path:
    return write(path, "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records))


def labelled_runs(tokenizer, tokenized) -> list[str]:
    """The text of each contiguous run of labelled tokens."""
    runs, current = [], []
    for token, label in zip(tokenized.input_ids, tokenized.labels):
        if label != IGNORE_INDEX:
            assert label == token
            current.append(token)
        elif current:
            runs.append(tokenizer.decode(current))
            current = []
    if current:
        runs.append(tokenizer.decode(current))
    return runs


# ---------------------------------------------------------------------------------------------------------
# Formats
# ---------------------------------------------------------------------------------------------------------


def test_every_format_parses_to_the_same_messages(tmp_path):
    expected = [
        [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Name a colour.\nPrimary only."},
            {"role": "assistant", "content": "Red."},
        ],
    ]
    qwen = {
        "id": "x",
        "conversations": [
            {"from": "system", "value": "Be brief."},
            {"from": "user", "value": "Name a colour.\nPrimary only."},
            {"from": "assistant", "value": "Red."},
        ],
    }
    sharegpt = {
        "conversations": [
            {"from": "system", "value": "Be brief."},
            {"from": "human", "value": "Name a colour.\nPrimary only."},
            {"from": "gpt", "value": "Red."},
        ]
    }
    chatml = {
        "type": "chatml",
        "source": "self-made",
        "id": 3,
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Name a colour.\nPrimary only."},
            {"role": "assistant", "content": "Red."},
        ],
    }
    alpaca = {"system": "Be brief.", "instruction": "Name a colour.", "input": "Primary only.", "output": "Red."}
    for index, record in enumerate([qwen, sharegpt, chatml, alpaca]):
        as_json = write(tmp_path / f"{index}.json", json.dumps([record]))
        as_jsonl = write_jsonl(tmp_path / f"{index}.jsonl", [record])
        assert load_conversations(as_json) == expected
        assert load_conversations(as_jsonl) == expected


def test_formats_can_be_mixed_in_one_file_and_alpaca_input_is_optional(tmp_path):
    path = write_jsonl(
        tmp_path / "mixed.jsonl",
        [
            {"instruction": "Say hi.", "input": "", "output": "Hi."},
            {"messages": [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "Hi."}]},
        ],
    )
    first, second = load_conversations(path)
    assert first == second == [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "Hi."}]


def test_default_system_prompt_only_where_a_sample_has_none(tmp_path):
    path = write_jsonl(
        tmp_path / "d.jsonl",
        [
            {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]},
            {
                "messages": [
                    {"role": "system", "content": "Own."},
                    {"role": "user", "content": "a"},
                    {"role": "assistant", "content": "b"},
                ]
            },
        ],
    )
    first, second = load_conversations(path, default_system="Default.")
    assert first[0] == {"role": "system", "content": "Default."}
    assert second[0] == {"role": "system", "content": "Own."}


def test_shipped_example_files_parse():
    for path in sorted(Path("data").glob("example_*")):
        assert load_conversations(path), path


# ---------------------------------------------------------------------------------------------------------
# Bad input: one error naming file, line or sample, and field
# ---------------------------------------------------------------------------------------------------------

GOOD = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ('[{"messages": [}]', ["line 1", "invalid JSON"]),
        (json.dumps(GOOD) + "\n{not json}\n", ["line 2", "invalid JSON"]),
        (
            json.dumps(GOOD) + '\n{"question": "q", "answer": "a"}\n',
            ["line 2", "unknown format", "'question'", "'answer'"],
        ),
        (
            json.dumps({"messages": [{"role": "bot", "content": "q"}, {"role": "assistant", "content": "a"}]}),
            ["line 1", "messages[0].role", "unknown role 'bot'"],
        ),
        (
            json.dumps({"conversations": [{"from": "user", "value": ""}, {"from": "gpt", "value": "a"}]}),
            ["line 1", "conversations[0].value", "is empty"],
        ),
        (
            json.dumps({"messages": [{"role": "user", "content": 5}, {"role": "assistant", "content": "a"}]}),
            ["messages[0].content", "expected a string, got int"],
        ),
        (json.dumps({"messages": [{"role": "user", "content": "q"}]}), ["line 1", "'messages'", "no assistant turn"]),
        (
            json.dumps({"messages": [{"role": "user"}, {"role": "assistant", "content": "a"}]}),
            ["messages[0].content", "missing"],
        ),
        (json.dumps({"instruction": "q", "input": ""}), ["field 'output'", "missing"]),
        (json.dumps({"instrution": "q", "input": "", "output": "a"}), ["field 'instruction'", "'instrution'"]),
        (
            json.dumps(
                [
                    GOOD,
                    {
                        "messages": [
                            {"role": "user", "content": "q"},
                            {"role": "assistant", "content": "a"},
                            {"role": "system", "content": "s"},
                        ]
                    },
                ]
            ),
            ["sample 1", "messages[2]", "system message may only come first"],
        ),
        (json.dumps([GOOD, ["not", "an", "object"]]), ["sample 1", "expected a JSON object, got list"]),
        ("", ["empty"]),
    ],
)
def test_bad_input_names_file_place_and_field(tmp_path, content, expected):
    path = write(tmp_path / "bad.jsonl", content)
    with pytest.raises(DataError) as caught:
        load_conversations(path)
    message = str(caught.value)
    assert str(path) in message
    for part in expected:
        assert part in message


def test_missing_file_and_invalid_utf8(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        load_conversations(tmp_path / "nope.jsonl")
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(json.dumps(GOOD).encode() + b"\n" + '{"messages": "caf\xe9"}'.encode("latin-1"))
    with pytest.raises(DataError, match=r"line 2: not valid UTF-8"):
        load_conversations(path)


# ---------------------------------------------------------------------------------------------------------
# Labels
# ---------------------------------------------------------------------------------------------------------


def test_labels_cover_every_assistant_turn_and_its_end_of_turn_token(tokenizer):
    single = [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello!"}]
    tokenized = tokenize_conversation(tokenizer, single, max_length=512)
    assert labelled_runs(tokenizer, tokenized) == ["Hello!<|im_end|>"]
    # The template's default system prompt and the prompt are not trained on.
    assert "You are a helpful assistant." in tokenizer.decode(tokenized.input_ids)

    tokenized = tokenize_conversation(tokenizer, MULTI_TURN, max_length=512)
    assert labelled_runs(tokenizer, tokenized) == ["Hello!<|im_end|>", "很好。<|im_end|>"]
    text = tokenizer.decode(tokenized.input_ids)
    assert text.startswith("<|im_start|>system\nBe brief.<|im_end|>")  # the sample's own system prompt is kept
    assert "You are a helpful assistant." not in text
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert [label for label in tokenized.labels if label == im_end] == [im_end, im_end]


def test_last_assistant_and_all_tokens_options(tokenizer):
    last = tokenize_conversation(tokenizer, MULTI_TURN, max_length=512, train_on="last_assistant")
    assert labelled_runs(tokenizer, last) == ["很好。<|im_end|>"]
    everything = tokenize_conversation(tokenizer, MULTI_TURN, max_length=512, train_on="all")
    assert everything.labels == everything.input_ids


def test_labels_follow_a_different_template(tokenizer):
    llama = tokenizer.__class__.from_pretrained(tokenizer.name_or_path)
    llama.chat_template = LLAMA3_TEMPLATE
    text, spans = label_spans(llama, MULTI_TURN)
    assert text.startswith("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>")
    assert [text[start:end] for start, end in spans] == ["Hello!<|eot_id|>", "很好。<|eot_id|>"]
    tokenized = tokenize_conversation(llama, MULTI_TURN, max_length=512)
    assert "".join(labelled_runs(llama, tokenized)) == "Hello!<|eot_id|>很好。<|eot_id|>"


def test_a_template_that_rewrites_history_still_labels_each_answer(tokenizer):
    # Like Qwen3's, this template renders earlier turns differently from the last one, so a prefix of the
    # conversation is not a prefix of its text; the answer is then searched for.
    tagged = tokenizer.__class__.from_pretrained(tokenizer.name_or_path)
    tagged.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
        "{% if loop.last %}[final] {% endif %}{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    text, spans = label_spans(tagged, MULTI_TURN)
    assert [text[start:end] for start, end in spans] == ["Hello!<|im_end|>", "很好。<|im_end|>"]


ODD_CONVERSATIONS = [
    MULTI_TURN,
    [{"role": "assistant", "content": "I speak first."}, {"role": "user", "content": "ok"}],
    [{"role": "user", "content": " padded "}, {"role": "assistant", "content": "  spaced answer \n"}],
    [{"role": "user", "content": "q"}, {"role": "assistant", "content": "holds \ue000 a marker \ue001"}],
    [{"role": "user", "content": "q"}, {"role": "assistant", "content": "<think>hmm</think>sure"}],
    [{"role": "user", "content": "q"}, {"role": "assistant", "content": "<think>hmm</think>sure"}]
    + [{"role": "user", "content": "again"}, {"role": "assistant", "content": "<think>so</think>yes"}],
]


@pytest.mark.parametrize("template", ["own", "llama3", "rewrites_last", "thinking"])
def test_labelling_by_one_marked_render_equals_rendering_prefixes(tokenizer, template):
    # The fast path must label exactly what rendering every prefix labels, whatever the template does.
    templated = tokenizer.__class__.from_pretrained(tokenizer.name_or_path)
    templated.chat_template = {
        "own": tokenizer.chat_template,
        "llama3": LLAMA3_TEMPLATE,
        "rewrites_last": "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if loop.last %}[final] {% endif %}"
        "{{ m['content'] }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}",
        "thinking": THINKING_TEMPLATE,
    }[template]
    conversations = ODD_CONVERSATIONS + generate_conversations(60, seed=1, high=200)
    for train_on in ("assistant", "last_assistant"):
        rendered = label_spans_many(templated, conversations, train_on)
        turns_of = [[i for i, m in enumerate(c) if m["role"] == "assistant"] for c in conversations]
        if train_on == "last_assistant":
            turns_of = [turns[-1:] for turns in turns_of]
        texts = [text for text, _ in rendered]
        # The oracle renders prefixes alone (no marker spans to fall back on).
        expected = spans_by_prefixes(templated, conversations, turns_of, texts)
        assert [spans for _, spans in rendered] == expected


def test_answers_whose_reasoning_the_template_drops_are_labelled_as_rendered(tokenizer):
    # Qwen3's template drops the reasoning of earlier answers and adds an empty reasoning block to the last one
    # when it has none: each answer is trained on as the template renders it.
    thinking = tokenizer.__class__.from_pretrained(tokenizer.name_or_path)
    thinking.chat_template = THINKING_TEMPLATE
    conversation = [
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": "<think>hmm</think>sure"},
        {"role": "user", "content": "again"},
        {"role": "assistant", "content": "yes"},
    ]
    tokenized = tokenize_conversation(thinking, conversation, max_length=512)
    assert labelled_runs(thinking, tokenized) == ["sure<|im_end|>", "<think>\n\n</think>\n\nyes<|im_end|>"]
    assert "hmm" not in thinking.decode(tokenized.input_ids)

    no_headers = tokenizer.__class__.from_pretrained(tokenizer.name_or_path)
    no_headers.chat_template = (
        "{% for m in messages %}{{ loop.length }} {{ m['role'] }}: "
        "{{ m['content'].replace('sure', 'fine') }}\n{% endfor %}"
    )
    with pytest.raises(
        ValueError, match="message 1 \\('<think>hmm</think>sure'\\) as given: its end 'sure' is not in the text"
    ):
        tokenize_conversation(no_headers, conversation[:2] + [{"role": "user", "content": "x"}], max_length=512)


def test_labels_from_edge_tokens_equal_labels_from_all_offsets(tokenizer):
    conversations = ODD_CONVERSATIONS + generate_conversations(60, seed=2, high=300)
    rendered = label_spans_many(tokenizer, conversations)
    # Edges on characters the byte-level vocabulary splits into several tokens, and on spaces.
    rendered.append(("a龘𝔘b 你好 世界", [(1, 2), (2, 3), (5, 8)]))
    rendered.append(("trimmed ,  spaces   here", [(7, 16), (17, 24)]))
    encodings = tokenizer.backend_tokenizer.encode_batch([text for text, _ in rendered], add_special_tokens=False)
    for encoding, (_, spans) in zip(encodings, rendered):
        expected = labels_from_offsets(encoding.ids, encoding.offsets, spans)
        assert labels_of_encoding(encoding, encoding.ids, spans) == expected


def test_piecewise_tokenisation_matches_offsets(tokenizer):
    # The path for tokenizers without offsets (Qwen-1's tiktoken one) labels the same tokens here.
    text, spans = label_spans(tokenizer, MULTI_TURN)
    input_ids, labels = tokenize_pieces(tokenizer, text, spans)
    tokenized = tokenize_conversation(tokenizer, MULTI_TURN, max_length=512)
    assert (input_ids, labels) == (tokenized.input_ids, tokenized.labels)


def test_truncation_and_dropping_are_counted(tokenizer, tmp_path):
    long_prompt = [{"role": "user", "content": "word " * 200}, {"role": "assistant", "content": "ok"}]
    long_answer = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "answer " * 200}]
    short = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    conversations = [long_prompt, long_answer, short]

    dataset, counts = tokenize_conversations(conversations, tokenizer, max_length=64, cache_dir=tmp_path)
    assert counts == {"ok": 1, "truncated": 1, "dropped_no_label": 1}
    assert len(dataset) == 2 and max(dataset["length"]) == 64
    assert all(any(label != IGNORE_INDEX for label in labels) for labels in dataset["labels"])

    dataset, counts = tokenize_conversations(
        conversations, tokenizer, max_length=64, drop_long=True, cache_dir=tmp_path
    )
    assert counts == {"ok": 1, "dropped_too_long": 2}
    assert len(dataset) == 1

    with pytest.raises(ValueError, match="no train sample is left"):
        tokenize_conversations([long_prompt], tokenizer, max_length=64, cache_dir=tmp_path)


def test_tokenised_data_is_cached(tokenizer, tmp_path):
    conversations = [MULTI_TURN] * 3
    first, _ = tokenize_conversations(conversations, tokenizer, max_length=512, cache_dir=tmp_path)
    cached = list((tmp_path / "llm_finetuning").glob("tokenized-*.arrow"))
    assert len(cached) == 1
    second, _ = tokenize_conversations(conversations, tokenizer, max_length=512, cache_dir=tmp_path)
    assert second.cache_files[0]["filename"] == str(cached[0])
    assert second["input_ids"] == first["input_ids"]
    other, _ = tokenize_conversations(conversations, tokenizer, max_length=512, train_on="all", cache_dir=tmp_path)
    assert other["labels"] != first["labels"]
    assert len(list((tmp_path / "llm_finetuning").glob("tokenized-*.arrow"))) == 2


def test_multiprocess_tokenisation_gives_the_same_data(tokenizer, tmp_path):
    conversations = [MULTI_TURN, MULTI_TURN[:3]] * 4
    one, _ = tokenize_conversations(conversations, tokenizer, max_length=512, cache_dir=tmp_path / "a")
    two, _ = tokenize_conversations(conversations, tokenizer, max_length=512, num_proc=2, cache_dir=tmp_path / "b")
    assert one["input_ids"] == two["input_ids"] and one["labels"] == two["labels"]


def test_collator_pads_to_the_longest_sample_only(tokenizer):
    features = [
        tokenize_conversation(tokenizer, MULTI_TURN, 512),
        tokenize_conversation(tokenizer, MULTI_TURN[:3], 512),
    ]
    rows = [{"input_ids": f.input_ids, "labels": f.labels} for f in features]
    batch = make_collator(tokenizer)(rows)
    longest = max(len(f.input_ids) for f in features)
    assert batch["input_ids"].shape == (2, longest)
    short = len(features[1].input_ids)
    assert batch["attention_mask"][1, short:].sum() == 0
    assert (batch["labels"][1, short:] == IGNORE_INDEX).all()
    assert make_collator(tokenizer, pad_to_length=256)(rows)["input_ids"].shape == (2, 256)


def test_bucket_size_is_decided_once_by_the_device_unless_asked(caplog):
    with caplog.at_level("INFO", logger="sft.data.collate"):
        assert pad_multiple(None, "cuda") == CUDA_PAD_MULTIPLE == 64
    assert caplog.messages == ["Batches: rows padded to a multiple of 64 tokens (the default on CUDA: few shapes for "
                               "the attention kernels)"]  # fmt: skip
    assert pad_multiple(None, "cpu") == 1  # the CPU's kernels build nothing per shape: no extra padding there
    assert pad_multiple(8, "cpu") == 8 and pad_multiple(1, "cuda") == 1  # --pad_to_multiple_of wins


def test_bucketed_lengths_are_multiples_never_past_the_training_length():
    assert [bucketed_length(n, 64) for n in (1, 64, 65, 200)] == [64, 64, 128, 256]
    assert [bucketed_length(n, 64, cap=150) for n in (1, 100, 130, 150)] == [64, 128, 150, 150]
    assert bucketed_length(37, 1) == 37 and bucketed_length(300, 64, cap=256) == 300  # never cuts a row


@torch.no_grad()
def test_bucketed_padding_keeps_the_loss_and_the_shapes_few(tokenizer, tiny_model):
    ids = tokenize_conversation(tokenizer, MULTI_TURN + MULTI_TURN[1:] * 8, 300)
    rng = random.Random(0)
    rows = []
    for _ in range(24):  # rows of random lengths, each a prefix of one conversation, trained where it is
        length = rng.randint(8, len(ids.input_ids))
        rows.append({"input_ids": ids.input_ids[:length], "labels": ids.labels[:length]})
    plain, bucketed = make_collator(tokenizer), make_collator(tokenizer, pad_to_multiple_of=64, max_length=300)
    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    plain_shapes, bucketed_shapes = set(), set()
    for start in range(0, len(rows), 3):
        batch, padded = plain(rows[start : start + 3]), bucketed(rows[start : start + 3])
        plain_shapes.add(batch["input_ids"].shape[1])
        bucketed_shapes.add(padded["input_ids"].shape[1])
        assert padded["attention_mask"].sum() == batch["attention_mask"].sum()
        assert (padded["labels"][:, batch["labels"].shape[1] :] == IGNORE_INDEX).all()
        assert model(**padded).loss.item() == pytest.approx(model(**batch).loss.item(), rel=1e-5)
    assert bucketed_shapes <= {64, 128, 192, 256, 300} and len(bucketed_shapes) < len(plain_shapes)


def test_data_errors_are_user_errors_and_still_value_errors(tokenizer, tmp_path):
    from sft.data import NothingToTrainError, TemplateRefusal
    from sft.errors import UserError
    from sft.packing import PackingError

    for error in (DataError, TemplateRefusal, NothingToTrainError, PackingError):
        assert issubclass(error, UserError) and issubclass(error, ValueError)
    with pytest.raises(NothingToTrainError, match="no train sample is left"):
        tokenize_conversations([MULTI_TURN], tokenizer, max_length=4, drop_long=True, cache_dir=tmp_path)


def test_a_refusal_in_memory_mapped_data_names_its_file_and_line(tokenizer, tmp_path, monkeypatch):
    import sft.data.cache
    from sft.data import read_data

    monkeypatch.setattr(sft.data.cache, "TOKENIZE_BATCH", 2)  # the refused sample is in the second batch
    refusing = tokenizer.__class__.from_pretrained(tokenizer.name_or_path)
    refusing.chat_template = (
        "{% for m in messages %}{% if 'forbidden' in m.content %}{{ raise_exception('no forbidden words') }}"
        "{% endif %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    )
    lines = [MULTI_TURN, MULTI_TURN, [{"role": "user", "content": "a forbidden word"}, *MULTI_TURN[-1:]]]
    path = write_jsonl(tmp_path / "d.jsonl", [{"messages": messages} for messages in lines])
    with pytest.raises(DataError, match=rf"{path}, line 3: .*no forbidden words"):
        tokenize_conversations(read_data(str(path), cache_dir=tmp_path), refusing, 64, cache_dir=tmp_path)
