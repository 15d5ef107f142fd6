"""The training loss without the logits: output layer and cross-entropy fused, in fixed-shape chunks of positions.

A causal LM's plain loss builds `[tokens x vocabulary]` logits, upcasts them to fp32 and keeps them and their
gradient until backward: at a 151,936 to 248,320-token vocabulary that is most of a small model's training memory.
Here the model runs with `logits_to_keep=1` (its output layer sees one position per row), the decoder's last hidden
states are caught by a forward hook, and `FusedLinearCrossEntropy`:

- goes through the positions in chunks of one fixed size (the last chunk overlaps the one before it, its already
  counted positions ignored; fewer positions than a chunk are padded to one), with the shifted labels' -100
  ignored by the cross-entropy: no boolean-mask indexing, so no data-dependent shapes. On an accelerator all
  `rows x length` positions go through, as knowing how many are trained would stall the host until the device
  caught up; on the CPU, where reading that count waits for nothing, only the chunks holding the trained
  positions (moved to the front) do (`FusedLoss.compact`, decided at the first call, logged by the check);
- computes each chunk's logits, loss and gradients (w.r.t. the hidden states and the output layer's trained
  parameters) at once in the forward pass, then drops the logits;
- saves only those gradients; backward scales them by the incoming gradient. Nothing is recomputed.

Which models it serves is decided once, never from a list of model types: `fused_loss_for` takes the output layer
(`get_output_embeddings`) and the decoder (`get_decoder`: a multimodal model's language model) and the logit
transforms the config declares (final soft-capping, a logit scale, `logits_scaling`, which some families multiply
by and others divide by, then none); `check_fused_loss` compares each candidate with the model's own
`model(**batch).loss` on the first real batch, in eval mode (no dropout), and keeps the first that matches within
`loss_tolerance`. A router auxiliary loss the model returns is added as its own loss adds it. A model that matches
no candidate, or a set-up the fused loss cannot honour, keeps the plain path, with its reason logged once.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from sft.data import IGNORE_INDEX

logger = logging.getLogger(__name__)

# Positions per chunk: about 2^24 logits (64 MiB in fp32) per chunk, within these bounds.
CHUNK_LOGITS = 2**24
MIN_CHUNK, MAX_CHUNK = 64, 4096
# The check's batch is cut to about as many logits as a chunk's: the model's own loss builds them whole, and the
# check should cost no more memory than the fused loss's chunks.
CHECK_LOGITS = CHUNK_LOGITS

Transform = tuple[str, float | None]  # ("none", None), ("softcap", c), ("scale", s) or ("divide", d)


def chunk_positions(vocab_size: int) -> int:
    """Positions per chunk for a vocabulary: large enough for efficient matrix multiplies, small enough that one
    chunk's logits and their gradient stay around 64 MiB each."""
    return max(MIN_CHUNK, min(MAX_CHUNK, CHUNK_LOGITS // max(vocab_size, 1)))


def chunk_starts(positions: int, chunk: int) -> list[tuple[int, int]]:
    """(start, first counted offset) of each chunk of `chunk` positions covering `positions` >= `chunk`: the last
    chunk ends at the end and overlaps the one before it, whose positions it does not count again."""
    starts = [(start, 0) for start in range(0, positions - chunk + 1, chunk)]
    if positions % chunk:
        last = positions - chunk
        starts.append((last, starts[-1][0] + chunk - last))
    return starts


class FusedLinearCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of `head(hidden)` against `targets` (-100 ignored), with every gradient computed chunk
    by chunk in forward, every chunk `chunk` positions. `params` are the head's trained parameters (autograd
    returns their gradients to them)."""

    @staticmethod
    def forward(ctx, hidden, targets, head: Callable, chunk: int, *params):
        positions = hidden.shape[0]
        wants_hidden = hidden.requires_grad
        trained = [p for p in params if p.requires_grad]
        states = hidden.detach()
        if positions < chunk:  # one chunk of the usual shape, its padding ignored
            states = F.pad(states, (0, 0, 0, chunk - positions))
            targets = F.pad(targets, (0, chunk - positions), value=IGNORE_INDEX)
        grad_hidden = torch.zeros_like(states) if wants_hidden else None
        # Parameter gradients add up over chunks in fp32 (one bf16 matrix multiply accumulates in fp32, too).
        grad_params = [torch.zeros_like(p, dtype=torch.float32) for p in trained]
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start, counted in chunk_starts(states.shape[0], chunk):
            piece = states[start : start + chunk].detach().requires_grad_(wants_hidden)
            piece_targets = targets[start : start + chunk]
            if counted:
                piece_targets = piece_targets.clone()
                piece_targets[:counted] = IGNORE_INDEX
            inputs = ([piece] if wants_hidden else []) + trained
            with torch.enable_grad() if inputs else nullcontext():
                logits = head(piece).float()
                loss = F.cross_entropy(logits, piece_targets, ignore_index=IGNORE_INDEX, reduction="sum")
                grads = torch.autograd.grad(loss, inputs) if inputs else []
            total += loss.detach()
            if wants_hidden:
                grad_hidden[start : start + chunk] += grads[0]  # ignored positions add zeros
                grads = grads[1:]
            for accumulated, grad in zip(grad_params, grads):
                accumulated += grad
        ctx.has_hidden_grad = wants_hidden
        ctx.trained_mask = [p.requires_grad for p in params]
        ctx.save_for_backward(*([grad_hidden[:positions]] if wants_hidden else []), *grad_params)
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
    """The fused loss of one model, decided once (`fused_loss_for`, then `check_fused_loss` on a real batch); call
    it in place of `model(**inputs)`."""

    decoder: nn.Module  # its forward returns the last hidden states (after the final norm)
    head: nn.Module  # the output layer (a plain Linear, or a wrapper whose forward is used chunk by chunk)
    transform: str  # "none", "softcap", "scale" or "divide"
    factor: float | None  # the soft-cap, the scale or the divisor
    chunk: int
    gather: Callable[[], object] = nullcontext  # a context that holds the head's weights whole (ZeRO-3)
    aux_loss_coef: float | None = None  # the router auxiliary loss's weight in the model's own loss
    candidates: list[Transform] = field(default_factory=list)  # the transforms the config declares, then none
    vocab_size: int = 0
    # Which positions go through the output layer (decided at the first call, from the device, logged by the check):
    # on the CPU only the trained ones, moved to the front (reading their count there waits for nothing); on an
    # accelerator all of them, ignored ones included, as reading the count would wait for the device's queue.
    compact: bool | None = None

    def head_fn(self) -> tuple[Callable[[torch.Tensor], torch.Tensor], list[nn.Parameter]]:
        if type(self.head) is nn.Linear:  # direct: no module hooks per chunk (ZeRO-3 gathers it once, outside)
            weight, bias = self.head.weight, self.head.bias
            params = [weight] + ([bias] if bias is not None else [])

            def linear(h):
                return F.linear(h, weight, bias)
        else:
            params = [p for p in self.head.parameters() if p.requires_grad]
            linear = self.head
        factor = self.factor
        # In the model's dtype, before the loss upcasts, as the models' forwards apply them.
        if self.transform == "softcap":

            def head(h):
                return torch.tanh(linear(h) / factor) * factor
        elif self.transform == "scale":

            def head(h):
                return linear(h) * factor
        elif self.transform == "divide":

            def head(h):
                return linear(h) / factor
        else:
            head = linear
        return head, params

    def describe(self) -> str:
        if self.transform == "none":
            return "logits as the output layer gives them"
        how = {"softcap": "soft-capped at", "scale": "multiplied by", "divide": "divided by"}[self.transform]
        return f"logits {how} {self.factor:g}"

    def __call__(self, model: nn.Module, inputs: dict, num_items_in_batch=None):
        """(loss, outputs) of `model` (the wrapped one the Trainer calls) on a batch with labels: the mean loss
        over trained tokens, or their sum divided by `num_items_in_batch` when given (as ForCausalLMLoss), plus
        the router auxiliary loss the model returns, weighted as its own loss weighs it."""
        inputs = dict(inputs)
        labels = inputs.pop("labels")
        with capture_output(self.decoder) as caught:
            outputs = model(**inputs, logits_to_keep=1)
        hidden = caught[0]
        # Position t predicts label t + 1; each row's last position predicts nothing (packed rows carry -100 at
        # every sample's first token, so no position predicts across samples). Ignored labels stay in as -100:
        # the chunks' shape is the same whatever the labels.
        labels = labels.to(hidden.device)
        targets = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX).reshape(-1)
        states = hidden.reshape(-1, hidden.shape[-1])
        trained = targets.ne(IGNORE_INDEX).sum()  # a tensor: no host sync
        if self.compact is None:
            self.compact = hidden.device.type == "cpu"
        if self.compact:
            states, targets = trained_first(states, targets, int(trained), self.chunk)
        head, params = self.head_fn()
        if not torch.is_grad_enabled():
            params = []  # evaluation: the loss alone
        with self.gather():
            total = FusedLinearCrossEntropy.apply(states, targets, head, self.chunk, *params)
        if num_items_in_batch is None:
            loss = total / trained
        else:
            if torch.is_tensor(num_items_in_batch):
                num_items_in_batch = num_items_in_batch.to(total.device)
            loss = total / num_items_in_batch
        aux_loss = getattr(outputs, "aux_loss", None)
        if aux_loss is not None and self.aux_loss_coef is not None:
            loss = loss + self.aux_loss_coef * aux_loss.to(loss.device)
        return loss, outputs


def trained_first(states: torch.Tensor, targets: torch.Tensor, trained: int, chunk: int):
    """The positions of whole chunks that hold the `trained` positions, these first (a stable sort keeps their
    order): the chunks keep their one shape, and the ignored positions past them are not computed."""
    order = torch.argsort(targets.eq(IGNORE_INDEX).to(torch.int8), stable=True)
    keep = order[: min(targets.shape[0], -(-trained // chunk) * chunk)]
    return states.index_select(0, keep), targets.index_select(0, keep)


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
    """Why `model` must keep the plain loss whatever its logits, or None when the fused loss may serve it (the
    check on a real batch, `check_fused_loss`, decides)."""
    if liger:
        return "--use_liger_kernel: Liger's fused loss is used instead"
    if fsdp:
        return "FSDP shards the output layer, and the fused loss does not gather it"
    lm = causal_lm(model)
    head = lm.get_output_embeddings() if hasattr(lm, "get_output_embeddings") else None
    if head is None or decoder_of(lm) is None:
        return f"{type(lm).__name__} has no separate decoder and output layer"
    if zero3 and (type(head) is not nn.Linear or any(p.requires_grad for p in head.parameters())):
        return "under ZeRO-3 it serves only a frozen plain output layer (LoRA without modules_to_save)"
    return None


def decoder_of(lm: nn.Module) -> nn.Module | None:
    """The module whose output is `lm`'s last hidden states: `get_decoder()`, or, where that hands back the model
    itself (Llama 4's CausalLM names its decoder `model` under another base-model prefix), its `model`."""
    get_decoder = getattr(lm, "get_decoder", None)
    decoder = get_decoder() if callable(get_decoder) else None
    if decoder is None or decoder is lm:
        decoder = getattr(lm, "model", None)
    return decoder if isinstance(decoder, nn.Module) and decoder is not lm else None


def _number(value) -> float | None:
    """A fixed factor the forward applies: a plain number, or a one-element tensor nobody trains."""
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if torch.is_tensor(value) and value.numel() == 1 and not value.requires_grad:
        return float(value)
    return None


def declared_transforms(lm: nn.Module) -> list[Transform]:
    """The logit transforms `lm`'s config (or the model, as its forward reads it) declares, most specific first,
    then none. Which one the forward applies, if any, the check on a real batch finds out."""
    config = lm.config
    text = config.get_text_config()
    found: list[Transform] = []

    def declared(name):
        for source in (lm, text, config):
            value = _number(getattr(source, name, None))
            if value is not None:
                return value
        return None

    cap = declared("final_logit_softcapping")
    if cap:
        found.append(("softcap", cap))
    scale = declared("logit_scale")
    if scale is not None and scale != 1:
        found.append(("scale", scale))
    scaling = declared("logits_scaling")  # Granite divides by it, others multiply
    if scaling and scaling != 1:
        found += [("divide", scaling), ("scale", scaling)]
    found.append(("none", None))
    return found


def fused_loss_for(
    model: nn.Module,
    *,
    zero3: bool = False,
    fsdp: bool = False,
    liger: bool = False,
    enabled: bool = True,
    batch: dict | None = None,
) -> FusedLoss | None:
    """The fused loss for `model`, or None (the plain path) with one log line saying why. Decide once, at set-up;
    with `batch`, checked on it at once (`check_fused_loss`), else the caller checks it on its first batch."""
    if not enabled:
        logger.info("Loss: plain (--fused_loss false)")
        return None
    reason = plain_reason(model, zero3=zero3, fsdp=fsdp, liger=liger)
    if reason:
        logger.info("Loss: plain, not fused: %s", reason)
        return None
    lm = causal_lm(model)
    config = lm.config
    head = lm.get_output_embeddings()
    gather = nullcontext
    if zero3:
        import deepspeed

        def gather():  # once around the whole loss; read-only (the head is frozen here)
            return deepspeed.zero.GatheredParameters(list(head.parameters()), modifier_rank=None)

    candidates = declared_transforms(lm)
    aux_coef = _number(getattr(lm, "router_aux_loss_coef", None))
    if aux_coef is None:
        aux_coef = _number(getattr(config.get_text_config(), "router_aux_loss_coef", None))
    vocab_size = config.get_text_config().vocab_size
    chunk = chunk_positions(vocab_size)
    fused = FusedLoss(decoder_of(lm), head, *candidates[0], chunk, gather, aux_coef, candidates, vocab_size)
    if batch is not None:
        return check_fused_loss(fused, model, batch)
    return fused


def loss_tolerance(logits_dtype: torch.dtype, device: torch.device, loss: float) -> tuple[float, str]:
    """How far the fused loss may be from the model's own on the same batch, and the rule in words: relative
    1e-5 where the logits come from fp32 matrix multiplies, else twice the machine epsilon of the precision the
    output layer multiplies in (bf16 1.6e-2, fp16 2.0e-3, TF32 2.0e-3), times max(1, |loss|). The two differ only
    in how the multiplies are blocked; a missed soft-cap or scale moves the loss far more."""
    precision = str(logits_dtype).removeprefix("torch.")
    eps = torch.finfo(logits_dtype).eps
    if logits_dtype == torch.float32 and device.type == "cuda" and torch.backends.cuda.matmul.allow_tf32:
        precision, eps = "tf32", 2.0**-10
    relative = max(1e-5, 2 * eps)
    return relative * max(1.0, abs(loss)), f"{relative:.1e} x max(1, |loss|) ({precision})"


def check_batch(batch: dict, vocab_size: int) -> dict:
    """The first rows and positions of `batch` whose logits stay within CHECK_LOGITS (the model's own loss builds
    them whole), or the whole batch where it cannot be cut (a tensor of another shape; no trained label left)."""
    rows, length = batch["input_ids"].shape
    if rows * length * vocab_size <= CHECK_LOGITS:
        return batch
    keep_rows = max(1, CHECK_LOGITS // (length * vocab_size))
    keep = min(length, max(MIN_CHUNK, CHECK_LOGITS // vocab_size)) if keep_rows == 1 else length
    cut = {}
    for key, value in batch.items():
        if torch.is_tensor(value) and value.dim() >= 2 and tuple(value.shape[-2:]) == (rows, length):
            cut[key] = value[..., :keep_rows, :keep]
        elif key.startswith("cu_seq_lens_") and torch.is_tensor(value):  # one packed row's sample boundaries
            inside = value[value < keep]
            cut[key] = torch.cat([inside, inside.new_tensor([keep])])
        elif key.startswith("max_length_") and "cu_seq_lens_" + key[-1] in batch:
            cut[key] = int(batch["cu_seq_lens_" + key[-1]].clamp(max=keep).diff().max())
        elif torch.is_tensor(value):
            return batch
        else:
            cut[key] = value
    return cut if cut["labels"][..., 1:].ne(IGNORE_INDEX).any() else batch


@contextmanager
def eval_mode(model: nn.Module):
    """No dropout (LoRA's included) while open; every module's mode is restored after. bitsandbytes' layers keep
    theirs: on the CPU an eval-mode forward repacks a 4-bit weight for inference, which training then fails on."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    for module, training in modes:
        if type(module).__module__.startswith("bitsandbytes."):
            module.training = training
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


def compare_losses(fused: FusedLoss, model: nn.Module, batch: dict) -> tuple[Transform | None, str]:
    """The first of `fused`'s candidate transforms whose loss on `batch` (cut to CHECK_LOGITS) matches
    `model(**batch).loss` within `loss_tolerance` (None if none does), and what was found, in words."""
    batch = check_batch(batch, fused.vocab_size)
    tried = []
    with torch.no_grad(), eval_mode(model):
        own_outputs = model(**batch)  # an error here is the model's own: it would stop the plain path as well
        own = float(own_outputs.loss)
        tolerance, rule = loss_tolerance(own_outputs.logits.dtype, own_outputs.logits.device, own)
        del own_outputs
    try:
        with torch.no_grad(), eval_mode(model):
            for transform, factor in fused.candidates:
                fused.transform, fused.factor = transform, factor
                value = float(fused(model, batch)[0])
                if abs(value - own) <= tolerance:
                    which = "trained positions only" if fused.compact else "all positions, ignored ones at no sync"
                    return (transform, factor), (
                        f"{fused.describe()}, {fused.chunk} positions per chunk, {which}; checked on the first batch: "
                        f"{value:.6g} against the model's own {own:.6g} (tolerance {tolerance:.2g}: {rule})"
                    )
                tried.append(f"{fused.describe()}: {value:.6g}")
    except torch.OutOfMemoryError:
        raise
    except Exception as error:  # the model's forward does not serve the fused path (e.g. no logits_to_keep)
        return None, f"the fused path fails on {type(causal_lm(model)).__name__}: {type(error).__name__}: {error}"
    return None, (
        "its logits are not the output layer's of the last hidden state with any transform its config declares: the"
        f" model's own loss on the first batch is {own:.6g}, the fused one {'; '.join(tried)} (tolerance "
        f"{tolerance:.2g}: {rule})"
    )


def settle(fused: FusedLoss, found: Transform | None, finding: str) -> FusedLoss | None:
    """The fused loss with the transform `compare_losses` found, or None; logs the decision once."""
    if found is None:
        logger.info("Loss: plain, not fused: %s", finding)
        return None
    fused.transform, fused.factor = found
    logger.info("Loss: fused output layer and cross-entropy (%s)", finding)
    return fused


def check_fused_loss(fused: FusedLoss, model: nn.Module, batch: dict) -> FusedLoss | None:
    """`fused` if it gives `model`'s own loss on `batch` (with the transform found), else None; logged once."""
    return settle(fused, *compare_losses(fused, model, batch))


def causal_lm_loss(model: nn.Module, batch: dict, fused: FusedLoss | None, num_items_in_batch=None):
    """`model(**batch).loss` for a hand-written loop (e.g. bench/gpu_profile.py), fused when `fused` (from
    `fused_loss_for(model, batch=first_batch)`, decided once) is given, the model's own loss when it is None."""
    if fused is None:
        return model(**batch).loss
    return fused(model, batch, num_items_in_batch)[0]
