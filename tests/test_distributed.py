"""sft.distributed: the data is prepared once per node, and a preparation longer than the process group's timeout
does not end the run. Two CPU processes on gloo, the group's timeout set far below the preparation's length."""

from __future__ import annotations

import time
from datetime import timedelta
from pathlib import Path

import torch.distributed as dist
import torch.multiprocessing as mp
from ports import free_port

from sft.distributed import local_main_first

PREPARATION_SECONDS = 4  # longer than the default group's timeout below


def _rank(rank: int, port: int, log: str, nodes: int = 1, cache_dirs: tuple[str, ...] | None = None) -> None:
    """One process of two: on one node (local ranks 0 and 1) or each on a node of its own (local rank 0 both),
    with a cache folder each (the same one: shared)."""
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2, timeout=timedelta(seconds=1)
    )
    local_rank = rank if nodes == 1 else 0
    with local_main_first(local_rank=local_rank, shared_dir=cache_dirs[rank] if cache_dirs else None):
        if rank == 0:
            time.sleep(PREPARATION_SECONDS)
        with open(log, "a") as out:
            out.write(f"{rank} {time.time()}\n")
    dist.destroy_process_group()


def _order(tmp_path: Path, *options) -> list[str]:
    """The ranks in the order their bodies finished."""
    port = free_port()
    log = tmp_path / "order.txt"
    mp.spawn(_rank, args=(port, str(log), *options), nprocs=2, join=True)
    return [line.split()[0] for line in Path(log).read_text().splitlines()]


def test_other_ranks_wait_for_the_first_past_the_group_timeout(tmp_path):
    assert _order(tmp_path) == ["0", "1"]  # rank 1 ran its body only after rank 0's had finished


def test_nodes_sharing_the_cache_folder_prepare_once_in_all(tmp_path):
    shared = str(tmp_path / "cache")
    assert _order(tmp_path, 2, (shared, shared)) == ["0", "1"]  # node 1 waits for node 0's files
    assert not list(Path(shared).iterdir())  # the probe is gone


def test_nodes_with_caches_of_their_own_prepare_each_at_once(tmp_path):
    own = (str(tmp_path / "node0"), str(tmp_path / "node1"))
    assert _order(tmp_path, 2, own) == ["1", "0"]  # node 1 did not wait for node 0's (slow) preparation


def test_one_process_just_runs_the_body():
    ran = []
    with local_main_first(local_rank=0):
        ran.append(True)
    assert ran == [True]
