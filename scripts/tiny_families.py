"""The model families we cover, each as a tiny random model built from transformers' own config classes.

One catalogue, shared by tests/test_architectures.py (which trains each family in each mode) and
scripts/family_table.py (which writes the README's table of families). Each family is a transformers model type
and the config keyword arguments that shrink it to a few layers of width 64; `build_family_model` saves that model,
randomly initialised, with a tiny ChatML tokenizer (scripts/make_tiny_model.py's) into a folder that finetune.py,
merge_lora.py and the demos load like any checkpoint. Nothing is downloaded.

    python -m scripts.tiny_families --output tiny-families   # one folder per family
"""

from __future__ import annotations

import argparse
import random
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    GenerationConfig,
    PreTrainedTokenizerFast,
)

# Sizes every family shares: 2 layers of width 64, 4 query heads of 16, 2 key/value heads.
COMMON: dict[str, Any] = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "max_position_embeddings": 512,
}
# Mixture of experts: 4 experts of width 32, 2 per token.
MOE: dict[str, Any] = {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32}
# Hybrids: one linear-attention layer, then one full-attention layer.
HYBRID_LAYERS = ["linear_attention", "full_attention"]
LINEAR_ATTENTION: dict[str, Any] = {
    "layer_types": HYBRID_LAYERS,
    "linear_num_key_heads": 2,
    "linear_num_value_heads": 4,
    "linear_key_head_dim": 16,
    "linear_value_head_dim": 16,
    "linear_conv_kernel_dim": 4,
}
SLIDING: dict[str, Any] = {"sliding_window": 8, "layer_types": ["sliding_attention", "full_attention"]}
GEMMA4: dict[str, Any] = {**SLIDING, "hidden_size_per_layer_input": 16, "global_head_dim": 16}
# Vision towers of one layer of width 32 on 32x32 images.
SIGLIP_VISION = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2}
SIGLIP_VISION |= {"image_size": 32, "patch_size": 16}
QWEN3_5_VISION = {"depth": 1, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2, "out_hidden_size": 64}
QWEN3_5_VISION |= {"num_position_embeddings": 16}


@dataclass(frozen=True)
class Family:
    """One family of the table: what people call it, and the transformers config that builds a tiny one."""

    name: str  # as the README's table names it
    model_type: str  # AutoConfig.for_model's model type
    config: dict[str, Any] = field(default_factory=dict)  # on top of COMMON (a composite config: its text config)
    examples: str = ""  # released checkpoints of the family, for the reader of the table
    # A vision-language folder (saved as its ...ForConditionalGeneration, as released), trained on text: `config`
    # is then its text config, `outer` the rest (a tiny vision tower).
    multimodal: bool = False
    outer: dict[str, Any] = field(default_factory=dict)

    def config_kwargs(self) -> dict[str, Any]:
        sizes = {**COMMON, **self.config}
        return {**self.outer, "text_config": sizes} if self.multimodal else sizes


