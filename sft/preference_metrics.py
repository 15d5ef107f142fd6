"""Preference training's logged metrics (rewards, accuracies, log-probs, answer lengths and the margin's correlation
with the length difference): each micro-batch's values stay on the device as running sums, and are read once per
log, summed over every training process, so that a log line is the mean over all pairs of all processes.

Adding a micro-batch reads nothing on the host (on a GPU a read waits for the device's queue, as the training
loop's design avoids: sft/training.py); the one read per log follows one all-reduce and one all-gather, made by
every process at the same log call.
"""

from __future__ import annotations

from typing import Protocol

import torch

from sft.preference_loss import pearson

NAMES = (
    "rewards/chosen",
    "rewards/rejected",
    "rewards/margins",
    "rewards/accuracies",
    "logps/chosen",
    "logps/rejected",
    "length/chosen",
    "length/rejected",
)


class Collective(Protocol):
    """What the metrics need of the Trainer's accelerator: sums and concatenations across processes (on one
    process, the tensor itself)."""

    def reduce(self, tensor: torch.Tensor, reduction: str = "sum") -> torch.Tensor: ...

    def gather(self, tensor: torch.Tensor) -> torch.Tensor: ...


class PreferenceMetrics:
    """One mode's (training's or evaluation's) metrics since the last log, on the device: a running sum per
    metric and the pair count, and the (margin, length difference) of this process's last `window` pairs."""

    def __init__(self, window: int):
        self.window = window
        self.sums: torch.Tensor | None = None  # [len(NAMES) + 1]: each metric's sum, then the pair count
        self.recent: torch.Tensor | None = None  # [window, 2]: margins and length differences, a ring
        self.position = 0  # where the ring's next pair goes
        self.filled = 0  # pairs in the ring

    def add(
        self,
        chosen_rewards: torch.Tensor,
        rejected_rewards: torch.Tensor,
        chosen_logps: torch.Tensor,
        rejected_logps: torch.Tensor,
        chosen_lengths: torch.Tensor,
        rejected_lengths: torch.Tensor,
        keep_recent: bool = True,
    ) -> None:
        """One micro-batch's pairs (1-d tensors, one value a pair), added without reading them."""
        margins = (chosen_rewards - rejected_rewards).detach().float()
        columns = (chosen_rewards, rejected_rewards, margins, margins > 0, chosen_logps, rejected_logps,
                   chosen_lengths, rejected_lengths)  # fmt: skip
        values = torch.stack([column.detach().float() for column in columns])
        batch = torch.cat([values.sum(dim=1), values.new_full((1,), values.shape[1])])
        self.sums = batch if self.sums is None else self.sums + batch
        if keep_recent:
            pairs = torch.stack([margins, (chosen_lengths - rejected_lengths).detach().float()], dim=1)
            self._remember(pairs[-self.window :])

    def _remember(self, pairs: torch.Tensor) -> None:
        if self.recent is None:
            self.recent = pairs.new_zeros((self.window, 2))
        count = pairs.shape[0]  # a shape: known to the host without a read
        first = min(count, self.window - self.position)
        self.recent[self.position : self.position + first] = pairs[:first]
        self.recent[: count - first] = pairs[first:]
        self.position = (self.position + count) % self.window
        self.filled = min(self.window, self.filled + count)

    def summary(self, collective: Collective, device: torch.device, correlation: bool) -> dict[str, float]:
        """The means over every process's pairs since the last summary (and, with `correlation`, the Pearson
        correlation of margin and length difference over every process's recent pairs), then a fresh start of
        the sums. Every process must call it at the same point: it holds an all-reduce (and an all-gather)."""
        sums = self.sums if self.sums is not None else torch.zeros(len(NAMES) + 1, device=device)
        totals = collective.reduce(sums.to(device), reduction="sum").tolist()
        self.sums = None
        count = totals[-1]
        logs = {name: total / count for name, total in zip(NAMES, totals)} if count else {}
        if correlation:
            recent = self.recent if self.recent is not None else torch.zeros((self.window, 2), device=device)
            filled = (torch.arange(self.window, device=recent.device) < self.filled).unsqueeze(1).to(recent.dtype)
            gathered = collective.gather(torch.cat([recent, filled], dim=1).to(device))
            kept = gathered[gathered[:, 2] > 0]
            value = pearson(kept[:, 0], kept[:, 1]) if kept.shape[0] > 2 else None
            if value is not None:
                logs["length/margin_correlation"] = value
        return logs
