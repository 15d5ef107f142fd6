"""sft/chat.py on the tiny model: loading every kind of output folder, streaming, stopping, settings."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from peft import AutoPeftModelForCausalLM, PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer, set_seed

from sft.chat import (
    ChatTemplateError,
    GenerationSettings,
    conversation,
    load_for_chat,
    reply,
    stop_token_ids,
    stream_reply,
)
from sft.data import render
from sft.modeling import ModelPathError

QUESTION = "What is your name?"


@pytest.fixture(scope="module", params=["adapter", "merged"])
def folder(request) -> str:
    return request.getfixturevalue({"adapter": "chat_adapter", "merged": "chat_merged"}[request.param])


def plain_generate(path: str, messages: list[dict], seed: int, **generation) -> str:
    """The reference: transformers alone, without sft.chat. Loads the folder the way its kind requires."""
    is_adapter = path.endswith("lora")
    model = (AutoPeftModelForCausalLM if is_adapter else AutoModelForCausalLM).from_pretrained(path).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    stop = tokenizer.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"])
    set_seed(seed)
    output = model.generate(**ids, eos_token_id=stop, pad_token_id=stop[1], **generation)
    return tokenizer.decode(output[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)


@pytest.mark.parametrize(
    ("settings", "generation"),
    [
        (
            GenerationSettings(max_new_tokens=40, temperature=0),
            {"max_new_tokens": 40, "do_sample": False},
        ),
        (
            GenerationSettings(max_new_tokens=40, temperature=1.3, top_p=0.95, top_k=0),
            {"max_new_tokens": 40, "do_sample": True, "temperature": 1.3, "top_p": 0.95, "top_k": 0},
        ),
    ],
    ids=["greedy", "sampled"],
)
def test_stream_matches_plain_generate(folder, settings, generation, assert_streamed):
    messages = conversation(
        [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}], QUESTION, "Be brief."
    )
    model, tokenizer = load_for_chat(folder)
    assert isinstance(model, PeftModel) == folder.endswith("lora")
    pieces = list(stream_reply(model, tokenizer, messages, settings, seed=11))
    assert_streamed(pieces)
    assert "".join(pieces) == plain_generate(folder, messages, seed=11, **generation)


def test_same_seed_same_reply_other_seed_other_random_state(chat_adapter, monkeypatch):
    model, tokenizer = load_for_chat(chat_adapter)
    settings = GenerationSettings(max_new_tokens=30, temperature=1.5, top_p=1.0, top_k=0)
    messages = conversation([], QUESTION)
    starts: list[torch.Tensor] = []  # the random state each real generate call starts from
    real_generate = model.generate

    def observed(**kwargs):
        starts.append(torch.get_rng_state())
        return real_generate(**kwargs)

    monkeypatch.setattr(model, "generate", observed)
    first, again, _ = ("".join(stream_reply(model, tokenizer, messages, settings, seed)) for seed in (1, 1, 2))
    assert first == again
    # Checked on the random state rather than on the replies, which a tiny model may happen to make equal.
    assert torch.equal(starts[0], starts[1]) and not torch.equal(starts[0], starts[2])


def test_adapter_without_tokenizer_files_uses_the_base_models(chat_adapter, tmp_path):
    bare = tmp_path / "bare-adapter"
    bare.mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        shutil.copy(f"{chat_adapter}/{name}", bare / name)
    model, tokenizer = load_for_chat(str(bare))
    assert isinstance(model, PeftModel)
    assert tokenizer.get_vocab() == AutoTokenizer.from_pretrained(chat_adapter).get_vocab()


def test_reply_is_the_streamed_text_stripped(chat_merged):
    model, tokenizer = load_for_chat(chat_merged)
    messages = conversation([], QUESTION)
    streamed = "".join(stream_reply(model, tokenizer, messages, GenerationSettings(max_new_tokens=24, temperature=0)))
    assert reply(model, tokenizer, messages, max_new_tokens=24) == streamed.strip()


def test_stop_tokens_include_the_templates_end_of_turn(tiny_model):
    """A base model's eos is <|endoftext|>; a ChatML fine-tune must still stop at <|im_end|>."""
    model, tokenizer = load_for_chat(tiny_model)
    endoftext, im_end = tokenizer.convert_tokens_to_ids(["<|endoftext|>", "<|im_end|>"])
    model.generation_config.eos_token_id = endoftext
    tokenizer.eos_token = "<|endoftext|>"
    assert stop_token_ids(model, tokenizer) == sorted({endoftext, im_end})


