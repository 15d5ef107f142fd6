"""The one dtype policy (sft/modeling.py), branch by branch on any CPU: the GPU is described to it, not looked up."""

from __future__ import annotations

import re

import pytest
import torch

from sft.chat import pick_dtype
from sft.errors import ConfigurationError
from sft.modeling import (
    gpu_bf16,
    inference_device_map,
    inference_dtype,
    merge_dtype,
    named_dtype,
    quantization_config,
    training_device_map,
    training_dtype,
    training_weights_dtype,
)

NO_GPU, BF16_GPU, OLDER_GPU = None, True, False


@pytest.mark.parametrize(
    ("requested", "cuda_bf16", "gptq", "dtype"),
    [
        ("auto", NO_GPU, False, torch.float32),  # half precision is slow or missing on a CPU
        ("auto", NO_GPU, True, torch.float32),
        ("auto", BF16_GPU, False, torch.bfloat16),
        ("auto", OLDER_GPU, False, torch.float16),  # emulated bf16 would run, slower
        ("auto", BF16_GPU, True, torch.float16),  # GPTQ kernels compute in float16
        (None, BF16_GPU, False, torch.bfloat16),
        ("fp16", NO_GPU, False, torch.float16),  # what the user asks for wins
        ("bf16", OLDER_GPU, False, torch.bfloat16),
        ("float32", BF16_GPU, True, torch.float32),
    ],
)
def test_inference_dtype(requested, cuda_bf16, gptq, dtype):
    assert inference_dtype(requested, cuda_bf16, gptq) == dtype


@pytest.mark.parametrize(
    ("bf16", "fp16", "dtype"),
    [(True, False, torch.bfloat16), (False, True, torch.float16), (False, False, torch.float32)],
)
def test_training_dtype_follows_the_mixed_precision_flags(bf16, fp16, dtype):
    assert training_dtype(bf16, fp16) == dtype


def test_training_weights_dtype():
    # A LoRA run's frozen base in the compute dtype; a full fine-tune's weights in float32 whatever the flags.
    assert training_weights_dtype(None, bf16=True, fp16=False, lora=True) == torch.bfloat16
    assert training_weights_dtype(None, bf16=False, fp16=True, lora=True) == torch.float16
    assert training_weights_dtype(None, bf16=False, fp16=False, lora=True) == torch.float32
    assert training_weights_dtype(None, bf16=True, fp16=False, lora=False) == torch.float32
    assert training_weights_dtype("bfloat16", bf16=False, fp16=False, lora=False) == torch.bfloat16


def test_merge_dtype_keeps_the_dtype_the_base_was_saved_in():
    assert merge_dtype("auto", torch.bfloat16) == torch.bfloat16
    assert merge_dtype("auto", "float16") == torch.float16
    assert merge_dtype("auto", None) == torch.float32  # a config that records none
    assert merge_dtype("auto", "float8_e4m3fn") == torch.float32  # not a dtype to merge in
    assert merge_dtype("fp16", torch.bfloat16) == torch.float16


def test_an_unknown_dtype_name_is_a_configuration_error():
    with pytest.raises(ConfigurationError, match="unknown dtype 'half'"):
        named_dtype("half")


def test_the_gpu_is_asked_whether_it_has_bf16_natively(monkeypatch):
    asked = []

    def is_bf16_supported(including_emulation: bool = True) -> bool:
        asked.append(including_emulation)
        return False

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", is_bf16_supported)
    assert gpu_bf16("cpu") is None and asked == []
    assert gpu_bf16(torch.device("cuda", 0)) is False and asked == [False]
    assert pick_dtype(torch.device("cuda")) == torch.float16  # sft.chat follows the same policy
    assert pick_dtype(torch.device("cpu"), gptq=True) == torch.float32


@pytest.mark.parametrize(
    ("quantized", "cuda", "zero3", "device_map"),
    [
        (True, True, False, {"": 3}),  # bitsandbytes quantises on this process's GPU
        (True, True, True, None),  # ZeRO-3 shards while loading: transformers refuses any device_map there
        (True, False, False, None),
        (False, True, False, None),  # the Trainer (or DeepSpeed, FSDP) moves an unquantised model
    ],
)
def test_training_device_map(quantized, cuda, zero3, device_map):
    assert training_device_map(quantized, cuda, zero3, local_rank=3) == device_map


