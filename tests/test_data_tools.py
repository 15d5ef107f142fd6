"""Tool calling, template refusals and the learned stop (sft/data/): reading both data formats, labels under
Qwen2.5-, Llama-3.1- and Mistral-style templates (written here after how those templates behave), errors."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
from chat_templates import ALPACA_STYLE, GEMMA2_STYLE, LLAMA31_STYLE, MISTRAL_STYLE, QWEN25_STYLE

from sft.data import (
    IGNORE_INDEX,
    TOOLS_ROLE,
    DataError,
    label_spans,
    load_conversations,
    load_tools,
    split_tools,
    tokenize_conversation,
    tokenize_conversations,
    with_tools,
)

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather of a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}


def call(name: str, arguments: dict, call_id: str) -> dict:
    return {"type": "function", "id": call_id, "function": {"name": name, "arguments": arguments}}


# Two rounds: two calls at once, then one call with some text before it.
TOOL_MESSAGES = [
    {"role": "user", "content": "Weather in Paris and Rome?"},
    {
        "role": "assistant",
        "content": "",
        "tool_calls": [
            call("get_weather", {"city": "Paris"}, "call00001"),
            call("get_weather", {"city": "Rome"}, "call00002"),
        ],
    },
    {"role": "tool", "content": "sunny", "tool_call_id": "call00001"},
    {"role": "tool", "content": "rainy", "tool_call_id": "call00002"},
    {"role": "assistant", "content": "Paris is sunny, Rome is rainy."},
    {"role": "user", "content": "And Oslo?"},
    {
        "role": "assistant",
        "content": "Let me check.",
        "tool_calls": [call("get_weather", {"city": "Oslo"}, "call00003")],
    },
    {"role": "tool", "content": "snowing", "tool_call_id": "call00003"},
    {"role": "assistant", "content": "It is snowing in Oslo."},
]
TOOL_CONVERSATION = with_tools(TOOL_MESSAGES, [WEATHER])


@pytest.fixture
def templated(tokenizer):
    """The session tokenizer with `template` as its chat template for one test."""
    original = tokenizer.chat_template

    def use(template: str):
        tokenizer.chat_template = template
        return tokenizer

    yield use
    tokenizer.chat_template = original


def trained_texts(tokenizer, messages) -> list[str]:
    text, spans = label_spans(tokenizer, messages)
    return [text[start:end] for start, end in spans]


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records), encoding="utf-8")
    return path


# ---------------------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------------------


def test_chatml_and_sharegpt_tool_data_read_to_the_same_conversation(tmp_path):
    chatml = {
        "tools": [WEATHER],
        "messages": [
            {"role": "user", "content": "Weather in Paris?"},
            # arguments as OpenAI writes them (a JSON string), content null
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {"type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
                ],
            },
            {"role": "tool", "name": "get_weather", "content": "sunny"},
            {"role": "assistant", "content": "Sunny."},
        ],
    }
    sharegpt = {
        "tools": json.dumps([WEATHER["function"]]),  # LLaMA-Factory: a string of bare function schemas
        "conversations": [
            {"from": "human", "value": "Weather in Paris?"},
            {"from": "function_call", "value": json.dumps({"name": "get_weather", "arguments": {"city": "Paris"}})},
            {"from": "observation", "value": "sunny"},
            {"from": "gpt", "value": "Sunny."},
        ],
    }
    (from_chatml,), (from_sharegpt,) = (
        load_conversations(write_jsonl(tmp_path / f"{n}.jsonl", [r])) for n, r in (("a", chatml), ("b", sharegpt))
    )
    expected_call = {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
    assert from_chatml[0] == {"role": TOOLS_ROLE, "tools": [WEATHER]}
    assert from_chatml[2] == {"role": "assistant", "content": "", "tool_calls": [expected_call]}
    assert from_chatml[3] == {"role": "tool", "content": "sunny", "name": "get_weather"}
    del from_chatml[3]["name"]
    assert from_sharegpt == from_chatml
    messages, tools = split_tools(from_chatml)
    assert tools == [WEATHER] and messages[0] == {"role": "user", "content": "Weather in Paris?"}


def test_sharegpt_function_call_may_hold_several_calls(tmp_path):
    calls = [{"name": "get_weather", "arguments": {"city": city}} for city in ("Paris", "Rome")]
    record = {
        "conversations": [
            {"from": "human", "value": "Paris and Rome?"},
            {"from": "function_call", "value": json.dumps(calls)},
            {"from": "observation", "value": "sunny; rainy"},
            {"from": "gpt", "value": "Sunny and rainy."},
        ]
    }
    (conversation,) = load_conversations(write_jsonl(tmp_path / "d.jsonl", [record]))
    assert [c["function"]["arguments"]["city"] for c in conversation[1]["tool_calls"]] == ["Paris", "Rome"]


USER = {"role": "user", "content": "q"}
ANSWER = {"role": "assistant", "content": "a"}


def calling(arguments) -> dict:
    return {
        "role": "assistant",
        "content": "",
        "tool_calls": [{"type": "function", "function": {"name": "f", "arguments": arguments}}],
    }


@pytest.mark.parametrize(
    ("record", "expected"),
    [
        (
            {"messages": [USER, calling("{not json"), ANSWER]},
            ["messages[1].tool_calls[0].function.arguments", "not valid JSON"],
        ),
        (
            {"messages": [USER, calling("[1, 2]"), ANSWER]},
            ["messages[1].tool_calls[0].function.arguments", "expected a JSON object, got list"],
        ),
        ({"messages": [USER, calling(7), ANSWER]}, ["messages[1].tool_calls[0].function.arguments", "got int"]),
        (
            {"messages": [USER, {"role": "tool", "content": "r"}, ANSWER]},
            ["messages[1]", "tool result with no tool call before it"],
        ),
        (
            {"messages": [USER, calling({}), USER, {"role": "tool", "content": "r"}, ANSWER]},
            ["messages[3]", "no tool call before it"],
        ),
        (
            {"messages": [USER, {"role": "assistant", "content": "", "tool_calls": {}}, ANSWER]},
            ["messages[1].tool_calls", "non-empty list"],
        ),
        (
            {"messages": [USER, {"role": "assistant", "tool_calls": [{"function": {"arguments": {}}}]}, ANSWER]},
            ["messages[1].tool_calls[0].function.name", "missing"],
        ),
        (
            {
                "messages": [
                    USER,
                    {"role": "assistant", "tool_calls": [{"type": "function", "id": "x1", "function": {"name": "f"}}]},
                    {"role": "tool", "content": "r", "tool_call_id": "x2"},
                    ANSWER,
                ]
            },
            ["messages[2].tool_call_id", "'x2' is not the id"],
        ),
        ({"tools": "{", "messages": [USER, ANSWER]}, ["field 'tools'", "not valid JSON"]),
        ({"tools": [{"description": "no name"}], "messages": [USER, ANSWER]}, ["tools[0].name", "missing"]),
        (
            {
                "conversations": [
                    {"from": "human", "value": "q"},
                    {"from": "function_call", "value": "get_weather(Paris)"},
                ]
            },
            ["conversations[1].value", "not valid JSON"],
        ),
        (
            {
                "conversations": [
                    {"from": "human", "value": "q"},
                    {"from": "observation", "value": "r"},
                    {"from": "gpt", "value": "a"},
                ]
            },
            ["conversations[1]", "no tool call before it"],
        ),
    ],
)
def test_malformed_tool_data_names_the_field(tmp_path, record, expected):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"messages": [USER, ANSWER]}, record])
    with pytest.raises(DataError) as caught:
        load_conversations(path)
    message = str(caught.value)
    assert f"{path}, line 2" in message
    for part in expected:
        assert part in message


def test_a_tools_file_is_read_and_checked(tmp_path):
    path = tmp_path / "tools.json"
    path.write_text(json.dumps([WEATHER["function"]]))
    assert load_tools(path) == [WEATHER]
    path.write_text(json.dumps([{"parameters": {}}]))
    with pytest.raises(DataError, match=r"tools\[0\]\.name"):
        load_tools(path)


# ---------------------------------------------------------------------------------------------------------
# Labels of tool calls
# ---------------------------------------------------------------------------------------------------------


def test_qwen25_style_tool_calls_and_answers_trained_results_not(templated):
    tokenizer = templated(QWEN25_STYLE)
    assert trained_texts(tokenizer, TOOL_CONVERSATION) == [
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome"}}\n</tool_call><|im_end|>',
        "Paris is sunny, Rome is rainy.<|im_end|>",
        'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call><|im_end|>',
        "It is snowing in Oslo.<|im_end|>",
    ]
    # The same at the token level: results, schemas and prompts carry no label.
    tokenized = tokenize_conversation(tokenizer, TOOL_CONVERSATION, max_length=4096)
    trained = tokenizer.decode([label for label in tokenized.labels if label != IGNORE_INDEX])
    for untrained in ("sunny\n", "rainy\n", "snowing\n", "Current weather", "Weather in Paris", "And Oslo?"):
        assert untrained not in trained
    assert trained.count("<tool_call>") == 3


def test_llama31_style_tool_calls_and_answers_trained_results_not(templated):
    tokenizer = templated(LLAMA31_STYLE)
    assert trained_texts(tokenizer, TOOL_CONVERSATION) == [
        '{"name": "get_weather", "parameters": {"city": "Paris"}}'
        '{"name": "get_weather", "parameters": {"city": "Rome"}}<|eot_id|>',
        "Paris is sunny, Rome is rainy.<|eot_id|>",
        '{"name": "get_weather", "parameters": {"city": "Oslo"}}<|eot_id|>',
        "It is snowing in Oslo.<|eot_id|>",
    ]


def test_mistral_style_tool_calls_labelled_though_prefixes_render_differently(templated):
    tokenizer = templated(MISTRAL_STYLE)
    eos = tokenizer.eos_token
    assert trained_texts(tokenizer, TOOL_CONVERSATION) == [
        '[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Paris"}, "id": "call00001"}, '
        '{"name": "get_weather", "arguments": {"city": "Rome"}, "id": "call00002"}]' + eos,
        "Paris is sunny, Rome is rainy." + eos,
        '[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Oslo"}, "id": "call00003"}]' + eos,
        " It is snowing in Oslo." + eos,  # the last turn: its prefix is one, with the space before it
    ]


def test_a_template_without_tool_support_is_a_data_error_naming_the_sample(tokenizer, tmp_path):
    record = {"tools": [WEATHER], "messages": TOOL_MESSAGES}
    path = write_jsonl(tmp_path / "tools.jsonl", [{"messages": [USER, ANSWER]}, record])
    # The tiny model's ChatML template renders any role, and neither tools nor calls.
    with pytest.raises(DataError) as caught:
        tokenize_conversations(load_conversations(path), tokenizer, 512, cache_dir=tmp_path / "cache")
    assert f"{path}, line 2" in str(caught.value)
    assert "does not render tool use" in str(caught.value) and "get_weather" in str(caught.value)


# ---------------------------------------------------------------------------------------------------------
# Template refusals and the stop token
# ---------------------------------------------------------------------------------------------------------

SYSTEM_SAMPLES = [
    {"messages": [{"role": "system", "content": "Talk like a pirate."}, USER, ANSWER]},
    {"messages": [{"role": "user", "content": "q2"}, {"role": "assistant", "content": "a2"}]},
]


def test_a_system_message_the_template_refuses_is_folded_into_the_first_user_message(templated, tmp_path, caplog):
    tokenizer = templated(GEMMA2_STYLE)
    conversations = load_conversations(write_jsonl(tmp_path / "d.jsonl", SYSTEM_SAMPLES))
    with caplog.at_level(logging.INFO, logger="sft.data"):
        dataset, counts = tokenize_conversations(conversations, tokenizer, 512, cache_dir=tmp_path / "cache")
    assert counts["ok"] == 2
    assert "in 1 samples its text was put at the start of the first user message" in caplog.text
    text = tokenizer.decode(dataset[0]["input_ids"])
    assert "<start_of_turn>user\nTalk like a pirate.\n\nq<end_of_turn>" in text


def test_a_template_refusal_is_a_data_error_with_file_line_and_the_templates_message(templated, tmp_path):
    tokenizer = templated(GEMMA2_STYLE)
    conversations = load_conversations(write_jsonl(tmp_path / "d.jsonl", SYSTEM_SAMPLES[::-1]))
    for num_proc in (None, 2):  # from a worker process too
        with pytest.raises(DataError) as caught:
            tokenize_conversations(
                conversations, tokenizer, 512, cache_dir=tmp_path / f"c{num_proc}", fold_system=False, num_proc=num_proc
            )
        message = str(caught.value)
        assert f"{tmp_path / 'd.jsonl'}, line 2" in message
        assert "System role not supported" in message and "--fold_system_prompt true" in message
    # Roles out of order: no folding helps, the template's own message is reported.
    tokenizer = templated(MISTRAL_STYLE)
    bad = [{"messages": [USER, ANSWER]}, {"messages": [{"role": "system", "content": "s"}, USER, ANSWER]}]
    with pytest.raises(DataError, match=r"line 2.*Only user, assistant and tool roles"):
        tokenize_conversations(
            load_conversations(write_jsonl(tmp_path / "m.jsonl", bad)),
            tokenizer,
            512,
            cache_dir=tmp_path / "m",
            fold_system=False,
        )


def test_eos_is_appended_and_trained_where_the_template_writes_no_end_of_turn(templated):
    tokenizer = templated(ALPACA_STYLE)
    eos = tokenizer.eos_token
    messages = [USER, ANSWER, {"role": "user", "content": "q2"}, {"role": "assistant", "content": "a2"}]
    text, spans = label_spans(tokenizer, messages)
    assert text == f"### Instruction:\nq\n\n### Response:\na{eos}\n\n### Instruction:\nq2\n\n### Response:\na2{eos}\n\n"
    assert [text[start:end] for start, end in spans] == [f"a{eos}", f"a2{eos}"]
    tokenized = tokenize_conversation(tokenizer, messages, max_length=512)
    eos_id = tokenizer.convert_tokens_to_ids(eos)
    trained = [label for label in tokenized.labels if label != IGNORE_INDEX]
    assert trained.count(eos_id) == 2 and tokenized.input_ids.count(eos_id) == 2


def test_templates_that_write_an_end_of_turn_get_no_eos(templated):
    for template, stop in ((QWEN25_STYLE, "<|im_end|>"), (LLAMA31_STYLE, "<|eot_id|>")):
        tokenizer = templated(template)
        text, spans = label_spans(tokenizer, [USER, ANSWER])
        assert [text[start:end] for start, end in spans] == [f"a{stop}"]
        assert tokenizer.eos_token not in text or template is QWEN25_STYLE


# ---------------------------------------------------------------------------------------------------------
# A model trained on tool calls makes them
# ---------------------------------------------------------------------------------------------------------


def test_lora_on_tool_call_data_teaches_the_model_to_call_the_tool(tiny_model, tmp_path, run_finetune):
    from sft.chat import load_for_chat, reply

    model_dir = tmp_path / "tools-model"
    shutil.copytree(tiny_model, model_dir)
    (model_dir / "chat_template.jinja").write_text(QWEN25_STYLE)
    tools = [{"type": "function", "function": {"name": "lookup_forecast", "parameters": {"type": "object"}}}]
    question = {"role": "user", "content": "Is it raining in Quito?"}
    expected = '<tool_call>\n{"name": "lookup_forecast", "arguments": {"city": "Quito"}}\n</tool_call>'
    call_turn = {"role": "assistant", "content": "", "tool_calls": [call("lookup_forecast", {"city": "Quito"}, "c1")]}
    sample = {"tools": tools, "messages": [question, call_turn]}
    data = write_jsonl(tmp_path / "tools.jsonl", [sample] * 8)
    prompt = with_tools([question], tools)

    base, tokenizer = load_for_chat(str(model_dir), cpu_only=True)
    assert "lookup_forecast" not in reply(base, tokenizer, prompt, max_new_tokens=40)  # not there by chance

    output = tmp_path / "lora"
    args = ["--model_name_or_path", str(model_dir), "--data_path", str(data), "--output_dir", str(output)]
    # The tiny model's output layer has barely seen "<", "_" or "{": LoRA on it too, or it cannot learn the call.
    args += ["--lora_target_modules", "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    args += [
        "lm_head",
        "--use_lora",
        "--lora_r",
        "32",
        "--lora_alpha",
        "32",
        "--max_steps",
        "60",
        "--learning_rate",
        "1e-2",
    ]
    args += ["--per_device_train_batch_size", "8", "--save_strategy", "no", "--report_to", "none", "--seed", "0"]
    args += ["--model_max_length", "512", "--dataloader_pin_memory", "false", "--lora_dropout", "0"]
    run_finetune(*args)
    model, tokenizer = load_for_chat(str(output), cpu_only=True)
    assert reply(model, tokenizer, prompt, max_new_tokens=100) == expected


def test_finetune_reports_a_template_refusal_before_loading_the_model(tiny_model, tmp_path, monkeypatch):
    import finetune
    from sft import model_setup
    from sft.args import parse_arguments

    model_dir = tmp_path / "gemma-like"
    shutil.copytree(tiny_model, model_dir)
    (model_dir / "chat_template.jinja").write_text(GEMMA2_STYLE)
    data = write_jsonl(tmp_path / "d.jsonl", SYSTEM_SAMPLES[::-1])

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the data error")

    monkeypatch.setattr(model_setup, "load_model", no_model)  # where finetune.py's model is built
    args = ["--model_name_or_path", str(model_dir), "--data_path", str(data), "--output_dir", str(tmp_path / "out")]
    args += ["--fold_system_prompt", "false", "--report_to", "none", "--preprocessing_cache_dir", str(tmp_path / "c")]
    with pytest.raises(DataError) as caught:
        finetune.train(*parse_arguments(args))
    assert f"{data}, line 2: the chat template refuses this conversation: System role not supported" in str(
        caught.value
    )
