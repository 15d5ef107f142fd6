"""Each preference loss against its paper's formula, and against trl's own loss code where trl has the loss."""

from __future__ import annotations

import math
import os
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from sft.preference_loss import LOSS_TYPES, pearson, preference_loss

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

BETA = 0.3


@pytest.fixture
def pairs():
    """Four pairs of summed answer log-probs (policy and reference) and answer lengths."""
    generator = torch.Generator().manual_seed(0)
    lengths_c = torch.tensor([3, 5, 2, 7])
    lengths_r = torch.tensor([4, 1, 6, 2])
    per_token = [-torch.rand(4, 7, generator=generator) * 3 for _ in range(4)]
    mask_c = torch.arange(7) < lengths_c[:, None]
    mask_r = torch.arange(7) < lengths_r[:, None]
    return SimpleNamespace(
        tokens=per_token,  # per-token log-probs: policy chosen, policy rejected, reference chosen, reference rejected
        mask_c=mask_c,
        mask_r=mask_r,
        lengths_c=lengths_c,
        lengths_r=lengths_r,
        c=(per_token[0] * mask_c).sum(1),
        r=(per_token[1] * mask_r).sum(1),
        ref_c=(per_token[2] * mask_c).sum(1),
        ref_r=(per_token[3] * mask_r).sum(1),
    )


def ours(p, loss_type, **options):
    return preference_loss(loss_type, p.c, p.r, p.lengths_c, p.lengths_r, p.ref_c, p.ref_r, beta=BETA, **options)


