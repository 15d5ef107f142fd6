"""sft/loss.py: the fused output layer + cross-entropy gives the plain path's loss and gradients, and says when it
steps aside."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from host_reads import HostReads
from peft import LoraConfig, get_peft_model
from ports import free_port
from transformers import (
    CONFIG_MAPPING,
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    CohereConfig,
    Gemma2Config,
    GPT2Config,
    GPT2LMHeadModel,
    Qwen2Config,
    Qwen2ForCausalLM,
    TrainingArguments,
)

from sft.loss import (
    CHECK_LOGITS,
    CHUNK_LOGITS,
    FusedLinearCrossEntropy,
    causal_lm_loss,
    check_batch,
    chunk_positions,
    chunk_starts,
    fused_loss_for,
    loss_tolerance,
)
from sft.modeling import load_model
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
    fused = fused_loss_for(model, batch=inputs)  # decided by the check against the model's own loss
    assert fused is not None
    fused.chunk = chunk  # several chunks, the last one partial
    extra = {} if num_items_in_batch is None else {"num_items_in_batch": num_items_in_batch}
    plain_loss, plain_grads = loss_and_grads(model, lambda: model(**inputs, **extra).loss)
    fused_loss, fused_grads = loss_and_grads(model, lambda: fused(model, inputs, num_items_in_batch)[0])
    torch.testing.assert_close(fused_loss, plain_loss, rtol=rtol, atol=0)
    assert fused_grads.keys() == plain_grads.keys() and plain_grads
    largest = max(float(plain.abs().max()) for plain in plain_grads.values())
    for name, plain in plain_grads.items():
        # relative to the tensor's largest entry: tiny entries carry only rounding; and at least 1e-3 of the
        # model's largest gradient: a gradient 10^5 times smaller than the rest (a linear-attention layer's dt_bias)
        # is the sum of cancelling terms, whose rounding it keeps
        scale = plain.abs().max().clamp_min(1e-3 * largest)
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
    # Qwen's vocabulary: chunks of about a hundred positions, each chunk's gradient equal to the whole one's
    vocab, hidden = 151_936, 16
    assert chunk_positions(vocab) == CHUNK_LOGITS // vocab and 64 <= chunk_positions(vocab) < 600
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


class AddedLogitsQwen2(Qwen2ForCausalLM):
    """A model whose logits are not its output layer's alone: a learned bias per vocabulary entry is added."""

    def __init__(self, config):
        super().__init__(config)
        self.logit_bias = torch.nn.Parameter(torch.linspace(-2.0, 2.0, config.vocab_size))

    def forward(self, input_ids=None, labels=None, logits_to_keep=0, **kwargs):
        outputs = super().forward(input_ids=input_ids, logits_to_keep=logits_to_keep, **kwargs)
        outputs.logits = outputs.logits + self.logit_bias
        if labels is not None:
            outputs.loss = self.loss_function(outputs.logits, labels, self.config.vocab_size)
        return outputs


def test_fallback_logs_its_reason_once(tmp_path, caplog):
    torch.manual_seed(0)
    model = AddedLogitsQwen2(Qwen2Config(**SMALL)).eval()
    with caplog.at_level(logging.INFO, logger="sft.loss"):
        unknown = trainer(model, tmp_path / "added")
        first = unknown.compute_loss(model, batch())
        second = unknown.compute_loss(model, batch())
    assert unknown.fused_loss is None
    torch.testing.assert_close(first, model(**batch()).loss, rtol=1e-6, atol=0)  # the plain loss, first batch too
    torch.testing.assert_close(second, first)
    lines = [record.getMessage() for record in caplog.records if record.name == "sft.loss"]
    assert len(lines) == 1 and lines[0].startswith("Loss: plain, not fused: its logits are not the output layer's")
    assert "the model's own loss on the first batch is" in lines[0] and "tolerance" in lines[0]

    caplog.clear()
    with caplog.at_level(logging.INFO):
        assert trainer(tiny(), tmp_path / "smoothing", label_smoothing_factor=0.1).fused_loss is None
        assert fused_loss_for(tiny(), zero3=False, fsdp=True) is None
        assert fused_loss_for(tiny(), liger=True) is None
        assert fused_loss_for(tiny(), enabled=False) is None
    reasons = [record.getMessage() for record in caplog.records if record.getMessage().startswith("Loss: plain")]
    assert len(reasons) == 4
    assert "label_smoothing" in reasons[0] and "FSDP" in reasons[1] and "liger" in reasons[2]
    assert "--fused_loss false" in reasons[3]


