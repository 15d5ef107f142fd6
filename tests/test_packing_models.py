"""Packing on hybrid linear-attention models and GPT-OSS: the same loss and gradients as unpacked, proven by the
leak probe, refused with the layer named where a layer still carries one sample into the next."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from sft.data import IGNORE_INDEX
from sft.packing import LeakProbe, PackedCollator, PackingError, check_no_leak, packing_collator, packing_layout
from sft.packing_models import (
    BOUNDARY_KEYS,
    build_masks_from_positions,
    linear_mixers,
    per_sample_class,
    restart_linear_mixers,
)

SMALL = dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=2, head_dim=8, initializer_range=0.2)  # fmt: skip
DELTANET = dict(layer_types=["linear_attention", "full_attention"] * 2, linear_num_value_heads=4,
                linear_num_key_heads=2, linear_key_head_dim=8, linear_value_head_dim=8)  # fmt: skip
MOE = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16, shared_expert_intermediate_size=16)
FAMILIES = {
    "qwen3_5_text": DELTANET,
    "qwen3_5_moe_text": DELTANET | MOE,
    "qwen3_next": DELTANET | MOE,
    "granitemoehybrid": dict(
        layer_types=["mamba", "attention"] * 2,
        mamba_n_heads=4,
        mamba_d_head=16,
        mamba_d_state=8,
        mamba_n_groups=1,
        num_local_experts=4,
        num_experts_per_tok=2,
        shared_intermediate_size=32,
    ),  # fmt: skip
    "lfm2": dict(layer_types=["conv", "full_attention"] * 2, block_ff_dim=48),
    # Jamba's decoder layer does not pass the boundaries to its Mamba mixer: they are handed over by hooks.
    "jamba": dict(
        attn_layer_period=2,
        attn_layer_offset=1,
        expert_layer_period=2,
        expert_layer_offset=1,
        num_experts=4,
        num_experts_per_tok=2,
        mamba_d_state=8,
        mamba_dt_rank=8,
        use_mamba_kernels=False,
    ),  # fmt: skip
    "gpt_oss": dict(
        num_local_experts=4,
        num_experts_per_tok=2,
        sliding_window=4,
        layer_types=["sliding_attention", "full_attention"] * 2,
    ),  # fmt: skip
}
HYBRIDS = [family for family in FAMILIES if family != "gpt_oss"]
# The layer type each hybrid's refusal names.
LAYER_TYPES = {"qwen3_5_text": "Qwen3_5GatedDeltaNet", "qwen3_5_moe_text": "Qwen3_5MoeGatedDeltaNet",
               "qwen3_next": "Qwen3NextGatedDeltaNet", "granitemoehybrid": "GraniteMoeHybridMambaLayer",
               "lfm2": "Lfm2ShortConv", "jamba": "JambaMambaMixer"}  # fmt: skip


def tiny(family: str):
    torch.manual_seed(0)
    config = AutoConfig.for_model(family, **SMALL, **FAMILIES[family])
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32).train()


def sample_ids(count: int = 5, seed: int = 0) -> list[list[int]]:
    """Samples of varied lengths, some shorter than the convolution window and the recurrence's 64-token chunk."""
    generator = torch.Generator().manual_seed(seed)
    lengths = [3, 11, 70, 6, 25][:count]
    return [torch.randint(0, SMALL["vocab_size"], (n,), generator=generator).tolist() for n in lengths]


def packed_row(samples: list[list[int]]) -> dict:
    """One packed row as sft.packing writes it: each sample's first label ignored, positions restarting."""
    labels = [[IGNORE_INDEX, *ids[1:]] for ids in samples]
    return {
        "input_ids": [t for ids in samples for t in ids],
        "labels": [t for row in labels for t in row],
        "position_ids": [p for ids in samples for p in range(len(ids))],
    }


def summed_loss(model, batch: dict) -> torch.Tensor:
    batch = dict(batch)
    labels = batch.pop("labels")
    logits = model(**batch, use_cache=False).logits.float()
    return torch.nn.functional.cross_entropy(
        logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
    )


def loss_and_gradients(model, batches: list[dict]) -> tuple[float, dict[str, torch.Tensor]]:
    model.zero_grad()
    total = sum(summed_loss(model, batch) for batch in batches)
    total.backward()
    gradients = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return total.item(), gradients


def unpacked_batches(samples: list[list[int]]) -> list[dict]:
    """Each sample alone, as unpacked training sees it (its first label is never predicted either)."""
    return [{"input_ids": torch.tensor([ids]), "labels": torch.tensor([ids])} for ids in samples]


@pytest.mark.parametrize("family", FAMILIES)
def test_packed_loss_and_gradients_equal_unpacked(family):
    model = tiny(family)
    samples = sample_ids()
    collator = packing_collator(model, pad_token_id=0, device_type="cpu")
    if family in HYBRIDS:
        assert collator.layout == "flat" and collator.seq_idx  # boundaries for one row, as the kernels take them
    batch = collator([packed_row(samples[:3]), packed_row(samples[3:])])
    packed_loss, packed_gradients = loss_and_gradients(model, [batch])
    unpacked_loss, unpacked_gradients = loss_and_gradients(model, unpacked_batches(samples))
    assert packed_loss == pytest.approx(unpacked_loss, rel=1e-5)
    assert packed_gradients.keys() == unpacked_gradients.keys()
    for name, gradient in unpacked_gradients.items():  # to 1e-5 of each parameter's largest gradient
        scale = gradient.abs().max().item()
        torch.testing.assert_close(packed_gradients[name], gradient, rtol=1e-4, atol=1e-5 * scale, msg=name)
    check_no_leak(model, collator.layout)