FAMILIES: list[Family] = [
    Family("Qwen2 / Qwen2.5", "qwen2", examples="Qwen2.5-7B-Instruct"),
    Family("Qwen2-MoE", "qwen2_moe", {**MOE, "shared_expert_intermediate_size": 32}, "Qwen1.5-MoE-A2.7B"),
    Family("Qwen3", "qwen3", examples="Qwen3-8B"),
    Family("Qwen3-MoE", "qwen3_moe", MOE, "Qwen3-30B-A3B"),
    Family(
        "Qwen3-Next",
        "qwen3_next",
        {**MOE, **LINEAR_ATTENTION, "shared_expert_intermediate_size": 32},
        "Qwen3-Next-80B-A3B",
    ),
    Family("Qwen3.5 (text)", "qwen3_5_text", LINEAR_ATTENTION, "Qwen3.5 dense, text weights"),
    Family(
        "Qwen3.5 (multimodal folder)",
        "qwen3_5",
        LINEAR_ATTENTION,
        "Qwen3.5-27B",
        multimodal=True,
        outer={"vision_config": QWEN3_5_VISION},
    ),
    Family(
        "Qwen3.5-MoE (text)",
        "qwen3_5_moe_text",
        {**MOE, **LINEAR_ATTENTION, "shared_expert_intermediate_size": 32},
        "Qwen3.5-MoE, text weights",
    ),
    Family(
        "Qwen3.5-MoE (multimodal folder)",
        "qwen3_5_moe",
        {**MOE, **LINEAR_ATTENTION, "shared_expert_intermediate_size": 32},
        "Qwen3.5-MoE",
        multimodal=True,
        outer={"vision_config": QWEN3_5_VISION},
    ),
    Family("Llama 3", "llama", examples="Llama-3.1-8B-Instruct"),
    Family(
        "Llama 4 (text)",
        "llama4_text",
        {"num_local_experts": 4, "num_experts_per_tok": 1, "intermediate_size_mlp": 128, "attention_chunk_size": 8},
        "Llama-4-Scout-17B-16E",
    ),
    Family("Mistral", "mistral", examples="Mistral-7B-Instruct-v0.3"),
    Family("Mixtral", "mixtral", {"num_local_experts": 4, "num_experts_per_tok": 2}, "Mixtral-8x7B-Instruct"),
    Family("Gemma 2", "gemma2", {"sliding_window": 8}, "gemma-2-9b-it"),
    Family("Gemma 3 (text)", "gemma3_text", {"sliding_window": 8}, "gemma-3-1b-it"),
    Family(
        "Gemma 3 (multimodal folder)",
        "gemma3",
        {"sliding_window": 8},
        "gemma-3-4b-it",
        multimodal=True,
        outer={"vision_config": SIGLIP_VISION, "mm_tokens_per_image": 4},
    ),
    Family("Gemma 4 (text)", "gemma4_text", GEMMA4, "Gemma 4"),
    Family("Gemma 4 (multimodal folder)", "gemma4", GEMMA4, "Gemma 4", multimodal=True),
    Family("Phi-3 / Phi-4", "phi3", examples="Phi-3.5-mini-instruct, phi-4"),
    Family("GPT-OSS", "gpt_oss", {"num_local_experts": 4, "num_experts_per_tok": 2, **SLIDING}, "gpt-oss-20b"),
    Family(
        "DeepSeek-V3",
        "deepseek_v3",
        {
            "n_routed_experts": 4,
            "num_experts_per_tok": 2,
            "n_shared_experts": 1,
            "moe_intermediate_size": 32,
            "n_group": 1,
            "topk_group": 1,
            "first_k_dense_replace": 1,
            "q_lora_rank": 32,
            "kv_lora_rank": 16,
            "qk_rope_head_dim": 8,
            "qk_nope_head_dim": 8,
            "v_head_dim": 16,
            "head_dim": 8,  # the rotary part of each head, as DeepSeek-V3's config derives it
            "num_key_value_heads": 4,  # multi-head latent attention: as many key/value heads as query heads
        },
        "DeepSeek-V3, Kimi-K2",
    ),
    Family("GLM-4", "glm4", examples="GLM-4-9B-0414"),
    Family(
        "GLM-4.5 (MoE)",
        "glm4_moe",
        {
            "n_routed_experts": 4,
            "num_experts_per_tok": 2,
            "n_shared_experts": 1,
            "moe_intermediate_size": 32,
            "first_k_dense_replace": 1,
        },
        "GLM-4.5-Air",
    ),
    Family("OLMo 2", "olmo2", examples="OLMo-2-1124-7B-Instruct"),
    Family("OLMo 3", "olmo3", {"sliding_window": 8}, "Olmo-3-7B-Instruct"),
    Family("SmolLM3", "smollm3", examples="SmolLM3-3B"),
    Family("LFM2", "lfm2", {"layer_types": ["conv", "full_attention"], "block_auto_adjust_ff_dim": False}, "LFM2-1.2B"),
    Family("Granite 3", "granite", examples="granite-3.3-8b-instruct"),
    Family("Granite MoE", "granitemoe", {"num_local_experts": 4, "num_experts_per_tok": 2}, "granite-3.0-3b-a800m"),
    Family(
        "Granite 4 (hybrid)",
        "granitemoehybrid",
        {
            "layer_types": ["mamba", "attention"],
            "num_local_experts": 4,
            "num_experts_per_tok": 2,
            "shared_intermediate_size": 64,
            "mamba_n_heads": 4,
            "mamba_d_head": 32,
            "mamba_d_state": 16,
            "mamba_n_groups": 1,
            "mamba_chunk_size": 16,
        },
        "granite-4.0-h-tiny",
    ),
    Family("Cohere (Command R)", "cohere", examples="c4ai-command-r-v01"),
    Family("Cohere 2 (Command R7B, A)", "cohere2", SLIDING, "c4ai-command-r7b-12-2024"),
    Family("OLMoE", "olmoe", {"num_experts": 4, "num_experts_per_tok": 2}, "OLMoE-1B-7B-0125-Instruct"),
    Family(
        "ERNIE 4.5 MoE",
        "ernie4_5_moe",
        {"moe_num_experts": 4, "moe_k": 2, "moe_intermediate_size": 32},
        "ERNIE-4.5-21B-A3B",
    ),
    Family(
        "Falcon-H1 (hybrid)",
        "falcon_h1",
        {
            "mamba_d_ssm": 64,
            "mamba_n_heads": 4,
            "mamba_d_head": 16,
            "mamba_d_state": 16,
            "mamba_n_groups": 1,
            "mamba_chunk_size": 16,
        },
        "Falcon-H1-7B-Instruct",
    ),
    Family(
        "Jamba (hybrid MoE)",
        "jamba",
        {
            "num_experts": 4,
            "num_experts_per_tok": 2,
            "attn_layer_period": 2,
            "attn_layer_offset": 1,
            "expert_layer_period": 2,
            "expert_layer_offset": 1,
            "mamba_d_state": 8,
            "mamba_dt_rank": 8,
            "use_mamba_kernels": False,
        },
        "AI21-Jamba-Mini-1.7",
    ),
]
BY_NAME = {family.name: family for family in FAMILIES}

