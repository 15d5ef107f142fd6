"""sft/loss.py: the fused output layer + cross-entropy gives the plain path's loss and gradients, and says when it
steps aside."""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import (
    AutoModelForCausalLM,
    CohereConfig,
    Gemma2Config,
    GPT2Config,
    GPT2LMHeadModel,
    Qwen2Config,
    Qwen2ForCausalLM,
    TrainingArguments,
)

from sft.loss import FusedLinearCrossEntropy, causal_lm_loss, chunk_positions, fused_loss_for
from sft.training import FinetuneTrainer

REPO = Path(__file__).resolve().parent.parent
VOCAB = 97
SMALL = dict(
    vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, head_dim=8,
)  # fmt: skip


def tiny(config_class=Qwen2Config, seed: int = 0, dtype=torch.float32, **overrides):
    torch.manual_seed(seed)
    config = config_class(**{**SMALL, **overrides})
    return AutoModelForCausalLM.from_config(config, dtype=dtype).eval()  # eval: no dropout in either path


def batch(seed: int = 1, rows: int = 3, length: int = 21) -> dict[str, torch.Tensor]:
    """Padded rows with prompts (-100) of different lengths; the last row ends in padding."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, VOCAB, (rows, length), generator=generator)
    labels = input_ids.clone()
    attention_mask = torch.ones_like(input_ids)
    for row in range(rows):
        labels[row, : 3 + 2 * row] = -100
    attention_mask[-1, length - 5 :] = 0
    labels[-1, length - 5 :] = -100
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def loss_and_grads(model, compute) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    loss = compute()
    loss.backward()
    grads = {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads


def assert_fused_matches_plain(model, inputs, chunk: int = 8, rtol: float = 1e-5, num_items_in_batch=None):
    fused = fused_loss_for(model)
    assert fused is not None
    fused.chunk = chunk  # several chunks, the last one partial
    extra = {} if num_items_in_batch is None else {"num_items_in_batch": num_items_in_batch}
    plain_loss, plain_grads = loss_and_grads(model, lambda: model(**inputs, **extra).loss)
    fused_loss, fused_grads = loss_and_grads(model, lambda: fused(model, inputs, num_items_in_batch)[0])
    torch.testing.assert_close(fused_loss, plain_loss, rtol=rtol, atol=0)
    assert fused_grads.keys() == plain_grads.keys() and plain_grads
    for name, plain in plain_grads.items():
        # relative to the tensor's largest entry: tiny entries carry only rounding
        scale = plain.abs().max().clamp_min(1e-30)
        torch.testing.assert_close(fused_grads[name] / scale, plain / scale, rtol=0, atol=rtol, msg=name)
    return fused


@pytest.mark.parametrize("tied", [True, False])
def test_full_fine_tuning_tied_and_untied(tied):
    model = tiny(tie_word_embeddings=tied)
    assert assert_fused_matches_plain(model, batch()).head.weight.requires_grad


@pytest.mark.parametrize("tied", [True, False])
def test_lora_frozen_output_layer(tied):
    model = get_peft_model(tiny(tie_word_embeddings=tied), LoraConfig(r=4, target_modules="all-linear"))
    fused = assert_fused_matches_plain(model, batch())
    assert not fused.head.weight.requires_grad


def test_lora_with_trained_output_layer():
    # modules_to_save: a wrapper around lm_head, used through its own forward, whose copy is trained
    model = get_peft_model(tiny(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"]))
    assert_fused_matches_plain(model, batch())


def test_lora_on_the_output_layer():
    # a LoRA-wrapped lm_head: its own forward per chunk, its adapter weights trained
    config = LoraConfig(r=4, target_modules=["q_proj", "lm_head"])
    model = get_peft_model(tiny(tie_word_embeddings=False), config)
    assert type(assert_fused_matches_plain(model, batch()).head) is not torch.nn.Linear


def test_lora_trainable_token_indices():
    config = LoraConfig(r=4, target_modules=["q_proj"], trainable_token_indices={"embed_tokens": [3, 5, 7]})
    model = get_peft_model(tiny(tie_word_embeddings=True), config)
    assert_fused_matches_plain(model, batch())


def test_output_layer_bias():
    model = tiny(tie_word_embeddings=False)
    head = torch.nn.Linear(SMALL["hidden_size"], VOCAB, bias=True)
    torch.nn.init.normal_(head.bias)
    model.lm_head = head
    assert_fused_matches_plain(model, batch())


def test_soft_capped_logits():
    # a small cap, so that the tanh really bends the logits
    model = tiny(Gemma2Config, final_logit_softcapping=0.5, attn_logit_softcapping=None, sliding_window=8)
    fused = assert_fused_matches_plain(model, batch())
    assert (fused.transform, fused.factor) == ("softcap", 0.5)


def test_scaled_logits():
    model = tiny(CohereConfig, logit_scale=0.25)
    fused = assert_fused_matches_plain(model, batch())
    assert (fused.transform, fused.factor) == ("scale", 0.25)


def test_packed_rows():
    # two samples per row, positions restarting at each, -100 on each sample's first token, no attention mask
    inputs = batch(rows=2, length=16)
    del inputs["attention_mask"]
    inputs["position_ids"] = torch.tensor([[*range(9), *range(7)], [*range(5), *range(11)]])
    inputs["labels"][0, 9] = inputs["labels"][1, 5] = -100
    assert_fused_matches_plain(tiny(), inputs)


def test_num_items_in_batch_normalisation():
    # a micro-batch of an accumulated batch: summed, divided by the trained tokens of the whole batch
    inputs = batch()
    assert_fused_matches_plain(tiny(), inputs, num_items_in_batch=torch.tensor(123))


def test_bf16_within_bf16_tolerance():
    model = get_peft_model(tiny(dtype=torch.bfloat16), LoraConfig(r=4, target_modules="all-linear"))
    assert_fused_matches_plain(model, batch(), rtol=2e-2)


def test_real_vocabulary_output_layer():
    # Qwen's vocabulary: chunks of a few hundred positions, each chunk's gradient equal to the whole one's
    vocab, hidden = 151_936, 16
    assert chunk_positions(vocab) == 220
    generator = torch.Generator().manual_seed(0)
    states = torch.randn(600, hidden, generator=generator, requires_grad=True)
    weight = (torch.randn(vocab, hidden, generator=generator) * 0.1).requires_grad_()
    targets = torch.randint(0, vocab, (600,), generator=generator)

    def head(h):
        return torch.nn.functional.linear(h, weight)

    fused = FusedLinearCrossEntropy.apply(states, targets, head, chunk_positions(vocab), weight) / 600
    fused.backward()
    fused_grads = states.grad.clone(), weight.grad.clone()
    states.grad = weight.grad = None
    plain = torch.nn.functional.cross_entropy(head(states), targets)
    plain.backward()
    torch.testing.assert_close(fused, plain, rtol=1e-5, atol=0)
    torch.testing.assert_close(fused_grads[0], states.grad, rtol=1e-5, atol=1e-9)
    torch.testing.assert_close(fused_grads[1], weight.grad, rtol=1e-5, atol=1e-9)


def test_evaluation_without_gradients():
    model = tiny()
    with torch.no_grad():
        fused = causal_lm_loss(model, batch(), fused_loss_for(model))
        plain = causal_lm_loss(model, batch(), None)
    torch.testing.assert_close(fused, plain, rtol=1e-5, atol=0)


def trainer(model, tmp_path, **arguments) -> FinetuneTrainer:
    args = TrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True, **arguments)
    return FinetuneTrainer(model=model, args=args)


def test_trainer_loss_and_loss_only_evaluation(tmp_path):
    model = get_peft_model(tiny(), LoraConfig(r=4, target_modules="all-linear"))
    fused_trainer = trainer(model, tmp_path, average_tokens_across_devices=False)
    assert fused_trainer.fused_loss is not None
    inputs = batch()
    items = torch.tensor(40)
    plain = model(**inputs, num_items_in_batch=items)
    torch.testing.assert_close(
        fused_trainer.compute_loss(model, inputs, num_items_in_batch=items), plain.loss, rtol=1e-5, atol=0
    )
    # evaluation keeping only the loss: no [tokens x vocabulary] logits are built
    loss, logits, _ = fused_trainer.prediction_step(model, inputs, prediction_loss_only=True)
    torch.testing.assert_close(loss, model(**inputs).loss.detach(), rtol=1e-5, atol=0)
    assert logits is None
    # evaluation that needs the logits: the plain path, whole logits
    _, logits, _ = fused_trainer.prediction_step(model, inputs, prediction_loss_only=False)
    assert logits.shape == (*inputs["input_ids"].shape, VOCAB)


def test_fallback_logs_its_reason_once(tmp_path, caplog):
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=16, n_layer=1, n_head=2, n_positions=64))
    with caplog.at_level(logging.INFO, logger="sft.loss"):
        unknown = trainer(model, tmp_path / "gpt2")
        unknown.compute_loss(model, batch())
        unknown.compute_loss(model, batch())
    assert unknown.fused_loss is None
    lines = [record.getMessage() for record in caplog.records if record.name == "sft.loss"]
    assert lines == ["Loss: plain, not fused: model type 'gpt2' is not one whose logits the fused loss knows how to "
                     "reproduce"]  # fmt: skip

    caplog.clear()
    with caplog.at_level(logging.INFO):
        assert trainer(tiny(), tmp_path / "smoothing", label_smoothing_factor=0.1).fused_loss is None
        assert fused_loss_for(tiny(), zero3=False, fsdp=True) is None
        assert fused_loss_for(tiny(), liger=True) is None
        assert fused_loss_for(tiny(), enabled=False) is None
        assert fused_loss_for(tiny(output_router_logits=True)) is None
    reasons = [record.getMessage() for record in caplog.records if record.getMessage().startswith("Loss: plain")]
    assert len(reasons) == 5
    assert "label_smoothing" in reasons[0] and "FSDP" in reasons[1] and "liger" in reasons[2]
    assert "--fused_loss false" in reasons[3] and "router" in reasons[4]


def test_zero3_serves_only_a_frozen_plain_output_layer():
    full = tiny()
    assert fused_loss_for(full, zero3=True) is None  # its trained lm_head would need gathered gradients
    lora = get_peft_model(tiny(), LoraConfig(r=4, target_modules="all-linear"))
    assert fused_loss_for(lora, zero3=True) is not None


def test_finetune_trains_the_same_with_and_without(tiny_model, tmp_path, run_finetune, common_args):
    fused = run_finetune(*common_args(tiny_model, tmp_path / "fused", steps=3), "--use_lora")
    plain = run_finetune(*common_args(tiny_model, tmp_path / "plain", steps=3), "--use_lora", "--fused_loss", "false")
    assert fused.fused_loss is not None and plain.fused_loss is None

    def losses(trainer):
        return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]

    assert losses(fused) == pytest.approx(losses(plain), rel=1e-5)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_two_processes_give_the_losses_of_one(tiny_model, tmp_path, run_finetune, common_args):
    # 2 processes x 2 samples (gloo, DDP) follow 1 process x 4 samples: num_items_in_batch counts both processes
    flags = [*common_args(tiny_model, tmp_path / "one", steps=3), "--use_lora", "--use_cpu"]
    one = run_finetune(*flags)
    output = tmp_path / "two"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
        "finetune.py", *common_args(tiny_model, output, steps=3), "--use_lora", "--use_cpu",
        "--per_device_train_batch_size", "2", "--ddp_backend", "gloo",
    ]  # fmt: skip
    run = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600, env={**os.environ})
    assert run.returncode == 0, run.stderr[-4000:]
    assert "Loss: fused" in run.stderr
    state = json.loads((output / "trainer_state.json").read_text())
    two = [entry["loss"] for entry in state["log_history"] if "loss" in entry]
    assert two == pytest.approx([entry["loss"] for entry in one.state.log_history if "loss" in entry], rel=1e-4)


def test_qwen2_model_is_known():
    assert fused_loss_for(Qwen2ForCausalLM(Qwen2Config(**SMALL))) is not None