def test_trainer_checks_on_the_first_batch_and_logs_the_tolerance(tmp_path, caplog):
    model = tiny()
    with caplog.at_level(logging.INFO, logger="sft.loss"):
        checked = trainer(model, tmp_path)
        assert checked.fused_loss is not None and not caplog.records  # nothing decided before a batch
        checked.compute_loss(model, batch())
        checked.compute_loss(model, batch(seed=2))
    assert checked.fused_loss is not None
    lines = [record.getMessage() for record in caplog.records]
    assert len(lines) == 1 and lines[0].startswith("Loss: fused output layer and cross-entropy")
    assert "1.0e-05 x max(1, |loss|) (float32)" in lines[0] and "positions per chunk" in lines[0]


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


def test_gpt2_is_served_too():
    # nothing about a model type: GPT-2's logits are its output layer's, so the check finds the fused loss exact
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=16, n_layer=1, n_head=2, n_positions=64)).eval()
    assert_fused_matches_plain(model, batch())


# Tiny random models of the families transformers ships, from their own config classes (nothing downloaded), with
# the logit transform each config declares set to a value that really bends the logits, and router losses on.
MOE = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16)
LINEAR_ATTENTION = dict(
    linear_num_value_heads=4, linear_num_key_heads=2, linear_key_head_dim=8, linear_value_head_dim=8,
    layer_types=["linear_attention", "full_attention"],
)  # fmt: skip
ROUTED = dict(
    n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=16, first_k_dense_replace=1, n_group=1,
    topk_group=1,
)  # fmt: skip
FAMILIES = {  # model type: (config overrides, the transform the check must find)
    "qwen2": ({}, ("none", None)),
    "qwen3": ({}, ("none", None)),
    "llama": ({}, ("none", None)),
    "mistral": ({}, ("none", None)),
    "phi3": ({"pad_token_id": 0}, ("none", None)),
    "olmo3": ({}, ("none", None)),
    "smollm3": ({"pad_token_id": 0}, ("none", None)),
    "glm4": ({"pad_token_id": 0}, ("none", None)),
    "lfm2": ({"layer_types": ["conv", "full_attention"], "block_ff_dim": 64}, ("none", None)),
    "qwen3_moe": ({**MOE, "output_router_logits": True, "router_aux_loss_coef": 0.5}, ("none", None)),
    "qwen3_next": (
        {**MOE, **LINEAR_ATTENTION, "shared_expert_intermediate_size": 16, "output_router_logits": True},
        ("none", None),
    ),
    "qwen3_5_text": (LINEAR_ATTENTION, ("none", None)),
    "qwen3_5_moe_text": (
        {**MOE, **LINEAR_ATTENTION, "shared_expert_intermediate_size": 16, "output_router_logits": True},
        ("none", None),
    ),
    "gpt_oss": (
        dict(
            num_local_experts=4,
            num_experts_per_tok=2,
            output_router_logits=True,
            sliding_window=8,
            layer_types=["sliding_attention", "full_attention"],
            router_aux_loss_coef=0.5,
        ),
        ("none", None),
    ),  # fmt: skip
    "deepseek_v3": (
        dict(
            ROUTED,
            kv_lora_rank=8,
            q_lora_rank=8,
            qk_rope_head_dim=4,
            qk_nope_head_dim=4,
            v_head_dim=8,
            head_dim=4,
            num_key_value_heads=4,
        ),
        ("none", None),
    ),  # fmt: skip
    "glm4_moe": (ROUTED, ("none", None)),
    # Llama 4's CausalLM hands back itself from get_decoder(): its decoder is found as `model` (sft.loss.decoder_of).
    "llama4_text": (
        dict(num_local_experts=2, intermediate_size_mlp=64, head_dim=8, attention_chunk_size=8),
        ("none", None),
    ),
    "mixtral": (dict(num_local_experts=4, num_experts_per_tok=2, output_router_logits=True), ("none", None)),
    "gemma2": ({"final_logit_softcapping": 0.5, "sliding_window": 8}, ("softcap", 0.5)),
    "gemma3_text": ({"final_logit_softcapping": 0.5, "sliding_window": 8}, ("softcap", 0.5)),
    "gemma4_text": (
        dict(
            final_logit_softcapping=0.5,
            sliding_window=8,
            layer_types=["sliding_attention", "full_attention"],
            vocab_size_per_layer_input=VOCAB,
            hidden_size_per_layer_input=8,
        ),  # fmt: skip
        ("softcap", 0.5),
    ),
    "cohere": ({"logit_scale": 0.25}, ("scale", 0.25)),
    "cohere2": (
        dict(logit_scale=0.25, sliding_window=8, layer_types=["sliding_attention", "full_attention"]),
        ("scale", 0.25),
    ),
    "granite": ({"logits_scaling": 4.0}, ("divide", 4.0)),  # Granite divides by logits_scaling
    "granitemoe": (
        dict(logits_scaling=4.0, num_local_experts=4, num_experts_per_tok=2, output_router_logits=True),
        ("divide", 4.0),
    ),
    "granitemoehybrid": (
        dict(
            logits_scaling=4.0,
            layer_types=["mamba", "attention"],
            mamba_n_heads=8,
            mamba_d_head=8,
            mamba_d_state=8,
            mamba_n_groups=1,
            mamba_chunk_size=8,
            num_local_experts=0,
        ),
        ("divide", 4.0),
    ),  # fmt: skip
    "hyperclovax": ({"logits_scaling": 4.0}, ("scale", 4.0)),  # HyperCLOVA X multiplies by it
}