# The tiny tokenizer's vocabulary: byte-level BPE, the ChatML special tokens among them.
TOKENIZER_VOCABULARY = 512


@cache
def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer with the ChatML special tokens and template (make_tiny_model's), trained once."""
    from scripts.make_tiny_model import generate_text, train_tokenizer

    return train_tokenizer(generate_text(random.Random(0), 2000), TOKENIZER_VOCABULARY)


def family_config(family: Family, tokenizer: PreTrainedTokenizerFast | None = None):
    """The tiny config of `family`, its vocabulary and special tokens those of the tokenizer."""
    tokenizer = tokenizer or tiny_tokenizer()
    im_end, endoftext = tokenizer.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"])
    tokens = {"vocab_size": len(tokenizer), "bos_token_id": endoftext, "eos_token_id": im_end}
    tokens["pad_token_id"] = endoftext
    if family.model_type.startswith("gemma4"):  # Gemma 4's per-layer input embeddings have a vocabulary too
        tokens["vocab_size_per_layer_input"] = len(tokenizer)
    kwargs = family.config_kwargs()
    if family.multimodal:
        kwargs["text_config"] = {**kwargs["text_config"], **tokens}
    else:
        kwargs.update(tokens)
    return AutoConfig.for_model(family.model_type, **kwargs)


def build_family_model(family: Family | str, output: str | Path, seed: int = 0) -> Path:
    """Writes a tiny random model of `family` (a Family or its name) with the tiny ChatML tokenizer to `output`."""
    family = BY_NAME[family] if isinstance(family, str) else family
    output = Path(output)
    tokenizer = tiny_tokenizer()
    config = family_config(family, tokenizer)
    torch.manual_seed(seed)
    # A multimodal family's folder holds the whole vision-language model, as its releases do.
    model_class = AutoModelForImageTextToText if family.multimodal else AutoModelForCausalLM
    model = model_class.from_config(config)
    im_end, endoftext = tokenizer.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"])
    model.generation_config = GenerationConfig(
        eos_token_id=[im_end, endoftext], pad_token_id=endoftext, do_sample=False, max_new_tokens=16
    )
    output.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(output)
    tokenizer.save_pretrained(output)
    return output


def folder_name(family: Family) -> str:
    """A folder name for the family: its model type."""
    return family.model_type


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default="tiny-families", help="folder to write one model folder per family to")
    parser.add_argument("--family", action="append", help="only these families (by model type); default: all")
    args = parser.parse_args()
    for family in FAMILIES:
        if args.family and family.model_type not in args.family:
            continue
        folder = build_family_model(family, Path(args.output) / folder_name(family))
        print(f"{family.name}: {family.model_type} -> {folder}")


if __name__ == "__main__":
    main()