def test_sharded_four_bit_weights_are_stored_in_the_compute_dtype():
    # ZeRO-3 and FSDP flatten and shard tensors of one dtype: 4-bit weights kept as uint8 could not join them.
    assert quantization_config(4, torch.bfloat16, sharded=True).bnb_4bit_quant_storage == torch.bfloat16
    assert quantization_config(4, torch.float16, sharded=True).bnb_4bit_quant_storage == torch.float16
    assert quantization_config(4, torch.bfloat16).bnb_4bit_quant_storage == torch.uint8  # one process, ZeRO-2


def test_inference_device_map_spreads_over_the_gpus():
    assert inference_device_map("cuda") == "auto"  # a model larger than one GPU still loads
    assert inference_device_map(torch.device("cuda", 0)) == "auto"
    assert inference_device_map("cpu") == {"": torch.device("cpu")}


def templated_tokenizer(tokenizer, template: str, added: dict):
    """A copy of the tiny tokenizer with `added` special tokens and another chat template."""
    import copy

    tokenizer = copy.deepcopy(tokenizer)
    tokenizer.add_special_tokens(added)
    tokenizer.chat_template = template
    return tokenizer


def special_tokens_trained(tokenizer) -> set[str]:
    from sft.modeling import chat_special_token_ids

    return set(tokenizer.convert_ids_to_tokens(chat_special_token_ids(tokenizer)))


def test_train_special_tokens_takes_the_markers_of_the_model_s_own_template(tokenizer):
    from chat_templates import GEMMA2_STYLE, MISTRAL_STYLE

    assert special_tokens_trained(tokenizer) == {"<|im_start|>", "<|im_end|>"}  # ChatML's, not <|endoftext|>
    markers = ["<start_of_turn>", "<end_of_turn>"]
    gemma = templated_tokenizer(tokenizer, GEMMA2_STYLE, {"bos_token": "<bos>", "additional_special_tokens": markers})
    assert special_tokens_trained(gemma) == {"<bos>", "<start_of_turn>", "<end_of_turn>"}
    mistral = templated_tokenizer(
        tokenizer,
        MISTRAL_STYLE,
        {"bos_token": "<s>", "eos_token": "</s>", "additional_special_tokens": ["[INST]", "[/INST]"]},
    )
    assert special_tokens_trained(mistral) == {"<s>", "[INST]", "[/INST]", "</s>"}


def test_train_special_tokens_with_a_template_of_plain_text_is_refused(tokenizer):
    from chat_templates import ALPACA_STYLE

    with pytest.raises(ConfigurationError, match="the chat template writes no special token"):
        special_tokens_trained(templated_tokenizer(tokenizer, ALPACA_STYLE, {}))


def test_no_template_and_no_chatml_tokens_is_an_error_not_multi_token_markers(tiny_model, tmp_path):
    from transformers import AutoTokenizer

    from sft.modeling import load_tokenizer

    plain = AutoTokenizer.from_pretrained(tiny_model)
    plain.chat_template = None
    plain.save_pretrained(tmp_path / "with-chatml-tokens")
    (tmp_path / "with-chatml-tokens" / "chat_template.jinja").unlink(missing_ok=True)
    assert "<|im_start|>" in load_tokenizer(str(tmp_path / "with-chatml-tokens")).chat_template

    folder = tmp_path / "without"
    folder.mkdir()
    (folder / "tokenizer.json").write_text(
        (tmp_path / "with-chatml-tokens" / "tokenizer.json").read_text().replace("<|im_start|>", "<|xx_start|>")
    )
    config = '{"eos_token": "<|im_end|>", "tokenizer_class": "PreTrainedTokenizerFast"}'
    (folder / "tokenizer_config.json").write_text(config)
    with pytest.raises(ConfigurationError, match=re.escape("needs the tokens <|im_start|> it does not have")):
        load_tokenizer(str(folder))