def family_model(model_type: str):
    if model_type not in CONFIG_MAPPING:
        pytest.skip(f"transformers {model_type!r} not installed")
    torch.manual_seed(0)
    config = AutoConfig.for_model(model_type, **{**SMALL, **FAMILIES[model_type][0]})
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


@pytest.mark.parametrize("model_type", FAMILIES)
def test_families_fused_equal_to_their_own_loss(model_type, caplog):
    model = family_model(model_type)
    with caplog.at_level(logging.INFO, logger="sft.loss"):
        fused = assert_fused_matches_plain(model, batch())
    assert (fused.transform, fused.factor) == FAMILIES[model_type][1]
    # transformers propagates its own warnings (tiny configs' token ids) to caplog where CI=true: only ours counted
    assert [r.getMessage()[:24] for r in caplog.records if r.name == "sft.loss"] == ["Loss: fused output layer"]
    router_coef = getattr(model.config, "router_aux_loss_coef", None)
    if getattr(model.config, "output_router_logits", False):
        assert fused.aux_loss_coef == router_coef  # its own loss adds coef x aux_loss: so does the fused one


def test_router_auxiliary_loss_is_added():
    model = family_model("qwen3_moe")
    inputs = batch()
    fused = fused_loss_for(model, batch=inputs)
    with torch.no_grad():
        loss, outputs = fused(model, inputs)
        without = fused(model, {**inputs, "output_router_logits": False})[0]
    assert outputs.aux_loss is not None and float(outputs.aux_loss) > 0
    torch.testing.assert_close(loss, without + 0.5 * outputs.aux_loss, rtol=1e-6, atol=0)


def tiny_multimodal(model_type: str, path: Path) -> Path:
    """A tiny random multimodal checkpoint folder (as Qwen3.5 and Gemma 3 are published), saved as they are."""
    text = {k: v for k, v in SMALL.items()}
    if model_type == "qwen3_5":
        vision = dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=32)
        config = AutoConfig.for_model(model_type, text_config={**text, **LINEAR_ATTENTION}, vision_config=vision)
    else:
        vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                      image_size=28, patch_size=14)  # fmt: skip
        text |= {"model_type": "gemma3_text", "final_logit_softcapping": 0.5}
        config = AutoConfig.for_model(model_type, text_config=text, vision_config=vision, mm_tokens_per_image=4)
    torch.manual_seed(0)
    AutoModelForImageTextToText.from_config(config).save_pretrained(path)
    return path


@pytest.mark.parametrize("model_type", ["qwen3_5", "gemma3"])
def test_multimodal_folder_trains_on_text_through_its_language_model(model_type, tmp_path, caplog):
    folder = tiny_multimodal(model_type, tmp_path / model_type)
    with caplog.at_level(logging.INFO, logger="sft.modeling"):
        model = load_model(str(folder)).eval()  # finetune.py's load path
    # transformers loads Qwen3.5's text model alone, Gemma 3's whole: the log says so where it matters
    text_only = [r.getMessage() for r in caplog.records if "its language model alone" in r.getMessage()]
    assert len(text_only) == (model_type == "qwen3_5")
    fused = assert_fused_matches_plain(model, batch())
    assert fused.decoder is model.get_decoder() and fused.head is model.get_output_embeddings()
    # Gemma 3's multimodal forward does not soft-cap, though its text config declares a cap: the check finds so
    assert fused.transform == "none"


