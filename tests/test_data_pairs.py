"""Preference pairs (sft.data.pairs): every record form read as the same pair, through every source kind; the
prompt-prefix rule, the truncation rule and the dropped pairs."""

from __future__ import annotations

import json

import datasets
import pytest
from chat_templates import QWEN25_STYLE

from sft.data import IGNORE_INDEX, DataError, load_data, read_data
from sft.data.cache import NothingToTrainError
from sft.data.pairs import PairCollator, pair_sample, parse_pair, tokenize_pair, tokenize_pairs
from sft.modeling import load_tokenizer

QUESTION = {"role": "user", "content": "What is 2+2?"}
GOOD = {"role": "assistant", "content": "4"}
BAD = {"role": "assistant", "content": "5"}
EXPECTED = {"prompt": [QUESTION], "chosen": GOOD, "rejected": BAD}

FORMS = {
    "sharegpt_ranking": {
        "conversations": [{"from": "human", "value": "What is 2+2?"}],
        "chosen": {"from": "gpt", "value": "4"},
        "rejected": {"from": "gpt", "value": "5"},
    },
    "messages_ranking": {"messages": [QUESTION], "chosen": GOOD, "rejected": BAD},
    "alpaca_ranking": {"instruction": "What is", "input": "2+2?", "chosen": "4", "rejected": "5"},
    "explicit_prompt": {"prompt": "What is 2+2?", "chosen": "4", "rejected": "5"},
    "explicit_prompt_messages": {"prompt": [QUESTION], "chosen": [GOOD], "rejected": [BAD]},
    "implicit_prompt": {"chosen": [QUESTION, GOOD], "rejected": [QUESTION, BAD]},
}


@pytest.mark.parametrize("name", FORMS)
def test_every_form_reads_as_the_same_pair(name):
    pair, form = parse_pair(FORMS[name], "f", "line 1")
    expected = EXPECTED
    if name == "alpaca_ranking":
        expected = {**EXPECTED, "prompt": [{"role": "user", "content": "What is\n2+2?"}]}
    assert pair == expected
    assert form == name.removesuffix("_messages")


def test_implicit_string_prompt_is_the_shared_prefix():
    pair, _ = parse_pair({"chosen": "Q: sky? A: blue", "rejected": "Q: sky? A: green"}, "f", "line 1")
    assert pair["prompt"] == [{"role": "user", "content": "Q: sky? A: "}]
    assert (pair["chosen"]["content"], pair["rejected"]["content"]) == ("blue", "green")


def test_system_tools_and_default_system_prompt():
    tools = [{"name": "add", "parameters": {"type": "object"}}]
    record = {**FORMS["sharegpt_ranking"], "system": "Be brief.", "tools": json.dumps(tools)}
    pair, _ = parse_pair(record, "f", "line 1")
    assert pair["prompt"][0] == {"role": "tools", "tools": [{"type": "function", "function": tools[0]}]}
    assert pair["prompt"][1] == {"role": "system", "content": "Be brief."}
    pair, _ = pair_sample(FORMS["explicit_prompt"], "f", "line 1", "Default system.")
    assert pair["prompt"][0] == {"role": "system", "content": "Default system."}


@pytest.mark.parametrize(
    "record, field, message",
    [
        ({"prompt": "q", "chosen": "a"}, "rejected", "missing: a preference pair"),
        ({"prompt": "q", "chosen": "a", "rejected": 3}, "rejected", "expected a non-empty list"),
        ({"messages": [QUESTION, GOOD], "chosen": GOOD, "rejected": BAD}, "prompt", "must end with a user turn"),
        ({"prompt": "q", "chosen": [GOOD, BAD], "rejected": "b"}, "chosen", "expected one assistant answer"),
        ({"chosen": [QUESTION, GOOD], "rejected": [GOOD, BAD]}, "chosen", "shared prompt followed by one"),
        ({"chosen": "abc", "rejected": "xyz"}, "prompt", "share no prompt text"),
    ],
)
def test_malformed_pairs_name_the_field(record, field, message):
    with pytest.raises(DataError, match=rf"f, line 7, field '{field}.*{message}"):
        parse_pair(record, "f", "line 7")


def test_every_source_kind_reads_pairs(tmp_path):
    records = list(FORMS.values())
    jsonl = tmp_path / "pairs.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in records))
    (tmp_path / "pairs.json").write_text(json.dumps(records))
    datasets.Dataset.from_list([FORMS["explicit_prompt"]] * 2).to_parquet(str(tmp_path / "pairs.parquet"))
    for path in ("pairs.jsonl", "pairs.json", "pairs.parquet"):
        data = read_data(str(tmp_path / path), cache_dir=tmp_path / "cache", parse=pair_sample)
        for row in data:
            pair = json.loads(row["messages"])
            assert pair["chosen"] == GOOD and pair["rejected"] == BAD, path
    assert load_data(str(jsonl), parse=pair_sample).wheres[2] == "line 3"
    broken = tmp_path / "broken.jsonl"
    broken.write_text(json.dumps(FORMS["explicit_prompt"]) + "\n" + json.dumps({"prompt": "q", "chosen": "a"}) + "\n")
    with pytest.raises(DataError, match=r"broken.jsonl, line 2, field 'rejected'"):
        read_data(str(broken), cache_dir=tmp_path / "cache", parse=pair_sample)


def answer_text(tokenizer, ids, labels):
    return tokenizer.decode([i for i, label in zip(ids, labels) if label != IGNORE_INDEX])


