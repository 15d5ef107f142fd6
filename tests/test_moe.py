"""LoRA and Q-LoRA on mixture-of-experts models with fused experts (sft.moe): default flags train the experts,
adapters merge and reload the same, --lora_target attention, the router's auxiliary loss, Q-LoRA's split."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from peft.tuners.lora import LoraLayer, ParamWrapper
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

import merge_lora
from sft.args import check_arguments
from sft.data import load_conversations
from sft.errors import ConfigurationError, run_main
from sft.evaluation import max_abs_diff, sample_logits, tokenize_samples
from sft.modeling import add_lora, load_lora, load_model, quantization_config
from sft.moe import find_moe, keep_router_aux_loss

EXAMPLES = "data/example_chatml.jsonl"
SMALL = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, head_dim=8)
# Tiny versions of the families, from transformers' own config classes; experts of 8 (not 32) rows so that a
# swapped in/out dimension cannot pass unnoticed.
FAMILIES = {
    "qwen3_moe": dict(num_key_value_heads=2, moe_intermediate_size=8, num_experts=4, num_experts_per_tok=2),
    "deepseek_v3": dict(
        num_key_value_heads=4,
        moe_intermediate_size=8,
        n_routed_experts=4,
        num_experts_per_tok=2,
        n_shared_experts=1,
        first_k_dense_replace=1,
        kv_lora_rank=16,
        q_lora_rank=16,
        qk_rope_head_dim=8,
        qk_nope_head_dim=8,
        v_head_dim=8,
        n_group=1,
        topk_group=1,
    ),  # fmt: skip
    # Llama 4's router is an nn.Linear whose forward returns a tuple: adapted as a linear module, it crashes.
    "llama4_text": dict(num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=1, intermediate_size_mlp=64),
}


def build_moe(folder: Path, family: str, tokenizer_source: str) -> str:
    """A tiny random `family` model with the test tokenizer, saved in `folder`."""
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_source)
    config = AutoConfig.for_model(family, vocab_size=len(tokenizer), **SMALL, **FAMILIES[family])
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def moe_models(tiny_model: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    folder = tmp_path_factory.mktemp("moe")
    return {family: build_moe(folder / family, family, tiny_model) for family in FAMILIES}


@pytest.fixture(scope="module")
def moe_adapters(moe_models, tmp_path_factory, run_finetune, common_args) -> dict[str, tuple[str, object]]:
    """Each family LoRA-trained a few steps with the default LoRA flags (dropout 0.05, all-linear)."""
    trained = {}
    for family, model in moe_models.items():
        output = tmp_path_factory.mktemp("moe-adapters") / family
        trainer = run_finetune(*common_args(model, output, steps=3), "--use_lora", "--lora_dropout", "0.05")
        trained[family] = (str(output), trainer)
    return trained


def lora_layers(model: torch.nn.Module) -> dict[str, LoraLayer]:
    return {name: module for name, module in model.named_modules() if isinstance(module, LoraLayer)}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_default_flags_train_the_experts_with_dropout_only_on_linear_modules(moe_adapters, moe_models, family):
    _, trainer = moe_adapters[family]
    layers = lora_layers(trainer.model)
    experts = {name: layer for name, layer in layers.items() if isinstance(layer, ParamWrapper)}
    wrapped = {layer.parameter_name for name, layer in experts.items() if ".experts" in name}
    assert {"gate_up_proj", "down_proj"} <= wrapped
    for layer in experts.values():  # B starts at zero: trained means it received gradients
        assert layer.lora_B["default"].weight.abs().max() > 0
        assert isinstance(layer.lora_dropout["default"], torch.nn.Identity)
    linear = [layer for layer in layers.values() if not isinstance(layer, ParamWrapper)]
    assert linear and all(layer.lora_dropout["default"].p == 0.05 for layer in linear)
    base = AutoModelForCausalLM.from_pretrained(moe_models[family])
    routers = {name.rsplit(".", 1)[-1] for name in find_moe(base).routers}
    assert routers  # (mlp.gate, feed_forward.router)
    assert not any(part in routers for name in layers for part in name.split("."))  # the router is not adapted


def test_shared_experts_and_dense_layers_are_adapted(moe_adapters):
    _, trainer = moe_adapters["deepseek_v3"]
    names = set(lora_layers(trainer.model))
    assert any("mlp.shared_experts.gate_proj" in name for name in names)
    assert any("layers.0.mlp.down_proj" in name for name in names)  # the dense first layer


def test_the_log_says_what_is_adapted(moe_models, caplog):
    model = AutoModelForCausalLM.from_pretrained(moe_models["deepseek_v3"], dtype=torch.float32)
    with caplog.at_level(logging.INFO, logger="sft.moe"):
        model = add_lora(model, r=4, alpha=8, dropout=0.05, target_modules="all-linear")
    expert_lora = sum(p.numel() for name, p in model.named_parameters() if "mlp.experts" in name and "lora_" in name)
    assert f"one rank-4 LoRA per expert: {expert_lora:,} parameters" in caplog.text
    assert "experts adapted (mlp.experts.down_proj, mlp.experts.gate_up_proj" in caplog.text
    assert "router not adapted (mlp.gate" in caplog.text
    assert "shared experts (mlp.shared_experts) adapted" in caplog.text
    assert "LoRA dropout: 0.05 on the 10 linear modules, none on the" in caplog.text


def test_continued_adapter_trains_the_experts_again(moe_adapters, moe_models):
    adapter, _ = moe_adapters["qwen3_moe"]
    model = load_lora(AutoModelForCausalLM.from_pretrained(moe_models["qwen3_moe"], dtype=torch.float32), adapter)
    experts = [layer for name, layer in lora_layers(model).items() if isinstance(layer, ParamWrapper)]
    assert experts and all(layer.lora_B["default"].weight.requires_grad for layer in experts)
    assert all(layer.lora_B["default"].weight.abs().max() > 0 for layer in experts)  # the saved weights


def test_router_aux_loss_is_in_the_models_training_loss(moe_models):
    model = AutoModelForCausalLM.from_pretrained(moe_models["qwen3_moe"], dtype=torch.float32)
    ids = torch.arange(3, 19).reshape(2, 8)
    plain = model(input_ids=ids, labels=ids).loss
    keep_router_aux_loss(model)
    outputs = model(input_ids=ids, labels=ids)
    assert outputs.aux_loss is not None and outputs.aux_loss > 0
    coefficient = model.config.router_aux_loss_coef
    assert torch.allclose(outputs.loss, plain + coefficient * outputs.aux_loss)


def test_no_router_logits_asked_of_a_model_without_aux_loss(moe_models, caplog):
    model = AutoModelForCausalLM.from_pretrained(moe_models["deepseek_v3"], dtype=torch.float32)
    with caplog.at_level(logging.INFO, logger="sft.moe"):
        keep_router_aux_loss(model)
    assert not model.config.output_router_logits
    assert "deepseek_v3 declares no router auxiliary loss" in caplog.text


def test_trained_model_kept_the_router_aux_loss_on(moe_adapters):
    _, trainer = moe_adapters["qwen3_moe"]
    assert trainer.model.config.output_router_logits is True


@pytest.mark.parametrize("family", list(FAMILIES))
def test_merged_adapter_reloads_to_the_same_logits(moe_adapters, moe_models, tokenizer, tmp_path, monkeypatch, family):
    adapter, _ = moe_adapters[family]
    output = tmp_path / "merged"
    monkeypatch.setattr(
        sys, "argv", ["merge_lora.py", "--adapter", adapter, "--output", str(output), "--dtype", "fp32"]
    )
    run_main(merge_lora.main)

    samples = tokenize_samples(tokenizer, load_conversations(EXAMPLES)[:4], 256, train_on="all")
    base = AutoModelForCausalLM.from_pretrained(moe_models[family], dtype=torch.float32)
    base_logits = sample_logits(base, samples)
    expected = sample_logits(PeftModel.from_pretrained(base, adapter), samples)
    got = sample_logits(AutoModelForCausalLM.from_pretrained(output, dtype=torch.float32), samples)
    assert max_abs_diff(expected, got) <= 1e-4
    assert max_abs_diff(base_logits, got) > 1e-3  # the adapter changed the model


def test_attention_only_adapts_no_expert(moe_models, caplog):
    model = AutoModelForCausalLM.from_pretrained(moe_models["deepseek_v3"], dtype=torch.float32)
    with caplog.at_level(logging.INFO, logger="sft.moe"):
        model = add_lora(model, r=4, alpha=8, dropout=0.05, target_modules="all-linear", scope="attention")
    layers = lora_layers(model)
    assert layers and all(".self_attn." in name for name in layers)
    assert not any(isinstance(layer, ParamWrapper) for layer in layers.values())
    assert "experts, router and shared experts not adapted" in caplog.text


def test_attention_only_refuses_module_names(common_args, tiny_model, tmp_path):
    from conftest import finetune_arguments

    _, _, training, lora = finetune_arguments(
        *common_args(tiny_model, tmp_path),
        "--use_lora",
        "--lora_target",
        "attention",
        "--lora_target_modules",
        "q_proj",
    )
    with pytest.raises(ConfigurationError, match="--lora_target attention chooses the modules itself"):
        check_arguments(training, lora)


def test_qlora_quantises_linear_layers_and_keeps_experts_in_the_compute_dtype(moe_models, caplog):
    path = moe_models["qwen3_moe"]
    model = load_model(path, torch.bfloat16, quantization_config(4, torch.bfloat16), device_map={"": "cpu"})
    with caplog.at_level(logging.INFO, logger="sft.moe"):
        model = add_lora(model, r=4, alpha=8, dropout=0.05, target_modules="all-linear", quantized=True)
    base = model.get_base_model()
    layout = find_moe(base)
    assert layout.expert_parameters
    for name in layout.expert_parameters:
        parameter = base.get_parameter(name)
        assert parameter.dtype == torch.bfloat16 and type(parameter).__name__ != "Params4bit"
    attention = [module for name, module in base.named_modules() if name.endswith("self_attn.q_proj.base_layer")]
    assert attention and all(type(module).__name__ == "Linear4bit" for module in attention)
    assert "8 linear modules quantised" in caplog.text
    assert "4 fused expert tensors" in caplog.text and "in bfloat16" in caplog.text


@pytest.mark.parametrize(
    ("variant", "flag"),
    [({"use_dora": True}, "--use_dora"), ({"init_lora_weights": "pissa"}, "--init_lora_weights pissa")],
)
def test_variants_peft_cannot_apply_to_the_experts_are_refused(moe_models, variant, flag):
    model = AutoModelForCausalLM.from_pretrained(moe_models["qwen3_moe"], dtype=torch.float32)
    with pytest.raises(ConfigurationError, match=f"{flag}: peft's LoRA of the fused expert parameters"):
        add_lora(model, r=4, alpha=8, dropout=0.05, target_modules="all-linear", **variant)


def family_folder(tmp_path_factory: pytest.TempPathFactory, name: str) -> str:
    """The tiny model of the README table's family `name`, saved in a folder."""
    from scripts.tiny_families import BY_NAME, build_family_model

    return str(build_family_model(name, tmp_path_factory.mktemp(BY_NAME[name].model_type)))


