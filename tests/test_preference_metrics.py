"""sft.preference_metrics: a log line is the mean over every process's pairs, read once per log."""

from __future__ import annotations

import os

import pytest
import torch
import torch.multiprocessing as mp
from ports import free_port

from sft.preference_metrics import NAMES, PreferenceMetrics

# Two processes' micro-batches (chosen reward, rejected reward, chosen log-prob, rejected log-prob, chosen length,
# rejected length per pair); rank 1 has an uneven count, as the last batches of an epoch can.
BATCHES = {
    0: [
        [(0.5, 0.1, -3.0, -4.0, 5, 2), (0.2, 0.4, -2.0, -2.5, 3, 3)],
        [(1.0, -0.5, -1.0, -6.0, 9, 1)],
    ],
    1: [
        [(-0.3, 0.2, -5.0, -1.0, 2, 7), (0.7, 0.0, -2.5, -3.0, 6, 2), (0.1, 0.3, -4.0, -4.5, 4, 4)],
    ],
}


def add_batches(metrics: PreferenceMetrics, batches: list, keep_recent: bool = True) -> None:
    for batch in batches:
        columns = torch.tensor(batch, dtype=torch.float32).T
        metrics.add(*columns, keep_recent=keep_recent)


def expected_means(pairs: list[tuple]) -> dict[str, float]:
    rows = [(c, r, c - r, float(c - r > 0), cl, rl, cn, rn) for c, r, cl, rl, cn, rn in pairs]  # in NAMES' order
    return {name: sum(row[k] for row in rows) / len(rows) for k, name in enumerate(NAMES)}


def pearson_of(pairs: list[tuple]) -> float:
    margins = torch.tensor([c - r for c, r, *_ in pairs], dtype=torch.float64)
    differences = torch.tensor([cn - rn for *_, cn, rn in pairs], dtype=torch.float64)
    return float(torch.corrcoef(torch.stack([margins, differences]))[0, 1])


def summarise_in_process(rank: int, world_size: int, port: int, results) -> None:
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), ACCELERATE_USE_CPU="true",
    )  # fmt: skip
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    assert accelerator.num_processes == world_size
    metrics = PreferenceMetrics(window=8)
    add_batches(metrics, BATCHES[rank])
    results[rank] = metrics.summary(accelerator, accelerator.device, correlation=True)
    accelerator.end_training()
    torch.distributed.destroy_process_group() if torch.distributed.is_initialized() else None


def test_two_processes_log_the_mean_over_all_their_pairs():
    manager = mp.get_context("spawn").Manager()
    results = manager.dict()
    mp.start_processes(summarise_in_process, args=(2, free_port(), results), nprocs=2, start_method="spawn")
    every_pair = [pair for rank in (0, 1) for batch in BATCHES[rank] for pair in batch]
    expected = expected_means(every_pair)
    for rank in (0, 1):  # each process logs the same figures: all six pairs, not its own alone
        got = dict(results[rank])
        assert got.keys() == {*NAMES, "length/margin_correlation"}
        for name in NAMES:
            assert got[name] == pytest.approx(expected[name], abs=1e-6), name
        assert got["length/margin_correlation"] == pytest.approx(pearson_of(every_pair), abs=1e-6)


class OneProcess:
    """The accelerator's collectives on one process: the tensor itself."""

    def reduce(self, tensor: torch.Tensor, reduction: str = "sum") -> torch.Tensor:
        return tensor

    def gather(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor


def test_sums_restart_after_each_log_and_the_correlation_window_keeps_the_last_pairs():
    metrics = PreferenceMetrics(window=3)
    add_batches(metrics, BATCHES[0])
    first = metrics.summary(OneProcess(), torch.device("cpu"), correlation=True)
    first_pairs = [pair for batch in BATCHES[0] for pair in batch]
    assert first["rewards/chosen"] == pytest.approx(expected_means(first_pairs)["rewards/chosen"])
    add_batches(metrics, BATCHES[1])
    second = metrics.summary(OneProcess(), torch.device("cpu"), correlation=True)
    for name, value in expected_means(BATCHES[1][0]).items():  # the second log's pairs alone
        assert second[name] == pytest.approx(value, abs=1e-6), name
    # The ring kept the last three pairs, which all came in the second batch.
    assert second["length/margin_correlation"] == pytest.approx(pearson_of(BATCHES[1][0]), abs=1e-6)
    # A log with no pair since the last one gives no means; evaluation keeps no correlation window.
    assert metrics.summary(OneProcess(), torch.device("cpu"), correlation=False) == {}
    evaluation = PreferenceMetrics(window=3)
    add_batches(evaluation, BATCHES[0], keep_recent=False)
    assert "length/margin_correlation" not in evaluation.summary(OneProcess(), torch.device("cpu"), correlation=True)
