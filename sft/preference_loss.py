"""Preference losses as pure functions: per-answer log-probs in, the loss and each answer's reward out.

Every answer's log-prob is the sum over its trained tokens (`sft.sequence_logps`), its length the number of
those tokens. The losses (`--loss_type`):

- sigmoid: DPO (Rafailov et al. 2023, eq. 7): -log sigmoid(beta * (chosen log-ratio - rejected log-ratio)), a
  log-ratio being the policy's log-prob minus the reference's;
- robust: robust DPO (Chowdhury et al. 2024, eq. 11), the sigmoid loss unbiased for labels flipped with
  probability `label_smoothing`;
- hinge: SLiC's hinge on the same margin (Zhao et al. 2023): max(0, 1 - beta * margin);
- ipo: IPO (Azar et al. 2023, eq. 17), (margin - 1 / (2 beta))^2, on log-ratios averaged per answer token (the
  form the IPO authors' results use; a summed margin would grow with the answers' length);
- simpo: SimPO (Meng et al. 2024, eq. 6), reference-free: -log sigmoid(beta * (mean chosen log-prob - mean
  rejected log-prob) - gamma);
- orpo: ORPO (Hong et al. 2024, eqs. 6-7), reference-free: the chosen answer's per-token NLL minus
  beta * log sigmoid(log odds ratio of the mean per-token probabilities).

Rewards are beta * log-ratio for the losses with a reference, beta * mean log-prob for the reference-free ones.
`sft_weight` adds that weight times the chosen answers' per-token NLL (RPO, Pang et al. 2024) to any loss.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

LOSS_TYPES = ("sigmoid", "robust", "hinge", "ipo", "simpo", "orpo")
REFERENCE_FREE = frozenset({"simpo", "orpo"})


@dataclass
class PreferenceLoss:
    loss: torch.Tensor  # the batch's loss, a scalar
    losses: torch.Tensor  # each pair's preference term, [pairs]
    chosen_rewards: torch.Tensor  # detached, [pairs]
    rejected_rewards: torch.Tensor


def needs_reference(loss_type: str) -> bool:
    return loss_type not in REFERENCE_FREE


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, accurate near both 0 and -inf (Maechler 2012)."""
    return torch.where(x > -0.6931471805599453, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def sigmoid_loss(margin: torch.Tensor, beta: float) -> torch.Tensor:
    return -F.logsigmoid(beta * margin)


def robust_loss(margin: torch.Tensor, beta: float, label_smoothing: float) -> torch.Tensor:
    eps = label_smoothing
    return ((1 - eps) * -F.logsigmoid(beta * margin) - eps * -F.logsigmoid(-beta * margin)) / (1 - 2 * eps)


def hinge_loss(margin: torch.Tensor, beta: float) -> torch.Tensor:
    return torch.relu(1 - beta * margin)


def ipo_loss(mean_margin: torch.Tensor, beta: float) -> torch.Tensor:
    return (mean_margin - 1 / (2 * beta)) ** 2


def simpo_loss(chosen_mean: torch.Tensor, rejected_mean: torch.Tensor, beta: float, gamma: float) -> torch.Tensor:
    return -F.logsigmoid(beta * (chosen_mean - rejected_mean) - gamma)


def orpo_odds_term(chosen_mean: torch.Tensor, rejected_mean: torch.Tensor, beta: float) -> torch.Tensor:
    """-beta * log sigmoid(log odds(chosen) - log odds(rejected)), odds(y) = p / (1 - p), p the mean per-token
    probability exp(mean log-prob)."""
    log_odds = (chosen_mean - rejected_mean) - (log1mexp(chosen_mean) - log1mexp(rejected_mean))
    return -beta * F.logsigmoid(log_odds)


def preference_loss(
    loss_type: str,
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    chosen_lengths: torch.Tensor,
    rejected_lengths: torch.Tensor,
    ref_chosen_logps: torch.Tensor | None = None,
    ref_rejected_logps: torch.Tensor | None = None,
    *,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    simpo_gamma: float = 0.5,
    sft_weight: float = 0.0,
) -> PreferenceLoss:
    """The loss of a batch of pairs from their summed log-probs ([pairs] each) and token counts."""
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"unknown loss type {loss_type!r} (expected one of: {', '.join(LOSS_TYPES)})")
    chosen_logps, rejected_logps = chosen_logps.float(), rejected_logps.float()
    chosen_lengths = chosen_lengths.to(chosen_logps).clamp(min=1)
    rejected_lengths = rejected_lengths.to(chosen_logps).clamp(min=1)
    chosen_nll = -chosen_logps.sum() / chosen_lengths.sum()  # per token over the batch's chosen answers
    if loss_type in REFERENCE_FREE:
        chosen_mean, rejected_mean = chosen_logps / chosen_lengths, rejected_logps / rejected_lengths
        if loss_type == "simpo":
            losses = simpo_loss(chosen_mean, rejected_mean, beta, simpo_gamma)
            extra = 0.0
        else:
            losses = orpo_odds_term(chosen_mean, rejected_mean, beta)
            extra = chosen_nll  # ORPO's own SFT term
        chosen_rewards, rejected_rewards = beta * chosen_mean, beta * rejected_mean
    else:
        if ref_chosen_logps is None or ref_rejected_logps is None:
            raise ValueError(f"the {loss_type} loss needs the reference model's log-probs")
        chosen_ratios = chosen_logps - ref_chosen_logps.float()
        rejected_ratios = rejected_logps - ref_rejected_logps.float()
        margin = chosen_ratios - rejected_ratios
        if loss_type == "sigmoid":
            losses = sigmoid_loss(margin, beta)
        elif loss_type == "robust":
            losses = robust_loss(margin, beta, label_smoothing)
        elif loss_type == "hinge":
            losses = hinge_loss(margin, beta)
        else:
            losses = ipo_loss(chosen_ratios / chosen_lengths - rejected_ratios / rejected_lengths, beta)
        extra = 0.0
        chosen_rewards, rejected_rewards = beta * chosen_ratios, beta * rejected_ratios
    loss = losses.mean() + extra
    if sft_weight:
        loss = loss + sft_weight * chosen_nll
    return PreferenceLoss(loss, losses, chosen_rewards.detach(), rejected_rewards.detach())


def pearson(x: torch.Tensor, y: torch.Tensor) -> float | None:
    """Pearson correlation of two 1-d tensors; None where either is constant or there are fewer than 2 values."""
    x, y = x.double().flatten(), y.double().flatten()
    if x.numel() < 2:
        return None
    x, y = x - x.mean(), y - y.mean()
    denominator = (x.norm() * y.norm()).item()
    return None if denominator == 0 else (x @ y).item() / denominator