@pytest.fixture(scope="module")
def falcon_h1(tmp_path_factory: pytest.TempPathFactory) -> str:
    return family_folder(tmp_path_factory, "Falcon-H1 (hybrid)")


def test_default_targets_leave_out_what_peft_cannot_adapt_on_mamba_layers(falcon_h1, caplog):
    model = AutoModelForCausalLM.from_pretrained(falcon_h1, dtype=torch.float32)
    with caplog.at_level(logging.INFO, logger="sft.moe"):
        model = add_lora(model, r=4, alpha=8, dropout=0.05, target_modules=["all-linear"])
    adapted = {name.rsplit(".", 1)[-1] for name in lora_layers(model)}
    assert {"in_proj", "q_proj", "o_proj", "gate_proj", "down_proj"} <= adapted
    assert not adapted & {"out_proj", "conv1d", "lm_head"}
    assert "LoRA targets: every linear layer but out_proj (peft cannot adapt out_proj on a falcon_h1" in caplog.text
    batch = torch.tensor([[1, 2, 3, 4, 5]])
    model(input_ids=batch, labels=batch).loss.backward()  # trains


def test_naming_modules_peft_cannot_adapt_on_mamba_layers_is_refused(falcon_h1):
    model = AutoModelForCausalLM.from_pretrained(falcon_h1, dtype=torch.float32)
    with pytest.raises(
        ConfigurationError, match=r"^--lora_target_modules in_proj out_proj: peft cannot adapt out_proj"
    ):
        add_lora(model, r=4, alpha=8, dropout=0.05, target_modules=["in_proj", "out_proj"])


