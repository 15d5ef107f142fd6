"""Disk space for a run's outputs: a check before training that one checkpoint fits, and a save that runs out of
space turned into one error line, with its partial folder removed and the last complete checkpoint kept."""

from __future__ import annotations

import errno
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from sft.errors import UserError

# Adam(W) keeps two fp32 moments per trainable parameter.
OPTIMIZER_BYTES_PER_PARAMETER = 8
# Tokenizer files, trainer state, scheduler, RNG states and the like, written with every checkpoint.
CHECKPOINT_OVERHEAD_BYTES = 2**20


class DiskFull(UserError):
    """A save that ran out of space: its partial folder is removed, the last complete checkpoint kept."""


# How the writers report a full disk without an OSError: torch.save's zip writer (RuntimeError) and safetensors
# (SafetensorError), in their own words.
DISK_FULL_MESSAGES = ("No space left on device", "os error 28", "unexpected pos", "file write failed")


def _is_disk_full(error: BaseException) -> bool:
    if isinstance(error, OSError) and error.errno is not None:
        return error.errno in (errno.ENOSPC, errno.EDQUOT)
    return any(message in str(error) for message in DISK_FULL_MESSAGES)


@contextmanager
def disk_full_is_a_user_error(partial: str | os.PathLike, doing: str) -> Iterator[None]:
    """Turns running out of space inside the block into DiskFull, after removing `partial` (what the block was
    writing), so that the disk is not left full of a half-written folder."""
    try:
        yield
    except Exception as error:
        if not _is_disk_full(error):
            raise
        shutil.rmtree(partial, ignore_errors=True)
        folder = os.path.dirname(os.path.abspath(partial))
        free = shutil.disk_usage(folder).free if os.path.isdir(folder) else 0
        raise DiskFull(
            f"{folder}: no space left while {doing} ({free / 2**20:.1f} MiB free now); the partial folder was "
            "removed and the last complete checkpoint kept: free some space (or lower --save_total_limit), then "
            "rerun the same command to resume"
        ) from None


def checkpoint_bytes(model: torch.nn.Module, full: bool, with_optimizer: bool = True) -> int:
    """An estimate of one checkpoint's size: the weights saved (all of them for a full fine-tune, the trainable
    ones, in their dtypes, for an adapter), the optimizer state of the trainable ones, and some overhead."""
    saved = trainable = 0
    for parameter in model.parameters():
        count = getattr(parameter, "ds_numel", parameter.numel())  # ZeRO-3 shards: the whole parameter's count
        size = count * parameter.element_size()
        if parameter.requires_grad:
            trainable += count
        if full or parameter.requires_grad:
            saved += size
    optimizer = trainable * OPTIMIZER_BYTES_PER_PARAMETER if with_optimizer else 0
    return saved + optimizer + CHECKPOINT_OVERHEAD_BYTES


def free_bytes(folder: str | os.PathLike) -> int:
    """Free space on the file system `folder` is (or will be) on: its nearest existing ancestor's."""
    path = Path(folder).absolute()
    while not path.exists():
        path = path.parent
    return shutil.disk_usage(path).free


def check_room(folder: str | os.PathLike, needed: int, free: int | None = None) -> None:
    """Refuses to start training when `folder`'s file system has less than `needed` bytes free (`free`, where
    given, is what it has: for tests and callers that know better)."""
    free = free_bytes(folder) if free is None else free
    if free < needed:
        raise DiskFull(
            f"--output_dir {folder}: one checkpoint needs about {needed / 2**20:.1f} MiB and its file system has "
            f"{free / 2**20:.1f} MiB free: free some space or choose an --output_dir on another disk"
        )
