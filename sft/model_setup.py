"""What a run trains, built from its arguments: the tokenizer (checked against --chat_template and
--model_max_length) and the base model in its dtype, quantised for Q-LoRA, with its LoRA adapters; and the data
path as the run record keeps it.

finetune.py and dpo.py build both; `sft.inspect` builds the same tokenizer, so that it refuses what the run would.
"""

from __future__ import annotations

import os

import torch
import transformers
from transformers import PreTrainedTokenizerBase
from transformers.integrations import is_deepspeed_zero3_enabled

from sft.args import LoraArguments, ModelArguments, TrainingArguments, lora_init
from sft.data import source_names, template_overhead
from sft.data.template_fit import fit_chat_template, grow_embeddings
from sft.errors import ConfigurationError
from sft.modeling import (
    add_lora,
    chat_special_token_ids,
    load_lora,
    load_model,
    load_tokenizer,
    quantization_config,
    read_chat_template,
    training_dtype,
    training_weights_dtype,
)
from sft.moe import keep_router_aux_loss
from sft.training import init_deepspeed_comm


def tokenizer_or_error(
    model_args: ModelArguments,
    max_length: int,
    add_markers: bool = False,
    tokenizer_max_length: int | None = None,
) -> PreTrainedTokenizerBase:
    """The tokenizer of --model_name_or_path (already resolved), checked to leave room for text within
    `max_length` tokens. A --chat_template must fit it (sft.data.template_fit): with `add_markers`
    (--train_special_tokens) its missing markers are added as special tokens."""
    path = model_args.model_name_or_path
    chat_template = read_chat_template(model_args.chat_template) if model_args.chat_template else None
    try:
        # Its own model_max_length is kept unless asked (and saved with the output): --model_max_length is the
        # training length.
        tokenizer = load_tokenizer(path, model_args.trust_remote_code, tokenizer_max_length, chat_template)
    except (OSError, ValueError) as error:  # a typo in the path or the hub id, or no network to fetch it
        raise ConfigurationError(f"--model_name_or_path {path}: cannot load a tokenizer from it ({error})") from None
    if chat_template:
        fit_chat_template(tokenizer, f"--chat_template {model_args.chat_template}", add_markers)
    overhead = template_overhead(tokenizer)
    if max_length <= overhead + 1:
        raise ConfigurationError(
            f"--model_max_length {max_length} leaves no room for text: the chat template alone takes {overhead} tokens"
        )
    return tokenizer


def build_model(
    model_args: ModelArguments,
    training_args: TrainingArguments,
    lora_args: LoraArguments,
    tokenizer: PreTrainedTokenizerBase,
) -> torch.nn.Module:
    """The base model in its dtype (quantised for Q-LoRA), its embeddings grown to the tokens added to `tokenizer`
    (a --chat_template's markers), with LoRA adapters when --use_lora."""
    dtype = training_weights_dtype(
        model_args.model_dtype, training_args.bf16, training_args.fp16, training_args.use_lora
    )
    quantization = None
    if lora_args.q_lora:
        quantization = quantization_config(
            lora_args.bits,
            training_dtype(training_args.bf16, training_args.fp16),
            lora_args.bnb_4bit_quant_type,
            lora_args.double_quant,
            sharded=is_deepspeed_zero3_enabled() or bool(training_args.fsdp),  # 4-bit weights split by ZeRO-3/FSDP
        )
    init_deepspeed_comm(training_args)
    # The LoRA initialisation draws random numbers too: --seed fixes it, whatever ran before.
    transformers.set_seed(training_args.seed)
    model = load_model(
        model_args.model_name_or_path, dtype, quantization, model_args.trust_remote_code, model_args.attn_implementation
    )
    grow_embeddings(model, tokenizer)
    if training_args.gradient_checkpointing:
        model.config.use_cache = False
    keep_router_aux_loss(model)
    if not training_args.use_lora:
        return model
    if lora_args.lora_weight_path:
        return load_lora(model, lora_args.lora_weight_path, lora_args.q_lora, training_args.gradient_checkpointing)
    try:
        return add_lora(
            model,
            r=lora_args.lora_r,
            alpha=lora_args.lora_alpha,
            dropout=lora_args.lora_dropout,
            target_modules=lora_args.lora_target_modules,
            bias=lora_args.lora_bias,
            trainable_token_ids=chat_special_token_ids(tokenizer) if lora_args.train_special_tokens else None,
            quantized=lora_args.q_lora,
            gradient_checkpointing=training_args.gradient_checkpointing,
            use_dora=lora_args.use_dora,
            use_rslora=lora_args.use_rslora,
            init_lora_weights=lora_init(lora_args.init_lora_weights),
            scope=lora_args.lora_target,
        )
    except ValueError as error:  # e.g. target modules that match nothing
        raise ConfigurationError(str(error)) from None


def data_path_record(data_path: list[str]) -> list[str]:
    """--data_path for the run record: each local source as an absolute path (hub ids as given)."""
    return [os.path.abspath(name) if os.path.exists(name) else name for name in source_names(data_path)]
