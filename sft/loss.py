"""The training loss without the logits: output layer and cross-entropy fused, in chunks of trained positions.

A causal LM's plain loss builds `[tokens x vocabulary]` logits, upcasts them to fp32 and keeps them and their
gradient until backward: at Qwen's 151,936-token vocabulary that is most of a small model's training memory, and
prompt tokens, which carry no loss, pay for it too. Here the model runs with `logits_to_keep=1` (its output layer
sees one position per row), the decoder's last hidden states are caught by a forward hook, and
`FusedLinearCrossEntropy`:

- keeps only positions whose (shifted) label is not -100;
- goes through them in chunks: each chunk's logits, loss and gradients (w.r.t. the hidden states and the output
  layer's trained parameters) are computed at once in the forward pass, then dropped;
- saves only those gradients; backward scales them by the incoming gradient. Nothing is recomputed.

Logit scaling and soft-capping are applied as the model's own forward applies them (`LOGIT_TRANSFORMS`, per model
type). A set-up the fused loss cannot honour keeps the plain path, and `fused_loss_for` logs why, once.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from sft.data import IGNORE_INDEX

logger = logging.getLogger(__name__)

# What each known model type's CausalLM forward does to the output layer's result before the loss: "none",
# "softcap" (config.final_logit_softcapping: tanh(z / c) * c) or "scale" (z * config.logit_scale). Another model
# type may do something else there, so it keeps the plain path.
LOGIT_TRANSFORMS = {
    "qwen2": "none",
    "qwen3": "none",
    "qwen2_moe": "none",
    "qwen3_moe": "none",
    "llama": "none",
    "mistral": "none",
    "mixtral": "none",
    "phi3": "none",
    "gemma": "none",
    "gemma2": "softcap",
    "gemma3_text": "softcap",
    "cohere": "scale",
    "cohere2": "scale",
}

# Positions per chunk: about 2^25 logits (128 MiB in fp32) per chunk, within these bounds.
CHUNK_LOGITS = 2**25
MIN_CHUNK, MAX_CHUNK = 64, 4096


def chunk_positions(vocab_size: int) -> int:
    """Positions per chunk for a vocabulary: large enough for efficient matrix multiplies, small enough that one
    chunk's logits and their gradient stay around 128 MiB each."""
    return max(MIN_CHUNK, min(MAX_CHUNK, CHUNK_LOGITS // max(vocab_size, 1)))


class FusedLinearCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of `head(hidden)` against `targets`, with every gradient computed chunk by chunk in
    forward. `params` are the head's trained parameters (autograd returns their gradients to them)."""

    @staticmethod
    def forward(ctx, hidden, targets, head: Callable, chunk: int, *params):
        wants_hidden = hidden.requires_grad
        trained = [p for p in params if p.requires_grad]
        grad_hidden = torch.zeros_like(hidden) if wants_hidden else None
        # Parameter gradients add up over chunks in fp32 (one bf16 matrix multiply accumulates in fp32, too).
        grad_params = [torch.zeros_like(p, dtype=torch.float32) for p in trained]
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, hidden.shape[0], chunk):
            piece = hidden[start : start + chunk].detach().requires_grad_(wants_hidden)
            inputs = ([piece] if wants_hidden else []) + trained
            with torch.enable_grad() if inputs else nullcontext():
                loss = F.cross_entropy(head(piece).float(), targets[start : start + chunk], reduction="sum")
                grads = torch.autograd.grad(loss, inputs) if inputs else []
            total += loss.detach()
            if wants_hidden:
                grad_hidden[start : start + chunk] = grads[0]
                grads = grads[1:]
            for accumulated, grad in zip(grad_params, grads):
                accumulated += grad
        ctx.has_hidden_grad = wants_hidden
        ctx.trained_mask = [p.requires_grad for p in params]
        ctx.save_for_backward(*([grad_hidden] if wants_hidden else []), *grad_params)
        ctx.param_dtypes = [p.dtype for p in trained]
        return total

    @staticmethod
    def backward(ctx, grad_output):
        saved = list(ctx.saved_tensors)
        grad_hidden = None
        if ctx.has_hidden_grad:
            saved_hidden = saved.pop(0)
            grad_hidden = saved_hidden * grad_output.to(saved_hidden.dtype)
        trained_grads = iter(
            (grad * grad_output).to(dtype) for grad, dtype in zip(saved, ctx.param_dtypes, strict=True)
        )
        grad_params = [next(trained_grads) if is_trained else None for is_trained in ctx.trained_mask]
        return grad_hidden, None, None, None, *grad_params


@dataclass
class FusedLoss:
    """The fused loss of one model, decided once (`fused_loss_for`); call it in place of `model(**inputs)`."""

    decoder: nn.Module  # its forward returns the last hidden states (after the final norm)
    head: nn.Module  # the output layer (a plain Linear, or a wrapper whose forward is used chunk by chunk)
    transform: str  # one of LOGIT_TRANSFORMS' values
    factor: float | None  # the soft-cap or the scale
    chunk: int
    gather: Callable[[], object] = nullcontext  # a context that holds the head's weights whole (ZeRO-3)

    def head_fn(self) -> tuple[Callable[[torch.Tensor], torch.Tensor], list[nn.Parameter]]:
        if type(self.head) is nn.Linear:  # direct: no module hooks per chunk (ZeRO-3 gathers it once, outside)
            weight, bias = self.head.weight, self.head.bias
            params = [weight] + ([bias] if bias is not None else [])

            def linear(h):
                return F.linear(h, weight, bias)
        else:
            params = [p for p in self.head.parameters() if p.requires_grad]
            linear = self.head
        if self.transform == "softcap":
            cap = self.factor

            def head(h):  # as Gemma-2's forward: in the model's dtype, before the loss upcasts
                return torch.tanh(linear(h) / cap) * cap
        elif self.transform == "scale":
            scale = self.factor

            def head(h):
                return linear(h) * scale
        else:
            head = linear
        return head, params

    def __call__(self, model: nn.Module, inputs: dict, num_items_in_batch=None):
        """(loss, outputs) of `model` (the wrapped one the Trainer calls) on a batch with labels: the mean loss
        over trained tokens, or their sum divided by `num_items_in_batch` when given (as ForCausalLMLoss)."""
        inputs = dict(inputs)
        labels = inputs.pop("labels")
        with capture_output(self.decoder) as caught:
            outputs = model(**inputs, logits_to_keep=1)
        hidden = caught[0]
        # Position t predicts label t + 1; each row's last position predicts nothing (packed rows carry -100 at
        # every sample's first token, so no position predicts across samples).
        targets = labels[:, 1:].to(hidden.device)
        keep = targets.ne(IGNORE_INDEX)
        selected = hidden[:, :-1][keep]
        head, params = self.head_fn()
        if not torch.is_grad_enabled():
            params = []  # evaluation: the loss alone
        with self.gather():
            total = FusedLinearCrossEntropy.apply(selected, targets[keep], head, self.chunk, *params)
        if num_items_in_batch is None:
            loss = total / keep.sum()
        else:
            if torch.is_tensor(num_items_in_batch):
                num_items_in_batch = num_items_in_batch.to(total.device)
            loss = total / num_items_in_batch
        return loss, outputs


@contextmanager
def capture_output(module: nn.Module):
    """Catches `module`'s last hidden states while the context is open."""
    caught: list[torch.Tensor] = []

    def hook(_module, _args, output):
        caught.append(output[0] if isinstance(output, tuple) else output.last_hidden_state)

    handle = module.register_forward_hook(hook)
    try:
        yield caught
    finally:
        handle.remove()


def causal_lm(model: nn.Module) -> nn.Module:
    """The transformers CausalLM inside a peft model, or the model itself."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def plain_reason(model: nn.Module, *, zero3: bool = False, fsdp: bool = False, liger: bool = False) -> str | None:
    """Why `model` must keep the plain loss, or None when the fused loss serves it exactly."""
    if liger:
        return "--use_liger_kernel: Liger's fused loss is used instead"
    if fsdp:
        return "FSDP shards the output layer, and the fused loss does not gather it"
    lm = causal_lm(model)
    config = getattr(lm, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in LOGIT_TRANSFORMS:
        return f"model type {model_type!r} is not one whose logits the fused loss knows how to reproduce"
    if getattr(config, "output_router_logits", False):
        return "the model adds a router auxiliary loss to its loss"
    get_decoder = getattr(lm, "get_decoder", None)
    head = lm.get_output_embeddings() if hasattr(lm, "get_output_embeddings") else None
    if not callable(get_decoder) or head is None:
        return f"{type(lm).__name__} has no separate decoder and output layer"
    if zero3 and (type(head) is not nn.Linear or any(p.requires_grad for p in head.parameters())):
        return "under ZeRO-3 it serves only a frozen plain output layer (LoRA without modules_to_save)"
    return None


def fused_loss_for(
    model: nn.Module, *, zero3: bool = False, fsdp: bool = False, liger: bool = False, enabled: bool = True
) -> FusedLoss | None:
    """The fused loss for `model`, or None (the plain path) with one log line saying why. Decide once, at set-up."""
    if not enabled:
        logger.info("Loss: plain (--fused_loss false)")
        return None
    reason = plain_reason(model, zero3=zero3, fsdp=fsdp, liger=liger)
    if reason:
        logger.info("Loss: plain, not fused: %s", reason)
        return None
    lm = causal_lm(model)
    config = lm.config
    transform = LOGIT_TRANSFORMS[config.model_type]
    factor = None
    if transform == "softcap":
        factor = getattr(config, "final_logit_softcapping", None)
        transform = "softcap" if factor is not None else "none"
    elif transform == "scale":
        factor = lm.logit_scale  # as the forward reads it (cohere sets it from config.logit_scale)
    head = lm.get_output_embeddings()
    gather = nullcontext
    if zero3:
        import deepspeed

        def gather():  # once around the whole loss; read-only (the head is frozen here)
            return deepspeed.zero.GatheredParameters(list(head.parameters()), modifier_rank=None)

    chunk = chunk_positions(config.get_text_config().vocab_size)
    logger.info("Loss: fused output layer and cross-entropy, %d trained positions per chunk", chunk)
    return FusedLoss(lm.get_decoder(), head, transform, factor, chunk, gather)


def causal_lm_loss(model: nn.Module, batch: dict, fused: FusedLoss | None, num_items_in_batch=None):
    """`model(**batch).loss` for a hand-written loop (e.g. bench/gpu_profile.py), fused when `fused` (from
    `fused_loss_for(model)`, decided once) is given, the model's own loss when it is None."""
    if fused is None:
        return model(**batch).loss
    return fused(model, batch, num_items_in_batch)[0]


# ---- per-sequence log-probs (preference training, dpo.py) ----

# Logits per chunk here: about 2^23 (32 MiB in fp32). Backward recomputes a chunk's logits and holds a few tensors
# of its size at once; preference batches are small, so smaller chunks cost little speed and much peak memory.
SEQUENCE_CHUNK_LOGITS = 2**23


def _token_logps(hidden: torch.Tensor, targets: torch.Tensor, head: Callable) -> torch.Tensor:
    logits = head(hidden).float()
    return logits.gather(-1, targets[:, None]).squeeze(-1) - logits.logsumexp(-1)


def sequence_logps(model: nn.Module, batch: dict, fused: FusedLoss | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed log-prob of each row's labelled tokens [rows], their count [rows]) of a padded batch with labels.

    With `fused`, the model runs with `logits_to_keep=1` and the output layer sees only labelled positions, a
    chunk at a time under activation checkpointing: no `[rows, length, vocabulary]` logits are built, and backward
    recomputes one chunk's logits at a time. Without it, the model's own logits are used."""
    import torch.utils.checkpoint

    labels = batch["labels"]
    inputs = {key: value for key, value in batch.items() if key in ("input_ids", "attention_mask", "position_ids")}
    targets = labels[:, 1:]
    keep = targets.ne(IGNORE_INDEX)
    rows = keep.nonzero()[:, 0]
    counts = keep.sum(1)
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
        pieces = []
        with fused.gather():
            for start in range(0, selected.shape[0], chunk):
                piece, piece_targets = selected[start : start + chunk], wanted[start : start + chunk]
                if torch.is_grad_enabled():
                    pieces.append(
                        torch.utils.checkpoint.checkpoint(_token_logps, piece, piece_targets, head, use_reentrant=False)
                    )
                else:
                    pieces.append(_token_logps(piece, piece_targets, head))
        token_logps = torch.cat(pieces) if pieces else selected.new_zeros(0, dtype=torch.float32)
    logps = torch.zeros(labels.shape[0], dtype=torch.float32, device=token_logps.device)
    return logps.index_add(0, rows.to(token_logps.device), token_logps), counts.to(token_logps.device)
