"""How a run stops: on a signal (finish the step, save, exit 75) or on non-finite losses (the NaN/inf guard's
verdict on each optimizer step). sft.training wires both into the Trainer."""

from __future__ import annotations

import logging
import os
import signal
import time
from typing import Literal

import torch
import torch.distributed as dist
from transformers import TrainerCallback

from sft.errors import RunStopped, UserError

logger = logging.getLogger(__name__)

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: stopped on request, checkpoint saved; rerun the same command to resume
EXIT_NONFINITE = 3  # stopped by the NaN/inf guard


class NonFiniteLoss(UserError):
    """The NaN/inf guard stopped the run (the user lowers the learning rate or mends the data)."""

    exit_code = EXIT_NONFINITE


class Preempted(RunStopped):
    """A signal asked the run to stop; it saved a checkpoint, and rerunning the same command resumes from it."""

    def __init__(self, step: int | None):
        super().__init__(EXIT_PREEMPTED, f"stopped on request after step {step}")
        self.step = step


# A second signal this soon after the first is the same stop request arriving twice: Ctrl-C or a scheduler
# signals torchrun and its workers alike, and torchrun then passes the signal on to the workers again.
REPEATED_SIGNAL_WINDOW_S = 2.0


class PreemptionHandler(TrainerCallback):
    """Turns SIGTERM / SIGINT into 'finish this step, save a checkpoint, stop'; a second signal, sent more than
    REPEATED_SIGNAL_WINDOW_S after the first, exits at once."""

    def __init__(self, signals: tuple[int, ...] = (signal.SIGTERM, signal.SIGINT)):
        self.requested = False
        self.stopped_at_step: int | None = None
        self._signalled_at: float | None = None
        self._previous = {signum: signal.signal(signum, self._handle) for signum in signals}

    def restore(self) -> None:
        """Puts back the signal handlers there were before."""
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def _handle(self, signum: int, frame) -> None:
        now = time.monotonic()
        if self._signalled_at is not None:
            if now - self._signalled_at < REPEATED_SIGNAL_WINDOW_S:
                return
            logger.warning("Second %s: exiting now, without saving", signal.Signals(signum).name)
            os._exit(128 + signum)
        self._signalled_at = now
        self.requested = True
        logger.warning(
            "%s received: finishing this step, saving a checkpoint, then exiting (send it again, %.0f s or more "
            "from now, to exit at once without saving)",
            signal.Signals(signum).name,
            REPEATED_SIGNAL_WINDOW_S,
        )

    def _requested_anywhere(self) -> bool:
        if not (dist.is_available() and dist.is_initialized()):
            return self.requested
        flag = torch.tensor([float(self.requested)], device=collective_device())
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def on_step_end(self, args, state, control, **kwargs):
        if self._requested_anywhere():
            self.requested = True
            self.stopped_at_step = state.global_step
            control.should_save = True
            control.should_training_stop = True
        return control


def collective_device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


UpdateEngine = Literal["plain", "scaler", "deepspeed"]
Verdict = Literal["ok", "overflow", "skipped", "applied"]


def nonfinite_verdict(loss_nonfinite: bool, norm_nonfinite: bool, engine: UpdateEngine, step_skipped: bool) -> Verdict:
    """What an optimizer step was, for the NaN/inf guard (flags already combined over all processes).

    `engine` is who applied the update: "plain" (an optimizer whose non-finite steps we skip by dropping the
    gradients first), "scaler" (fp16's loss scaler: it skips any step whose gradients overflowed and lowers its
    scale), "deepspeed" (its step has already run when we see the step; its fp16 scaler skips overflows).
    `step_skipped` is the scaler's or DeepSpeed's own report that it skipped the step.

    - "ok": finite.
    - "overflow": the loss was finite and the loss scaler skipped the step for overflowing gradients: ordinary in
      fp16 (the gradient norm is inf after an overflowing unscale), not counted.
    - "skipped": a non-finite loss or gradient whose update was not applied: counted toward max_nonfinite_steps.
    - "applied": a non-finite step that was applied anyway (DeepSpeed in bf16/fp32 has no overflow check; a scaler
      that did not skip it): the weights may hold NaN now, so the run stops at once, keeping the last good
      checkpoint.
    """
    if engine != "plain" and step_skipped:
        # The scaler skips only overflowing steps; DeepSpeed's ZeRO does not always report the norm of one.
        return "skipped" if loss_nonfinite else "overflow"
    if not (loss_nonfinite or norm_nonfinite):
        return "ok"
    return "skipped" if engine == "plain" else "applied"
