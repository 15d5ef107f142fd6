"""sft.evaluation: perplexity and logits on rendered samples, held-out split, sizes, chat files."""

from __future__ import annotations

import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from sft.data import IGNORE_INDEX, DataError, load_conversations
from sft.evaluation import (
    format_size,
    head,
    max_abs_diff,
    perplexity,
    sample_logits,
    save_chat_files,
    split_held_out,
    tokenize_samples,
    weights_size,
)

EXAMPLES = "data/example_chatml.jsonl"


@pytest.fixture(scope="module")
def model(tiny_model):
    return AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()


def test_perplexity_is_exp_of_the_token_weighted_training_loss(model, tokenizer):
    samples = tokenize_samples(tokenizer, load_conversations(EXAMPLES), 256)
    assert all(any(label != IGNORE_INDEX for label in sample.labels) for sample in samples)
    losses, counts = [], []
    with torch.no_grad():
        for sample in samples:
            labels = torch.tensor([sample.labels])
            losses.append(model(input_ids=torch.tensor([sample.input_ids]), labels=labels).loss.item())
            counts.append(int((labels[0, 1:] != IGNORE_INDEX).sum()))
    expected = math.exp(sum(loss * count for loss, count in zip(losses, counts)) / sum(counts))
    assert perplexity(model, samples) == pytest.approx(expected, rel=1e-5)


def test_logits_and_their_difference(model, tokenizer):
    samples = tokenize_samples(tokenizer, load_conversations(EXAMPLES)[:2], 256, train_on="all")
    logits = sample_logits(model, samples)
    assert [tuple(x.shape) for x in logits] == [(len(s.input_ids), model.config.vocab_size) for s in samples]
    assert max_abs_diff(logits, logits) == 0
    shifted = [x.clone() for x in logits]
    shifted[1][3, 5] += 0.25
    assert max_abs_diff(logits, shifted) == pytest.approx(0.25)
    with pytest.raises(ValueError):
        max_abs_diff(logits, logits[:1])


def test_held_out_split_is_disjoint_complete_and_seeded():
    conversations = [[{"role": "user", "content": str(i)}] for i in range(10)]
    kept, held = split_held_out(conversations, 3, seed=1)
    assert len(kept) == 7 and len(held) == 3
    assert sorted(kept + held, key=lambda m: int(m[0]["content"])) == conversations
    assert split_held_out(conversations, 3, seed=1) == (kept, held)
    assert split_held_out(conversations, 3, seed=2) != (kept, held)
    with pytest.raises(ValueError, match="cannot hold out 10 of 10"):
        split_held_out(conversations, 10)


def test_a_refused_sample_is_a_data_error_at_its_place_in_the_file_after_a_split(refusing_model, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(refusing_model)
    data = tmp_path / "data.jsonl"
    questions = ["Hello", "Hi there", "Say forbidden", "Bye"]
    data.write_text(
        "".join(
            json.dumps({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": "Ok"}]}) + "\n"
            for q in questions
        )
    )
    kept, held = split_held_out(load_conversations(data), 2, seed=0)
    refused = kept if any("forbidden" in m[0]["content"] for m in kept) else held
    with pytest.raises(DataError) as error:
        tokenize_samples(tokenizer, head(refused, 2), 256)
    assert str(error.value) == (
        f"{data}, line 3: the chat template refuses this conversation: the word forbidden is not allowed"
    )
    plain = [[{"role": "user", "content": "Say forbidden"}, {"role": "assistant", "content": "Ok"}]]
    with pytest.raises(DataError, match="built-in samples, sample 1: the chat template refuses"):
        tokenize_samples(tokenizer, plain, 256)


def test_weights_size_counts_weight_files_only(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"x" * 1000)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "pytorch_model.bin").write_bytes(b"x" * 24)
    (tmp_path / "tokenizer.json").write_bytes(b"x" * 5000)
    (tmp_path / "training_args.bin").write_bytes(b"x" * 5000)
    assert weights_size(tmp_path) == 1024
    assert format_size(1024) == "1.0 KiB" and format_size(12) == "12 B" and format_size(3 * 2**30) == "3.0 GiB"


def test_save_chat_files_writes_tokenizer_template_and_generation_config(tiny_model, tokenizer, tmp_path):
    save_chat_files(tmp_path, tokenizer, tiny_model)
    assert AutoTokenizer.from_pretrained(tmp_path).chat_template == tokenizer.chat_template
    assert (
        GenerationConfig.from_pretrained(tmp_path).to_dict() == GenerationConfig.from_pretrained(tiny_model).to_dict()
    )