def test_closing_the_stream_stops_generation(tiny_model):
    model, tokenizer = load_for_chat(tiny_model)
    steps = []
    model.register_forward_hook(lambda *_: steps.append(1))
    settings = GenerationSettings(max_new_tokens=2000, min_new_tokens=2000, temperature=0)
    stream = stream_reply(model, tokenizer, conversation([], QUESTION), settings)
    next(stream)
    stream.close()
    done = len(steps)
    assert done < 200  # the generation thread has ended, far short of 2000 tokens
    assert len(steps) == done


def test_settings_start_from_the_models_generation_config(tiny_model):
    model, _ = load_for_chat(tiny_model)
    settings = GenerationSettings.from_model(model, top_p=0.5, top_k=None)
    # The tiny model's generation_config.json: greedy, 64 new tokens.
    assert (settings.temperature, settings.max_new_tokens, settings.top_p) == (0.0, 64, 0.5)
    model.generation_config.do_sample, model.generation_config.temperature = True, 0.6
    assert GenerationSettings.from_model(model).temperature == 0.6


def test_settings_updates_are_typed_checked_and_all_or_nothing():
    settings = GenerationSettings()
    updated = settings.updated(["max_new_tokens=3", "temperature=0", "top_p=0.5"])
    assert (updated.max_new_tokens, updated.temperature, updated.top_p) == (3, 0.0, 0.5)
    assert isinstance(updated.max_new_tokens, int)
    for bad, message in [
        (["max_new_tokens=3", "colour=red"], "unknown setting 'colour'"),
        (["max_new_tokens=2.5"], "max_new_tokens takes an integer"),
        (["top_k=__import__('os').getpid()"], "top_k takes an integer"),
        (["temperature"], "expected key=value"),
        (["top_p=1.5"], "top_p must be in (0, 1]"),
        (["max_new_tokens=0"], "max_new_tokens must be at least 1"),
    ]:
        with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
            settings.updated(bad)


def test_greedy_settings_make_a_greedy_config():
    config = GenerationSettings(temperature=0).generation_config([5, 7], None)
    assert config.do_sample is False and config.eos_token_id == [5, 7] and config.pad_token_id == 5
    sampled = GenerationSettings(temperature=0.7, top_p=0.9, top_k=0).generation_config([5], 3)
    assert (sampled.do_sample, sampled.temperature, sampled.top_p, sampled.pad_token_id) == (True, 0.7, 0.9, 3)


def test_conversation_puts_the_system_prompt_first(tokenizer):
    with_system = render(tokenizer, conversation([], QUESTION, "You are a pirate."), add_generation_prompt=True)
    assert with_system.startswith("<|im_start|>system\nYou are a pirate.<|im_end|>\n<|im_start|>user\nWhat is")
    assert "You are a helpful assistant." in render(tokenizer, conversation([], QUESTION), add_generation_prompt=True)


# Mistakes a user can make, and the errors that name them.
def test_an_adapter_config_without_base_model_is_a_model_path_error(chat_adapter, tmp_path):
    adapter = tmp_path / "adapter"
    shutil.copytree(chat_adapter, adapter)
    config = json.loads((adapter / "adapter_config.json").read_text())
    del config["base_model_name_or_path"]
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(ModelPathError, match="adapter_config.json names no base model"):
        load_for_chat(str(adapter))


def test_a_folder_without_a_model_is_a_model_path_error(tmp_path):
    (tmp_path / "notes.txt").write_text("not a model")
    with pytest.raises(ModelPathError, match="not a model folder"):
        load_for_chat(str(tmp_path))
    with pytest.raises(ModelPathError, match="no such folder"):
        load_for_chat(str(tmp_path / "typo"))


def test_a_conversation_the_template_refuses_fails_before_generating(refusing_model, monkeypatch):
    model, tokenizer = load_for_chat(refusing_model)
    monkeypatch.setattr(model, "generate", lambda *args, **kwargs: pytest.fail("generate was called"))
    with pytest.raises(ChatTemplateError, match="refuses this conversation: the word forbidden is not allowed"):
        stream_reply(model, tokenizer, conversation([], "Say forbidden"))
    with pytest.raises(ChatTemplateError):
        reply(model, tokenizer, conversation([], "Say forbidden"))


def test_ask_reports_a_malformed_data_file_and_a_refused_sample_by_line(refusing_model, tmp_path, user_error):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [}\n')
    error = user_error("-m", "scripts.ask", "--model", refusing_model, "--data", str(bad))
    assert error.startswith(f"error: {bad}, line 1: invalid JSON")
    refused = tmp_path / "refused.jsonl"
    lines = [("Hello", "Hi"), ("Say forbidden", "No")]
    refused.write_text(
        "".join(
            json.dumps({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}) + "\n"
            for q, a in lines
        )
    )
    error = user_error("-m", "scripts.ask", "--model", refusing_model, "--data", str(refused))
    assert error == (
        f"error: {refused}, line 2: the chat template refuses this conversation: the word forbidden is not allowed"
    )
