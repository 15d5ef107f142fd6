"""sft/launch.py: the process count and precision flags each GPU situation leads to, described to the code."""

from __future__ import annotations

import pytest

from sft.errors import UserError
from sft.launch import device_args, plan, process_count, visible_gpus

CPU_FLAGS = ["--use_cpu", "true", "--dataloader_pin_memory", "false"]


@pytest.mark.parametrize(
    ("gpus", "requested", "one_process", "processes"),
    [
        (0, None, False, 1),  # a CPU: one process
        (8, None, False, 8),  # one per GPU
        (8, "2", False, 2),  # GPUS_PER_NODE wins
        (0, "2", False, 2),  # two CPU processes over gloo (the tests' DeepSpeed runs)
        (8, None, True, 1),  # a one-GPU launcher on an 8-GPU node: one process, not DDP with an 8x batch
        (8, "1", True, 1),
        (0, None, True, 1),
    ],
)
def test_process_count(gpus, requested, one_process, processes):
    assert process_count(gpus, requested, one_process) == processes


def test_one_process_launchers_refuse_more_and_name_the_others():
    for requested, nnodes in [("2", None), (None, "2")]:
        with pytest.raises(UserError) as refused:
            process_count(8, requested, one_process=True, nnodes=nnodes)
        assert "finetune/finetune_lora_ds.sh" in str(refused.value)
        assert "finetune/finetune_qlora_ds.sh" in str(refused.value)
    with pytest.raises(UserError, match="GPUS_PER_NODE=zero"):
        process_count(8, "zero", one_process=False)


@pytest.mark.parametrize(
    ("gpus", "cuda_bf16", "user_args", "flags"),
    [
        (0, None, [], CPU_FLAGS),
        (8, True, [], ["--bf16", "true"]),  # A100/H100
        (1, False, [], ["--fp16", "true"]),  # V100/T4: bf16 only emulated
        (1, False, ["--bf16", "true"], []),  # the user's choice stands (finetune.py checks it)
        (1, True, ["--fp16=true"], []),
        (1, True, ["--bf16_full_eval"], ["--bf16", "true"]),  # another flag, not a precision choice
    ],
)
def test_device_args(gpus, cuda_bf16, user_args, flags):
    assert device_args(gpus, cuda_bf16, user_args) == flags


def test_the_environment_describes_the_gpus():
    assert visible_gpus({"SFT_GPU_COUNT": "4", "SFT_GPU_BF16": "0"}) == (4, False)
    assert visible_gpus({"SFT_GPU_COUNT": "0"}) == (0, None)
    environ = {"SFT_GPU_COUNT": "8", "SFT_GPU_BF16": "1"}
    assert plan(["--", "--max_steps", "3"], environ) == ["8", "--bf16", "true"]
    assert plan(["--one_process", "--"], environ) == ["1", "--bf16", "true"]
    with pytest.raises(UserError, match="trains in one process; GPUS_PER_NODE=2"):
        plan(["--one_process", "--"], {**environ, "GPUS_PER_NODE": "2"})
