"""sft.distributed: the data is prepared once per node, and a preparation longer than the process group's timeout
does not end the run. Two CPU processes on gloo, the group's timeout set far below the preparation's length."""

from __future__ import annotations

import time
from datetime import timedelta
from pathlib import Path

import torch.distributed as dist
import torch.multiprocessing as mp

from sft.distributed import local_main_first

PREPARATION_SECONDS = 4  # longer than the default group's timeout below


def _rank(rank: int, port: int, log: str) -> None:
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2, timeout=timedelta(seconds=1)
    )
    with local_main_first(local_rank=rank):
        if rank == 0:
            time.sleep(PREPARATION_SECONDS)
        with open(log, "a") as out:
            out.write(f"{rank} {time.time()}\n")
    dist.destroy_process_group()


def test_other_ranks_wait_for_the_first_past_the_group_timeout(tmp_path):
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    log = tmp_path / "order.txt"
    mp.spawn(_rank, args=(port, str(log)), nprocs=2, join=True)
    ranks = [line.split()[0] for line in Path(log).read_text().splitlines()]
    assert ranks == ["0", "1"]  # rank 1 ran its body only after rank 0's had finished


def test_one_process_just_runs_the_body():
    ran = []
    with local_main_first(local_rank=0):
        ran.append(True)
    assert ran == [True]
