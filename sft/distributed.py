"""Work done once per node under torchrun: the first process of each node does it (tokenising and caching the
data), the others wait for it and then open its result.

transformers' `main_process_first` waits on the default process group, whose timeout (`--ddp_timeout`, 30 minutes)
would end the run when preparing a large data set takes longer. This wait is on a gloo group of its own with a
timeout of a day: the preparation may take as long as it takes.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from datetime import timedelta

import torch.distributed as dist

PREPARATION_TIMEOUT = timedelta(days=1)


@contextlib.contextmanager
def local_main_first(local_rank: int, timeout: timedelta = PREPARATION_TIMEOUT) -> Iterator[None]:
    """The body runs on each node's local rank 0 first, then on the other ranks (which find its cache).

    Every rank passes one barrier on a gloo group with `timeout`: the other ranks before the body, local rank 0
    after it, also when the body raised (the others then run it and report the same error)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        yield
        return
    group = dist.new_group(backend="gloo", timeout=timeout)
    try:
        if local_rank != 0:
            dist.barrier(group=group)
        try:
            yield
        finally:
            if local_rank == 0:
                dist.barrier(group=group)
    finally:
        dist.destroy_process_group(group)
