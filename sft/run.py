"""The set-up steps every training script shares (finetune.py, dpo.py): the tokenizer checked against the
training length, the model with its adapters, the data path as the run record keeps it."""

from __future__ import annotations

import os

import torch
import transformers
from transformers.integrations import is_deepspeed_zero3_enabled

from sft.args import LoraArguments, ModelArguments, TrainingArguments, lora_init
from sft.data import template_overhead
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
from sft.training import init_deepspeed_comm


def data_path_record(data_path: str) -> str:
    """--data_path for the run record: each local source as an absolute path (hub ids as given)."""
    return " ".join(os.path.abspath(name) if os.path.exists(name) else name for name in data_path.split())


def tokenizer_or_error(model_args: ModelArguments, max_length: int):
    """The tokenizer of --model_name_or_path, checked to leave room for text within `max_length` tokens."""
    path = model_args.model_name_or_path
    chat_template = read_chat_template(model_args.chat_template) if model_args.chat_template else None
    try:
        # Its own model_max_length is kept (and saved with the output): --model_max_length is the training length.
        tokenizer = load_tokenizer(path, model_args.trust_remote_code, chat_template=chat_template)
    except (OSError, ValueError) as error:  # a typo in the path or the hub id, or no network to fetch it
        raise ConfigurationError(f"--model_name_or_path {path}: cannot load a tokenizer from it ({error})") from None
    overhead = template_overhead(tokenizer)
    if max_length <= overhead + 1:
        raise ConfigurationError(
            f"--model_max_length {max_length} leaves no room for text: the chat template alone takes {overhead} tokens"
        )
    return tokenizer


def build_model(
    model_args: ModelArguments, training_args: TrainingArguments, lora_args: LoraArguments, tokenizer
) -> torch.nn.Module:
    """The base model in its dtype (quantised for Q-LoRA), with LoRA adapters when --use_lora."""
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
    if training_args.gradient_checkpointing:
        model.config.use_cache = False
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
        )
    except ValueError as error:  # e.g. target modules that match nothing
        raise ConfigurationError(str(error)) from None