@pytest.mark.parametrize("family", ["qwen3_5_text", "qwen3_next", "granitemoehybrid"])
def test_without_the_per_sample_restart_the_packed_loss_differs(family):
    # The same packed row, the attention masked by positions, but no boundaries for the linear-attention layers:
    # they carry each sample's state into the next, and the loss is no longer the unpacked one.
    model = tiny(family)
    samples = sample_ids()
    build_masks_from_positions(model)
    batch = PackedCollator(0, "flat")([packed_row(samples)])
    batch = {key: value for key, value in batch.items() if key not in BOUNDARY_KEYS}
    unpacked_loss = sum(summed_loss(model, b) for b in unpacked_batches(samples)).item()
    assert summed_loss(model, batch).item() != pytest.approx(unpacked_loss, rel=1e-3)  # 1e-5 is equal


@pytest.mark.parametrize("family", HYBRIDS)
def test_a_hybrid_without_its_restart_is_refused_naming_the_layer(family):
    model = tiny(family)
    build_masks_from_positions(model)
    assert packing_layout(model) == "flat"
    with pytest.raises(PackingError, match=f"linear-attention layers carry .*{LAYER_TYPES[family]}"):
        check_no_leak(model, "flat")  # transformers' torch fallback refuses boundaries: nothing restarts
    # A layer that ignores the boundaries it is given (as a kernel without varlen support would) is caught too.
    for mixer in linear_mixers(model).values():
        forward = mixer.forward
        mixer.forward = lambda *args, _forward=forward, **kwargs: _forward(
            *args, **{k: v for k, v in kwargs.items() if k not in BOUNDARY_KEYS}
        )
    with pytest.raises(PackingError, match=f"{LAYER_TYPES[family]} \\(a sample's output changes"):
        check_no_leak(model, "flat")


def test_gpt_oss_attention_is_masked_by_positions_with_its_sinks():
    model = tiny("gpt_oss")
    assert model.config._attn_implementation == "eager"  # the attention that adds the sinks on the CPU
    with pytest.raises(PackingError, match="lets packed samples attend to each other"):
        check_no_leak(model, packing_layout(model))  # its forward builds masks without position_ids
    assert build_masks_from_positions(model) == ["GptOssModel"]
    check_no_leak(model, packing_layout(model))
    assert linear_mixers(model) == {}
    assert build_masks_from_positions(tiny("qwen3_5_text")) == []  # its forward passes position_ids itself


@pytest.mark.parametrize(
    ("family", "installed", "device_type", "mode"),
    [
        ("qwen3_5_text", {"fla", "causal_conv1d"}, "cuda", "kernels"),
        ("qwen3_5_text", {"causal_conv1d"}, "cuda", "segments"),  # no flash-linear-attention: torch fallback
        ("qwen3_5_text", {"fla", "causal_conv1d"}, "cpu", "segments"),
        ("granitemoehybrid", {"fla", "causal_conv1d"}, "cuda", "segments"),  # Mamba needs mamba-ssm
        ("granitemoehybrid", {"mamba_ssm", "causal_conv1d"}, "cuda", "kernels"),
        ("lfm2", {"causal_conv1d"}, "cuda", "kernels"),
    ],
)
def test_the_kernels_take_the_boundaries_where_they_run(family, installed, device_type, mode):
    model = tiny(family)
    assert restart_linear_mixers(model, device_type, installed=installed) == mode
    per_sample = [type(mixer).__base__ is not object and type(mixer) is per_sample_class(type(mixer).__base__)
                  for mixer in linear_mixers(model).values()]  # fmt: skip
    assert per_sample == [mode == "segments"] * len(per_sample) and len(per_sample) == 2
    # Either way the flat batch carries what the kernels read: cu_seq_lens_q (recurrence), seq_idx (convolution).
    batch = PackedCollator(0, "flat", seq_idx=True)([packed_row(sample_ids(3))])
    assert batch["cu_seq_lens_q"].tolist() == [0, 3, 14, 84]
    assert batch["seq_idx"].tolist() == [[0] * 3 + [1] * 11 + [2] * 70]
    assert batch["seq_idx"].dtype == batch["cu_seq_lens_q"].dtype == torch.int32


@pytest.mark.parametrize(
    ("family", "flags", "dtype"),
    [
        ("qwen3_5_text", ["--gradient_checkpointing"], torch.float32),  # the per-sample layers recomputed too
        ("granitemoehybrid", ["--use_lora", "true", "--bf16", "--use_cpu"], torch.bfloat16),  # peft-wrapped layers
    ],
)
def test_finetune_trains_a_hybrid_packed(family, flags, dtype, tiny_model, tmp_path, run_finetune, common_args):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    torch.manual_seed(0)
    sizes = SMALL | {"vocab_size": len(tokenizer), "initializer_range": 0.02}
    config = AutoConfig.for_model(family, **sizes, **FAMILIES[family], pad_token_id=tokenizer.pad_token_id)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    arguments = [*common_args(str(tmp_path / "model"), tmp_path / "out", steps=3), "--packing"]
    trainer = run_finetune(*arguments, "--per_device_train_batch_size", "2", *flags)
    batch = next(iter(trainer.get_train_dataloader()))
    assert batch["input_ids"].shape[0] == 1 and len(batch["cu_seq_lens_q"]) > 3  # one flat row of samples
    probes = [callback for callback in trainer.callback_handler.callbacks if isinstance(callback, LeakProbe)]
    assert probes[0].ran_with == ("cpu", dtype)
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 3 and all(np.isfinite(losses))