def test_chunks_have_one_shape_whatever_the_data():
    hidden_size, chunk = 4, 8
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(VOCAB, hidden_size, generator=generator, requires_grad=True)
    shapes = set()

    def head(h):
        shapes.add(tuple(h.shape))
        return torch.nn.functional.linear(h, weight)

    for positions in (3, 8, 13, 16, 29):
        states = torch.randn(positions, hidden_size, generator=generator, requires_grad=True)
        targets = torch.randint(0, VOCAB, (positions,), generator=generator)
        targets[torch.rand(positions, generator=generator) < 0.5] = -100
        fused = FusedLinearCrossEntropy.apply(states, targets, head, chunk, weight)
        fused.backward()
        fused_grads = states.grad.clone(), weight.grad.clone()
        states.grad = weight.grad = None
        plain = torch.nn.functional.cross_entropy(head(states), targets, reduction="sum")
        plain.backward()
        torch.testing.assert_close(fused, plain, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(fused_grads[0], states.grad, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(fused_grads[1], weight.grad, rtol=1e-6, atol=1e-7)
        weight.grad = None
        shapes.discard((positions, hidden_size))  # the plain path's own call
    assert shapes == {(chunk, hidden_size)}


def test_chunk_starts_cover_each_position_once():
    for positions in (8, 9, 24, 31):
        counted = []
        for start, skip in chunk_starts(positions, 8):
            counted += range(start + skip, start + 8)
        assert counted == list(range(positions))


def test_check_batch_is_cut_to_bounded_logits():
    vocab = CHECK_LOGITS // 128  # 128 positions' logits fit CHECK_LOGITS
    inputs = batch(rows=2, length=300)
    cut = check_batch(inputs, vocab)
    assert cut["input_ids"].shape == (1, CHECK_LOGITS // vocab) and cut["labels"].shape == cut["input_ids"].shape
    packed = {"input_ids": inputs["input_ids"][:1], "labels": inputs["labels"][:1],
              "position_ids": torch.cat([torch.arange(100), torch.arange(200)])[None],
              "cu_seq_lens_q": torch.tensor([0, 100, 300]), "max_length_q": 200}  # fmt: skip
    cut = check_batch(packed, vocab)
    assert cut["cu_seq_lens_q"].tolist() == [0, 100, 128] and cut["max_length_q"] == 100
    assert check_batch(inputs, VOCAB) is inputs  # small enough: whole


def test_tolerance_rule():
    cpu = torch.device("cpu")
    assert loss_tolerance(torch.float32, cpu, 2.0)[0] == pytest.approx(2e-5)
    assert loss_tolerance(torch.float32, cpu, 0.5)[0] == pytest.approx(1e-5)
    assert loss_tolerance(torch.bfloat16, cpu, 1.0)[0] == pytest.approx(2 * 2.0**-7)
    assert loss_tolerance(torch.float16, cpu, 1.0)[0] == pytest.approx(2 * 2.0**-10)


def test_the_accelerator_strategy_reads_nothing_on_the_host():
    # An accelerator's strategy (all positions, FusedLoss.compact False) never waits for the device: no item(),
    # bool(), tolist()... in sft/loss.py, forward or backward. The CPU's reads its trained-token count (free there).
    model = tiny()
    inputs = batch()
    fused = fused_loss_for(model, batch=inputs)
    reads = {}
    for compact in (False, True):
        fused.compact = compact
        with HostReads((str(REPO / "sft" / "loss.py"),)) as host_reads:
            fused(model, inputs)[0].backward()
        reads[compact] = sum(host_reads.by_caller.values())
    assert reads[False] == 0 and reads[True] > 0


@pytest.mark.parametrize("compact", [True, False])
def test_both_position_strategies_give_the_model_loss(compact):
    # compact: the CPU's (trained positions first, only their chunks); not: an accelerator's (all positions)
    model = tiny()
    inputs = batch()
    fused = fused_loss_for(model, batch=inputs)
    fused.compact, fused.chunk = compact, 8
    seen = []
    head = fused.head_fn

    def recording_head_fn():
        function, params = head()
        return (lambda h: seen.append(h.shape[0]) or function(h)), params

    fused.head_fn = recording_head_fn
    plain_loss, plain_grads = loss_and_grads(model, lambda: model(**inputs).loss)
    fused_loss, fused_grads = loss_and_grads(model, lambda: fused(model, inputs)[0])
    torch.testing.assert_close(fused_loss, plain_loss, rtol=1e-5, atol=0)
    for name, plain in plain_grads.items():
        torch.testing.assert_close(fused_grads[name], plain, rtol=1e-4, atol=1e-7, msg=name)
    assert set(seen) == {8}
    trained = int(inputs["labels"][:, 1:].ne(-100).sum())
    positions = inputs["input_ids"].numel()
    assert len(seen) == (-(-trained // 8) if compact else -(-positions // 8))
