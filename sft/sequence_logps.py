"""Per-sequence log-probs for preference training (dpo.py): each row's (or, in packed rows, each sequence's) summed
log-prob of its labelled tokens, through the fused output layer of sft.loss where the run has one.

Three ways through the output layer, chosen per call by what needs a gradient:
- a frozen head (LoRA, the common case): `_FrozenHeadLogps`, whose backward recomputes each chunk's logits for the
  hidden states' gradient inside one `gather` (ZeRO-3 holds the head whole once per backward, not once a chunk);
- a trained head (full fine-tuning): activation checkpointing per chunk, so autograd gives the head's gradient too;
- no gradient (the reference, evaluation): the chunks one after another.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.utils.checkpoint
from torch import nn

from sft.data import IGNORE_INDEX
from sft.loss import CHUNK_LOGITS, FusedLoss, capture_output
from sft.packing_models import BOUNDARY_KEYS

# Logits per chunk here: about 2^23 (32 MiB in fp32). Backward recomputes a chunk's logits and holds a few tensors
# of its size at once; preference batches are small, so smaller chunks cost little speed and much peak memory.
SEQUENCE_CHUNK_LOGITS = 2**23
# What the model's forward takes of a pair batch: packed ones add the varlen boundaries of a flat row.
MODEL_INPUTS = ("input_ids", "attention_mask", "position_ids", *BOUNDARY_KEYS)


def _token_logps(hidden: torch.Tensor, targets: torch.Tensor, head: Callable) -> torch.Tensor:
    logits = head(hidden).float()
    return logits.gather(-1, targets[:, None]).squeeze(-1) - logits.logsumexp(-1)


def _checkpointed_token_logps(hidden: torch.Tensor, targets: torch.Tensor, head: Callable) -> torch.Tensor:
    return torch.utils.checkpoint.checkpoint(_token_logps, hidden, targets, head, use_reentrant=False)


def _by_chunks(function: Callable, hidden: torch.Tensor, targets: torch.Tensor, head: Callable, chunk: int):
    """`function`'s token log-probs of `chunk` positions at a time, joined (at least one position)."""
    return torch.cat([function(hidden[s : s + chunk], targets[s : s + chunk], head)
                      for s in range(0, hidden.shape[0], chunk)])  # fmt: skip


class _FrozenHeadLogps(torch.autograd.Function):
    """Token log-probs through a frozen output layer, a chunk at a time; backward recomputes each chunk's logits
    for the hidden states' gradient, all chunks inside one `gather` (ZeRO-3 holds the layer whole once a pass)."""

    @staticmethod
    def forward(ctx, hidden, targets, head, gather, chunk):
        ctx.head, ctx.gather, ctx.chunk = head, gather, chunk
        ctx.save_for_backward(hidden, targets)
        with gather():
            return _by_chunks(_token_logps, hidden, targets, head, chunk)

    @staticmethod
    def backward(ctx, grad_output):
        hidden, targets = ctx.saved_tensors
        chunk, grads = ctx.chunk, []
        with ctx.gather(), torch.enable_grad():
            for s in range(0, hidden.shape[0], chunk):
                piece = hidden[s : s + chunk].detach().requires_grad_()
                logps = _token_logps(piece, targets[s : s + chunk], ctx.head)
                grads.append(torch.autograd.grad(logps, piece, grad_output[s : s + chunk])[0])
        return torch.cat(grads), None, None, None, None


def sequence_logps(model: nn.Module, batch: dict, fused: FusedLoss | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed log-prob of each row's labelled tokens [rows], their count [rows]) of a padded batch with labels;
    of each sequence instead where the batch has `sequence_index` (packed rows: each token's sequence, -1 for
    padding; sft.packing_pairs), ordered by that index.

    With `fused`, the model runs with `logits_to_keep=1` and the output layer sees only labelled positions, a
    chunk at a time: no `[rows, length, vocabulary]` logits are built, and backward recomputes one chunk's logits at a
    time. Without it, the model's own logits are used."""
    labels = batch["labels"]
    inputs = {key: value for key, value in batch.items() if key in MODEL_INPUTS}
    targets = labels[:, 1:]
    keep = targets.ne(IGNORE_INDEX)
    owners = batch.get("sequence_index")
    if owners is None:
        rows, size, counts = keep.nonzero()[:, 0], labels.shape[0], keep.sum(1)
    else:  # a label belongs to the sequence of the token it is (each sequence's first label is ignored)
        rows, size = owners[:, 1:][keep], int(owners.max()) + 1
        counts = torch.bincount(rows, minlength=size)
    if fused is None:
        logits = model(**inputs, use_cache=False).logits[:, :-1].float()
        token_logps = logits[keep].log_softmax(-1).gather(-1, targets[keep][:, None]).squeeze(-1)
    else:
        with capture_output(fused.decoder) as caught:
            model(**inputs, use_cache=False, logits_to_keep=1)
        selected = caught[0][:, :-1][keep.to(caught[0].device)]
        wanted = targets[keep].to(selected.device)
        head, _ = fused.head_fn()
        chunk = max(16, fused.chunk * SEQUENCE_CHUNK_LOGITS // CHUNK_LOGITS)  # `model` may be wrapped (DDP)
        head_trains = any(p.requires_grad for p in fused.head.parameters())
        if not selected.shape[0]:
            token_logps = selected.new_zeros(0, dtype=torch.float32)
        elif torch.is_grad_enabled() and not head_trains:
            # LoRA: only the hidden states need a gradient; backward gathers a ZeRO-3 head once, not once a chunk.
            token_logps = _FrozenHeadLogps.apply(selected, wanted, head, fused.gather, chunk)
        else:  # the head trains (its gradient from autograd through each chunk, recomputed in backward), or no grad
            piece = _checkpointed_token_logps if torch.is_grad_enabled() else _token_logps
            with fused.gather():
                token_logps = _by_chunks(piece, selected, wanted, head, chunk)
    logps = torch.zeros(size, dtype=torch.float32, device=token_logps.device)
    return logps.index_add(0, rows.to(token_logps.device), token_logps), counts.to(token_logps.device)