def sigma(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def test_each_loss_is_its_papers_formula(pairs):
    p = pairs
    for k in range(4):
        c, r, rc, rr = p.c[k].item(), p.r[k].item(), p.ref_c[k].item(), p.ref_r[k].item()
        lc, lr = p.lengths_c[k].item(), p.lengths_r[k].item()
        h = (c - rc) - (r - rr)
        eps = 0.2
        expected = {
            "sigmoid": -math.log(sigma(BETA * h)),
            "robust": ((1 - eps) * -math.log(sigma(BETA * h)) - eps * -math.log(sigma(-BETA * h))) / (1 - 2 * eps),
            "hinge": max(0.0, 1 - BETA * h),
            "ipo": (((c - rc) / lc - (r - rr) / lr) - 1 / (2 * BETA)) ** 2,
            "simpo": -math.log(sigma(BETA * (c / lc - r / lr) - 0.7)),
            "orpo": -BETA
            * math.log(
                sigma(math.log(math.exp(c / lc) / (1 - math.exp(c / lc)) / (math.exp(r / lr) / (1 - math.exp(r / lr)))))
            ),
        }
        for loss_type in LOSS_TYPES:
            result = ours(p, loss_type, label_smoothing=eps, simpo_gamma=0.7)
            assert result.losses[k].item() == pytest.approx(expected[loss_type], rel=1e-5), loss_type


def test_rewards_and_sft_term(pairs):
    p = pairs
    dpo = ours(p, "sigmoid")
    torch.testing.assert_close(dpo.chosen_rewards, BETA * (p.c - p.ref_c))
    torch.testing.assert_close(dpo.rejected_rewards, BETA * (p.r - p.ref_r))
    nll = -p.c.sum() / p.lengths_c.sum()
    assert ours(p, "sigmoid", sft_weight=0.5).loss.item() == pytest.approx(dpo.loss.item() + 0.5 * nll.item())
    orpo = ours(p, "orpo")  # ORPO carries its own NLL term
    assert orpo.loss.item() == pytest.approx(orpo.losses.mean().item() + nll.item(), rel=1e-6)
    simpo = ours(p, "simpo")
    torch.testing.assert_close(simpo.chosen_rewards, BETA * p.c / p.lengths_c)


def test_policy_equal_to_reference_gives_ln2_and_zero_rewards(pairs):
    p = pairs
    result = preference_loss("sigmoid", p.c, p.r, p.lengths_c, p.lengths_r, p.c.clone(), p.r.clone(), beta=BETA)
    assert result.loss.item() == pytest.approx(math.log(2))
    assert result.chosen_rewards.abs().max().item() == 0 and result.rejected_rewards.abs().max().item() == 0


def test_reference_is_required_where_the_loss_has_one(pairs):
    with pytest.raises(ValueError, match="reference"):
        preference_loss("sigmoid", pairs.c, pairs.r, pairs.lengths_c, pairs.lengths_r)
    with pytest.raises(ValueError, match="unknown loss type"):
        preference_loss("kto", pairs.c, pairs.r, pairs.lengths_c, pairs.lengths_r)


def trl_dpo_loss(p, loss_type: str, label_smoothing: float = 0.0, sft: bool = False) -> torch.Tensor:
    """trl's DPOTrainer._compute_loss itself, on these per-token log-probs given as the model's output and the
    reference's as precomputed values (its `self` holds only the settings the loss reads)."""
    from trl.trainer.dpo_trainer import DPOTrainer

    tokens = torch.cat([p.tokens[0], p.tokens[1]])
    # trl's completion mask is over input positions; its per-token log-probs are over the shifted ones.
    shifted = torch.cat([p.mask_c, p.mask_r]).long()
    completion_mask = torch.cat([torch.zeros(8, 1, dtype=torch.long), shifted], dim=1)
    width = tokens.shape[1]
    outputs = SimpleNamespace(
        log_probs=tokens * shifted,
        entropy=torch.zeros(8, width),
        mean_logits=torch.zeros(8, width),
        is_top1=torch.zeros(8, width, dtype=torch.bool),
        log_sum_sq_probs=torch.zeros(8, width),
    )
    accelerator = SimpleNamespace(device=torch.device("cpu"), gather=lambda x: x, gather_for_metrics=lambda x: x)
    settings = SimpleNamespace(
        model=SimpleNamespace(training=True),
        accelerator=accelerator,
        aux_loss_enabled=False,
        ld_alpha=None,
        precompute_ref_logps=True,
        f_divergence_type="reverse_kl",
        loss_types=[loss_type] + (["sft"] if sft else []),
        loss_weights=[1.0] + ([1.0] if sft else []),
        beta=BETA,
        label_smoothing=label_smoothing,
        use_weighting=False,
        _metrics=defaultdict(lambda: defaultdict(list)),
        _total_train_tokens=0,
        _tp_size=1,
    )
    inputs = {
        "input_ids": torch.zeros(8, width + 1, dtype=torch.long),
        "attention_mask": torch.ones(8, width + 1, dtype=torch.long),
        "completion_mask": completion_mask,
        "ref_chosen_logps": p.ref_c,
        "ref_rejected_logps": p.ref_r,
    }
    return DPOTrainer._compute_loss(settings, lambda **_: outputs, inputs, return_outputs=False)


@pytest.mark.parametrize("loss_type", ["sigmoid", "robust", "hinge", "ipo"])
def test_reference_losses_equal_trls(pairs, loss_type):
    options = {"label_smoothing": 0.2} if loss_type == "robust" else {}
    expected = trl_dpo_loss(pairs, loss_type, **options)
    assert ours(pairs, loss_type, **options).loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_sft_term_equals_trls(pairs):
    expected = trl_dpo_loss(pairs, "sigmoid", sft=True)
    assert ours(pairs, "sigmoid", sft_weight=1.0).loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_simpo_equals_trls_cpo_simpo(pairs):
    from trl.experimental.cpo.cpo_trainer import CPOTrainer

    p = pairs
    settings = SimpleNamespace(
        alpha=0.0,
        loss_type="simpo",
        simpo_gamma=0.7,
        beta=BETA,
        label_smoothing=0.0,
        accelerator=SimpleNamespace(device=torch.device("cpu")),
    )
    losses, chosen_rewards, _ = CPOTrainer.cpo_loss(settings, p.c / p.lengths_c, p.r / p.lengths_r)
    result = ours(p, "simpo", simpo_gamma=0.7)
    torch.testing.assert_close(result.losses, losses)
    torch.testing.assert_close(result.chosen_rewards, chosen_rewards)


def test_orpo_odds_term_equals_trls(pairs):
    from trl.experimental.orpo.orpo_trainer import ORPOTrainer

    p = pairs
    settings = SimpleNamespace(beta=BETA, accelerator=SimpleNamespace(device=torch.device("cpu")))
    trl_terms = ORPOTrainer.odds_ratio_loss(settings, p.c / p.lengths_c, p.r / p.lengths_r)[0]
    torch.testing.assert_close(ours(p, "orpo").losses, -trl_terms)  # trl subtracts its term from the NLL


def test_pearson():
    assert pearson(torch.tensor([1.0, 2, 3]), torch.tensor([2.0, 4, 6])) == pytest.approx(1.0)
    assert pearson(torch.tensor([1.0, 2, 3]), torch.tensor([3.0, 2, 1])) == pytest.approx(-1.0)
    assert pearson(torch.tensor([1.0, 1]), torch.tensor([0.0, 2])) is None
    assert pearson(torch.tensor([1.0]), torch.tensor([2.0])) is None
