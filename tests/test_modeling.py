"""The one dtype policy (sft/modeling.py), branch by branch on any CPU: the GPU is described to it, not looked up."""

from __future__ import annotations

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