@pytest.fixture(scope="module")
def jamba(tmp_path_factory: pytest.TempPathFactory) -> str:
    return family_folder(tmp_path_factory, "Jamba (hybrid MoE)")


def test_default_targets_leave_out_linear_layers_whose_weight_the_model_reads_itself(jamba, caplog):
    # Jamba's Mamba mixer multiplies by dt_proj.weight without calling dt_proj: an adapter there would never run.
    model = AutoModelForCausalLM.from_pretrained(jamba, dtype=torch.float32)
    with caplog.at_level(logging.INFO, logger="sft.moe"):
        model = add_lora(model, r=4, alpha=8, dropout=0.0, target_modules=["all-linear"])
    adapted = {name.rsplit(".", 1)[-1] for name in lora_layers(model)}
    assert {"in_proj", "x_proj", "out_proj", "q_proj"} <= adapted and "dt_proj" not in adapted
    assert "reads the weights of dt_proj itself, bypassing an adapter" in caplog.text
    batch = torch.tensor([[1, 2, 3, 4, 5]])
    model(input_ids=batch, labels=batch).loss.backward()
    untrained = [name for name, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not untrained  # every adapter runs (lora_B starts at 0, so lora_A's gradient is 0 but present)
    with pytest.raises(ConfigurationError, match=r"^--lora_target_modules in_proj dt_proj: the model's forward reads"):
        add_lora(AutoModelForCausalLM.from_pretrained(jamba), r=4, alpha=8, dropout=0.0,
                 target_modules=["in_proj", "dt_proj"])  # fmt: skip
