"""What a finetune/*.sh launcher starts: how many processes on this node, and finetune.py's device and
precision flags, decided from the GPUs the node has.

The launchers run `python -m sft.launch [--one_process] -- USER_ARGS...`, which prints one line: the process
count, then the flags to add. The GPUs are read from torch, or described by the environment (SFT_GPU_COUNT,
SFT_GPU_BF16=1/0), which is how the tests give a CPU machine any GPU situation.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from sft.errors import UserError, run_main

# The launchers that start one process per GPU, named when a one-process launcher is asked for more.
MULTI_PROCESS_LAUNCHERS = (
    "finetune/finetune_lora_ds.sh (LoRA), finetune/finetune_qlora_ds.sh (Q-LoRA), "
    "finetune/finetune_ds.sh or finetune/finetune_fsdp.sh (full fine-tuning)"
)


class LaunchError(UserError):
    """A launcher asked for a process layout it does not run."""


def visible_gpus(environ: dict[str, str] | None = None) -> tuple[int, bool | None]:
    """(GPU count, native bf16: None without a GPU) as torch sees them (CUDA_VISIBLE_DEVICES included), unless
    SFT_GPU_COUNT (and SFT_GPU_BF16) describe them."""
    environ = os.environ if environ is None else environ
    if environ.get("SFT_GPU_COUNT", "") != "":
        count = int(environ["SFT_GPU_COUNT"])
        return count, (environ.get("SFT_GPU_BF16", "1") == "1") if count else None
    import torch

    count = torch.cuda.device_count()
    if count == 0:
        return 0, None
    from sft.modeling import gpu_bf16  # the one dtype policy; imported only where a GPU is (it is slow to import)

    return count, gpu_bf16("cuda")


def process_count(gpu_count: int, requested: str | None, one_process: bool, nnodes: str | None = None) -> int:
    """Processes to start on this node: GPUS_PER_NODE (`requested`) when set, else one per GPU (one on a CPU).
    A one-process launcher starts one whatever the GPU count, and refuses a request for more."""
    if one_process:
        if requested not in (None, "", "1") or nnodes not in (None, "", "1"):
            asked = f"GPUS_PER_NODE={requested}" if requested not in (None, "", "1") else f"NNODES={nnodes}"
            raise LaunchError(
                f"this launcher trains in one process; {asked} asks for more. For several processes use "
                f"{MULTI_PROCESS_LAUNCHERS}"
            )
        return 1
    if requested not in (None, ""):
        if not requested.isdigit() or int(requested) < 1:
            raise LaunchError(f"GPUS_PER_NODE={requested}: expected a positive number of processes")
        return int(requested)
    return max(gpu_count, 1)


def user_precision(user_args: Sequence[str]) -> bool:
    """Whether the user's own arguments choose the mixed precision (--bf16 / --fp16, with or without a value)."""
    return any(arg.split("=", 1)[0] in ("--bf16", "--fp16") for arg in user_args)


def device_args(gpu_count: int, cuda_bf16: bool | None, user_args: Sequence[str] = ()) -> list[str]:
    """finetune.py flags for this node: the CPU flags without a GPU; else mixed precision unless the user chose
    one: bf16 where the GPU computes it natively, fp16 on older GPUs (emulated bf16 runs, slower)."""
    if gpu_count == 0:
        # Same command on a laptop: the Trainer and DeepSpeed run on the CPU, processes talk over gloo.
        return ["--use_cpu", "true", "--dataloader_pin_memory", "false"]
    if user_precision(user_args):
        return []
    return ["--bf16", "true"] if cuda_bf16 else ["--fp16", "true"]


def plan(argv: Sequence[str], environ: dict[str, str] | None = None) -> list[str]:
    """The launcher's line: the process count, then the flags to add."""
    environ = os.environ if environ is None else environ
    parser = argparse.ArgumentParser(prog="python -m sft.launch")
    parser.add_argument("--one_process", action="store_true", help="a one-GPU launcher: one process")
    parser.add_argument("user_args", nargs="*", help="the user's finetune.py arguments (after --)")
    args = parser.parse_args(argv)
    gpu_count, cuda_bf16 = visible_gpus(environ)
    processes = process_count(gpu_count, environ.get("GPUS_PER_NODE"), args.one_process, environ.get("NNODES"))
    return [str(processes), *device_args(gpu_count, cuda_bf16, args.user_args)]


def main(argv: Sequence[str] | None = None) -> None:
    run_main(lambda: print(" ".join(plan(sys.argv[1:] if argv is None else argv))))


if __name__ == "__main__":
    main()