def test_each_side_is_prompt_plus_its_answer_with_its_stop(tokenizer):
    tokenized = tokenize_pair(tokenizer, EXPECTED, max_length=512)
    assert tokenized.status == "ok"
    assert answer_text(tokenizer, tokenized.chosen_ids, tokenized.chosen_labels) == "4<|im_end|>"
    assert answer_text(tokenizer, tokenized.rejected_ids, tokenized.rejected_labels) == "5<|im_end|>"
    prompt = tokenizer.apply_chat_template([QUESTION], add_generation_prompt=True, tokenize=False)
    prompt_ids = tokenizer.encode(prompt, add_special_tokens=False)
    for ids in (tokenized.chosen_ids, tokenized.rejected_ids):
        assert ids[: len(prompt_ids)] == prompt_ids


def test_tools_render_in_the_prompt(tool_model):
    tokenizer = load_tokenizer(tool_model)
    assert tokenizer.chat_template == QWEN25_STYLE
    tools = [{"name": "add", "parameters": {"type": "object"}}]
    pair, _ = parse_pair({**FORMS["explicit_prompt"], "tools": tools}, "f", "line 1")
    tokenized = tokenize_pair(tokenizer, pair, max_length=512)
    assert '"name": "add"' in tokenizer.decode(tokenized.chosen_ids)
    assert answer_text(tokenizer, tokenized.chosen_ids, tokenized.chosen_labels) == "4<|im_end|>"


def test_a_prompt_that_is_not_a_token_prefix_is_an_error_naming_the_sample(tiny_model, tmp_path):
    tokenizer = load_tokenizer(tiny_model)
    # The generation prompt opens a thinking block that the rendered answer turn does not have.
    tokenizer.chat_template = tokenizer.chat_template.replace(
        "<|im_start|>assistant\n' }}", "<|im_start|>assistant\n<think>' }}"
    )
    assert "<think>" in tokenizer.apply_chat_template([QUESTION], add_generation_prompt=True, tokenize=False)
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps(FORMS["explicit_prompt"]) + "\n")
    data = read_data(str(path), cache_dir=tmp_path / "cache", parse=pair_sample)
    with pytest.raises(DataError, match=r"p.jsonl, line 1, field 'prompt': the prompt's \d+ tokens.*not the first"):
        tokenize_pairs(data, tokenizer, 512, cache_dir=tmp_path / "cache")


def long_conversation_pair(turn_words: int, answer_words: int = 2) -> dict:
    old = [{"role": "user", "content": "old " * turn_words}, {"role": "assistant", "content": "reply " * turn_words}]
    final = {"role": "user", "content": "final question"}
    return {
        "prompt": [{"role": "system", "content": "sys"}, *old, final],
        "chosen": {"role": "assistant", "content": "yes " * answer_words},
        "rejected": {"role": "assistant", "content": "no"},
    }


def test_truncation_drops_the_oldest_turns_first_and_keeps_the_final_user_turn(tokenizer):
    pair = long_conversation_pair(turn_words=100)
    whole = tokenize_pair(tokenizer, pair, max_length=4096)
    assert whole.status == "ok" and len(whole.chosen_ids) > 200
    cut = tokenize_pair(tokenizer, pair, max_length=60)
    assert cut.status == "truncated" and cut.dropped_turns == 1
    text = tokenizer.decode(cut.chosen_ids)
    assert "old" not in text and "sys" in text and "final question" in text
    assert answer_text(tokenizer, cut.chosen_ids, cut.chosen_labels) == "yes yes <|im_end|>"


def test_truncation_then_cuts_the_answer_tail(tokenizer):
    pair = long_conversation_pair(turn_words=1, answer_words=200)
    cut = tokenize_pair(tokenizer, pair, max_length=40)
    assert cut.status == "truncated" and cut.dropped_turns == 1 and len(cut.chosen_ids) == 40
    assert answer_text(tokenizer, cut.chosen_ids, cut.chosen_labels).startswith("yes yes")
    assert "final question" in tokenizer.decode(cut.chosen_ids)
    assert len(cut.rejected_ids) < 40  # the short side is whole


def test_equal_answers_and_nothing_left_are_dropped_and_counted(tokenizer, tmp_path):
    equal = {**EXPECTED, "rejected": GOOD}
    assert tokenize_pair(tokenizer, equal, 512).status == "dropped_equal"
    # The prompt alone fills the length: no answer token is left on either side.
    fits = len(tokenize_pair(tokenizer, EXPECTED, 512).chosen_ids)
    long_prompt = {**EXPECTED, "prompt": [{"role": "user", "content": "word " * 200}]}
    assert tokenize_pair(tokenizer, long_prompt, fits).status == "dropped_no_label"
    tokenized, counts = tokenize_pairs([EXPECTED, equal, long_prompt], tokenizer, fits, cache_dir=tmp_path)
    assert len(tokenized) == 1 and counts == {"ok": 1, "dropped_equal": 1, "dropped_no_label": 1}
    with pytest.raises(NothingToTrainError, match="no train pair is left"):
        tokenize_pairs([equal], tokenizer, 30, cache_dir=tmp_path)


def test_collator_puts_chosen_rows_then_rejected_rows(tokenizer):
    pairs = [tokenize_pair(tokenizer, EXPECTED, 512), tokenize_pair(tokenizer, long_conversation_pair(1), 512)]
    features = [
        {
            "chosen_input_ids": p.chosen_ids,
            "chosen_labels": p.chosen_labels,
            "rejected_input_ids": p.rejected_ids,
            "rejected_labels": p.rejected_labels,
        }
        for p in pairs
    ]
    batch = PairCollator(tokenizer.pad_token_id)(features)
    assert batch["input_ids"].shape[0] == 4
    assert batch["input_ids"][2, : len(pairs[0].rejected_ids)].tolist() == pairs[0].rejected_ids
    assert batch["attention_mask"][0].sum().item() == len(pairs[0].chosen_ids)
    assert batch["labels"][1, len(pairs[1].chosen_ids) :].eq(IGNORE_INDEX).all()
