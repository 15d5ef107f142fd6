"""Work done once under torchrun: preparing the data (reading, tokenising, packing into cache files) runs first on
one process, and the others wait for it and then open its result. That one process is the first of each node, or
the first of all when the cache folder is on a filesystem every node shares (then the other nodes open the same
files instead of preparing their own copy).

transformers' `main_process_first` waits on the default process group, whose timeout (`--ddp_timeout`, 30 minutes)
would end the run when preparing a large data set takes longer. This wait is on a gloo group of its own with a
timeout of a day: the preparation may take as long as it takes.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import torch.distributed as dist

PREPARATION_TIMEOUT = timedelta(days=1)


def _shared_by_all(folder: str | os.PathLike, group) -> bool:
    """Whether every process sees `folder` as the same folder: the first writes a file of a random name into it,
    and every process looks for that name."""
    probe = None
    if dist.get_rank() == 0:
        try:
            Path(folder).mkdir(parents=True, exist_ok=True)
            probe = Path(folder) / f".shared-probe-{uuid.uuid4().hex}"
            probe.touch()
        except OSError:  # not writable: the preparation reports it; the other ranks must not wait for a probe
            probe = None
    names = [probe.name if probe else None]
    dist.broadcast_object_list(names, src=0, group=group)
    seen = [None] * dist.get_world_size()
    dist.all_gather_object(seen, names[0] is not None and (Path(folder) / names[0]).exists(), group=group)
    if probe is not None:
        probe.unlink(missing_ok=True)
    return all(seen)


@contextlib.contextmanager
def local_main_first(
    local_rank: int, timeout: timedelta = PREPARATION_TIMEOUT, shared_dir: str | os.PathLike | None = None
) -> Iterator[None]:
    """The body runs on each node's local rank 0 first (on global rank 0 alone when every node sees `shared_dir`,
    the cache folder, as the same folder), then on the other ranks, which find its cache.

    Every rank passes one barrier on a gloo group with `timeout`: the waiting ranks before the body, the first
    ones after it, also when the body raised (the others then run it and report the same error)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        yield
        return
    group = dist.new_group(backend="gloo", timeout=timeout)
    try:
        first = local_rank == 0
        if shared_dir is not None and _shared_by_all(shared_dir, group):
            first = dist.get_rank() == 0
        if not first:
            dist.barrier(group=group)
        try:
            yield
        finally:
            if first:
                dist.barrier(group=group)
    finally:
        dist.destroy_process_group(group)
