"""The Trainer, made safe to stop: atomic checkpoints, stop-and-save on SIGTERM/SIGINT, a guard against NaN.

- Checkpoints are written to `<output_dir>/.staging/checkpoint-N` and renamed into place once complete, so
  a run killed while saving leaves its previous checkpoint intact and no half-written one to resume from.
- `PreemptionHandler`: the first SIGTERM or SIGINT lets the current optimizer step finish, saves a checkpoint
  and stops training (the caller then exits with `EXIT_PREEMPTED`); a second signal exits at once. Under
  torchrun every rank stops at the same step.
- The NaN/inf guard decides after each optimizer step, for all processes at once (`nonfinite_verdict`): a
  non-finite loss or gradient norm skips that step (its gradients are dropped, or the fp16 loss scaler skips it)
  and `max_nonfinite_steps` such steps in a row stop the run without saving over the last good checkpoint; an
  ordinary fp16 overflow the scaler skips is not counted; a non-finite step DeepSpeed has already applied stops
  the run at once. Whether a micro-batch's loss is finite stays on the device, read once per optimizer step with
  the gradient norm: no host synchronisation of ours per micro-batch (nor the Trainer's --logging_nan_inf_filter
  one, applied on the device instead).
- The training loss is fused with the output layer (sft/loss.py) unless `--fused_loss false`: set up once, kept
  only if it gives the model's own loss on the first batch (checked in `compute_loss`, agreed by all processes),
  used wherever nobody needs the logits.
- Tokens are counted as they are trained on (`token_counts`, `throughput`), across resumes: each checkpoint's
  finetune_run.json records the counts so far.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
from transformers import Trainer, TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint, rotate_checkpoints

from sft.data import IGNORE_INDEX
from sft.disk import disk_full_is_a_user_error
from sft.loss import compare_losses, fused_loss_for, settle
from sft.outputs import read_run_info, replace_folder, write_run_info
from sft.stopping import (
    NonFiniteLoss,
    Preempted,
    PreemptionHandler,
    UpdateEngine,
    nonfinite_verdict,
)

logger = logging.getLogger(__name__)

STAGING_DIR = ".staging"


def last_complete_checkpoint(output_dir: str | os.PathLike) -> str | None:
    """The newest checkpoint-N folder whose trainer state was fully written, or None."""
    output_dir = str(output_dir)
    if not os.path.isdir(output_dir):
        return None
    while (checkpoint := get_last_checkpoint(output_dir)) is not None:
        try:
            json.loads(Path(checkpoint, "trainer_state.json").read_text())
            return checkpoint
        except (OSError, ValueError):
            # Left by another tool or an older version of this one: set aside, never resumed from.
            incomplete = Path(output_dir, f".incomplete-{Path(checkpoint).name}")
            shutil.rmtree(incomplete, ignore_errors=True)
            os.replace(checkpoint, incomplete)
            logger.warning("%s is incomplete: moved to %s", checkpoint, incomplete)
    return None


def _norm_on(device: torch.device, grad_norm) -> torch.Tensor:
    """The gradient norm as a 0-d tensor on `device` without reading it on the host: a tensor (a DTensor under
    FSDP2, made whole), a float (DeepSpeed) or None (not computed: 0)."""
    if isinstance(grad_norm, torch.Tensor):
        whole = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
        return whole.detach().float().reshape(()).to(device)
    return torch.tensor(float(grad_norm or 0.0), device=device)


class _GuardAfterStep(TrainerCallback):
    """Hands the Trainer's on_optimizer_step event to the guard: the step's outcome is known only then."""

    def __init__(self, trainer: FinetuneTrainer):
        self.trainer = trainer

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.trainer._after_optimizer_step()
        return control


class FinetuneTrainer(Trainer):
    """transformers.Trainer with atomic checkpoints and a NaN/inf guard."""

    def __init__(
        self,
        *args,
        max_nonfinite_steps: int = 1,
        run_mode: str | None = None,
        identity: dict | None = None,
        loraplus_lr_ratio: float | None = None,
        **kwargs,
    ):
        self.loraplus_lr_ratio = loraplus_lr_ratio  # read by create_optimizer, which the Trainer may call early
        super().__init__(*args, **kwargs)
        self.max_nonfinite_steps = max_nonfinite_steps
        self.run_mode = run_mode  # written into each checkpoint, so a resume in another mode is refused
        self.identity = identity  # likewise: a resume of another run is refused (sft.resume)
        self._resumed_loss_sum = 0.0  # the sum of the per-step losses of the sessions before this one
        self.nonfinite_steps = 0  # in a row
        self.nonfinite_stop_step: int | None = None
        self._loss_nonfinite: torch.Tensor | None = None  # this process, this optimizer step: a flag on the device
        self._host_nan_inf_filter: bool | None = None  # --logging_nan_inf_filter, applied on the device meanwhile
        self._step_flags = (False, False)  # all processes: (loss, gradient norm) not finite, this step
        self._step_grad_norm = None
        self.add_callback(_GuardAfterStep(self))
        self._staging_root: str | None = None
        self._session_counts: torch.Tensor | None = None  # this process's [trained, non-padding] tokens so far
        self._resumed_counts = {"trained_tokens": 0, "tokens": 0}  # all processes', before this session
        self.fused_loss = self._fused_loss_setup()  # None: the model's own (plain) loss
        self._fused_loss_checked = False  # against the model's own loss, on the first batch with labels
        self._loss_only = False  # inside a prediction_step that keeps only the loss

    def create_optimizer(self, model=None):
        """The Trainer's optimizer (--optim and its settings); with --loraplus_lr_ratio, built by peft's LoRA+ helper,
        which gives the B matrices that many times the learning rate of the A matrices."""
        if self.loraplus_lr_ratio is None or self.optimizer is not None:
            return super().create_optimizer(model)
        from peft.optimizers import create_loraplus_optimizer

        opt_model = self.model if model is None else model
        optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, opt_model)
        optimizer_kwargs = dict(optimizer_kwargs)
        learning_rate = optimizer_kwargs.pop("lr", self.args.learning_rate)
        self.optimizer = create_loraplus_optimizer(
            opt_model,
            optimizer_cls,
            lr=learning_rate,
            loraplus_lr_ratio=self.loraplus_lr_ratio,
            loraplus_weight_decay=self.args.weight_decay,
            **optimizer_kwargs,
        )
        return self.optimizer

    # ---- token counts ----

    def _count_tokens(self, inputs) -> None:
        """Adds a micro-batch's trained tokens (labels the loss sees: the model shifts labels by one, so a row's
        first never counts) and non-padding tokens, on the batch's device: no synchronisation per step."""
        labels, input_ids = inputs.get("labels"), inputs.get("input_ids")
        if labels is None or input_ids is None:
            return
        if "attention_mask" in inputs:
            tokens = inputs["attention_mask"].sum()
        else:  # packed rows: the padding is pad tokens (flat packed batches have none)
            pad_token_id = getattr(self.processing_class, "pad_token_id", None)
            tokens = input_ids.ne(pad_token_id).sum() if pad_token_id is not None else torch.tensor(input_ids.numel())
        counts = torch.stack([labels[..., 1:].ne(IGNORE_INDEX).sum(), tokens.to(labels.device)])
        self._session_counts = (
            counts if self._session_counts is None else self._session_counts + counts.to(self._session_counts.device)
        )

    def _session_token_counts(self) -> tuple[int, int]:
        """(trained, non-padding) tokens of this session, summed over all processes: every process must call it."""
        counts = self._session_counts if self._session_counts is not None else torch.zeros(2, dtype=torch.long)
        gathered = self.accelerator.gather(counts.to(self.args.device).reshape(1, 2)).reshape(-1, 2).sum(0)
        return int(gathered[0]), int(gathered[1])

    def token_counts(self) -> dict[str, int]:
        """Trained and non-padding tokens of the whole run, resumed sessions included (every process calls it)."""
        return self._run_totals(*self._session_token_counts())

    def _run_totals(self, trained: int, tokens: int) -> dict[str, int]:
        return {
            "trained_tokens": self._resumed_counts["trained_tokens"] + trained,
            "tokens": self._resumed_counts["tokens"] + tokens,
        }

    def throughput(self, train_runtime: float) -> dict[str, float]:
        """Run totals and this session's tokens per second of `train_runtime`, for finetune_run.json (every
        process calls it)."""
        trained, tokens = self._session_token_counts()
        totals = self._run_totals(trained, tokens)
        seconds = max(train_runtime, 1e-9)
        result = {
            **totals,
            "trained_tokens_per_second": round(trained / seconds, 1),
            "tokens_per_second": round(tokens / seconds, 1),
        }
        logger.info(
            "Trained on %d tokens (%d with loss): %.0f tokens/s, %.0f trained tokens/s",
            totals["tokens"],
            totals["trained_tokens"],
            result["tokens_per_second"],
            result["trained_tokens_per_second"],
        )
        return result

    def train(self, resume_from_checkpoint=None, *args, **kwargs):
        if isinstance(resume_from_checkpoint, (str, os.PathLike)):
            recorded = read_run_info(resume_from_checkpoint) or {}
            self._resumed_counts = {key: int(recorded.get(key, 0)) for key in self._resumed_counts}
            self._resumed_loss_sum = float(recorded.get("loss_sum", 0.0))
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def _session_loss_sum(self) -> float:
        """The sum of this session's per-step losses (mean over processes): what transformers divides by the
        session's steps for its train_loss, with the part not yet logged. Every process must call it."""
        pending = getattr(self, "_tr_loss", None)
        pending_sum = 0.0
        if isinstance(pending, torch.Tensor):
            pending_sum = float(self.accelerator.gather(pending.detach().reshape(1).float()).mean())
        return float(getattr(self, "_total_loss_scalar", 0.0)) + pending_sum

    def run_train_loss(self) -> float:
        """The mean per-step training loss of the whole run, resumed sessions included (after train())."""
        steps = max(self.state.global_step, 1)
        return (self._resumed_loss_sum + float(getattr(self, "_total_loss_scalar", 0.0))) / steps

    # ---- fused output layer and loss (sft/loss.py) ----

    def _fused_loss_setup(self):
        """The fused loss, or None with one log line saying why not; decided once, here."""
        from transformers.integrations import is_deepspeed_zero3_enabled

        trainer_reason = None
        if self.label_smoother is not None:
            trainer_reason = "--label_smoothing_factor needs the whole logits"
        elif self.compute_loss_func is not None:
            trainer_reason = "a compute_loss_func was given"
        if trainer_reason and getattr(self.args, "fused_loss", True):
            logger.info("Loss: plain, not fused: %s", trainer_reason)
            return None
        return fused_loss_for(
            self.model,
            zero3=is_deepspeed_zero3_enabled(),
            fsdp=self.is_fsdp_enabled,
            liger=self.args.use_liger_kernel,
            enabled=getattr(self.args, "fused_loss", True),  # plain transformers.TrainingArguments: on
        )

    def _check_fused_loss(self, model, inputs) -> None:
        """Keeps the fused loss only if it gives the model's own loss on this (the first) batch, on every process:
        a transform found on one process and not on another, or differing, keeps the plain loss everywhere."""
        self._fused_loss_checked = True
        found, finding = compare_losses(self.fused_loss, model, inputs)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            index = self.fused_loss.candidates.index(found) if found is not None else -1
            agreed = torch.tensor([index, -index], device=self.args.device)
            torch.distributed.all_reduce(agreed, op=torch.distributed.ReduceOp.MIN)
            lowest, highest = int(agreed[0]), -int(agreed[1])
            if found is not None and (lowest != highest or lowest < 0):
                found, finding = None, f"another process's check found otherwise (here: {finding})"
        self.fused_loss = settle(self.fused_loss, found, finding)

    def settle_fused_loss(self, model, inputs) -> None:
        """Checks the fused loss against the model's own on `inputs` (a batch with labels), once: the first call
        decides, later ones do nothing."""
        if self.fused_loss is not None and not self._fused_loss_checked:
            self._check_fused_loss(model, inputs)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        # Fused where nobody needs the logits: training, and evaluation that keeps only the loss.
        needs_logits = return_outputs and not self._loss_only
        if self.fused_loss is None or needs_logits or "labels" not in inputs or "shift_labels" in inputs:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        self.settle_fused_loss(model, inputs)
        if self.fused_loss is None:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        # As Trainer.compute_loss: the model sees num_items_in_batch only if it takes loss kwargs, and the loss
        # summed over this process's share of the batch is scaled back up by the number of processes.
        items = num_items_in_batch if self.model_accepts_loss_kwargs else None
        loss, outputs = self.fused_loss(model, inputs, items)
        if self.args.average_tokens_across_devices and self.model_accepts_loss_kwargs and items is not None:
            loss_scale = self.accelerator.num_processes // self.get_tp_size()
            loss = loss * (loss_scale if self.args.n_gpu <= 1 else self.args.n_gpu)
        return (loss, outputs) if return_outputs else loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        self._loss_only = prediction_loss_only
        try:
            return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys)
        finally:
            self._loss_only = False

    # ---- NaN / inf guard ----

    def training_step(self, model, inputs, num_items_in_batch=None):
        """The Trainer's step, with no host synchronisation of ours per micro-batch: whether the loss is finite
        stays on the device until the optimizer step (`_get_grad_norm`) reads it, once."""
        self._count_tokens(inputs)
        loss = super().training_step(model, inputs, num_items_in_batch)
        finite = torch.isfinite(loss.detach()).all()
        self._loss_nonfinite = ~finite if self._loss_nonfinite is None else self._loss_nonfinite | ~finite
        return self._filter_logged_loss(loss, finite)

    def _filter_logged_loss(self, loss: torch.Tensor, finite: torch.Tensor) -> torch.Tensor:
        """transformers' --logging_nan_inf_filter, on the device: the Trainer's own check reads every micro-batch's
        loss on the host (a synchronisation each), so it is off from here until the step's end
        (`_maybe_log_save_evaluate` puts it back for evaluation and saving), and a non-finite loss is replaced here
        by what the Trainer would have added in its place: the mean of the losses since the last log."""
        if self._host_nan_inf_filter is None:
            self._host_nan_inf_filter = self.args.logging_nan_inf_filter
        self.args.logging_nan_inf_filter = False
        logged = getattr(self, "_tr_loss", None)  # the Trainer's running sum since the last log
        if not self._host_nan_inf_filter or logged is None:
            return loss
        mean_since_log = logged / (1 + self.state.global_step - self._globalstep_last_logged)
        return torch.where(finite, loss, mean_since_log.to(loss.dtype))

    def _update_engine(self) -> UpdateEngine:
        if self.is_deepspeed_enabled:
            return "deepspeed"
        return "scaler" if self.accelerator.scaler is not None else "plain"

    def _get_grad_norm(self, model, grad_norm=None):
        # Called once per optimizer step, after backward and clipping, before optimizer.step() (under DeepSpeed,
        # after its step: accelerate runs the engine's step inside backward).
        grad_norm = super()._get_grad_norm(model, grad_norm)
        device = self.args.device
        loss_nonfinite = self._loss_nonfinite if self._loss_nonfinite is not None else torch.tensor(False)
        flags = torch.stack([loss_nonfinite.to(device), ~torch.isfinite(_norm_on(device, grad_norm))]).float()
        # One decision for all processes: a rank that skipped or stopped alone would hang the others.
        flags = self.accelerator.reduce(flags, reduction="sum")
        loss_flag, norm_flag = flags.tolist()  # the step's one read of the flags on the host
        self._step_flags = (loss_flag > 0, norm_flag > 0)
        self._step_grad_norm = grad_norm
        self._loss_nonfinite = None
        if self._update_engine() == "plain" and any(self._step_flags):
            for parameter in model.parameters():
                parameter.grad = None  # the optimizer skips parameters without a gradient
        return grad_norm

    def _after_optimizer_step(self) -> None:
        """The guard's decision for the step just taken (from the on_optimizer_step callback)."""
        loss_nonfinite, norm_nonfinite = self._step_flags
        self._step_flags = (False, False)
        verdict = nonfinite_verdict(
            loss_nonfinite, norm_nonfinite, self._update_engine(), self.accelerator.optimizer_step_was_skipped
        )
        step = self.state.global_step + 1
        if verdict == "ok":
            self.nonfinite_steps = 0
            return
        if verdict == "overflow":
            logger.info("Step %d: fp16 gradients overflowed; the loss scaler skipped it and lowers its scale", step)
            return
        what = "loss" if loss_nonfinite else f"gradient norm ({self._step_grad_norm})"
        self.nonfinite_steps += 1
        if verdict == "applied":
            logger.warning("Step %d: non-finite %s, and its update was already applied: stopping", step, what)
            self.nonfinite_stop_step = step
            self.control.should_training_stop = True
            return
        logger.warning(
            "Step %d: non-finite %s; its update skipped (%d in a row, limit %d)",
            step, what, self.nonfinite_steps, self.max_nonfinite_steps,
        )  # fmt: skip
        if self.nonfinite_steps >= self.max_nonfinite_steps:
            self.nonfinite_stop_step = step
            self.control.should_training_stop = True

    def _maybe_log_save_evaluate(self, *args, **kwargs):
        if self._host_nan_inf_filter is not None:  # as given, for evaluation and the saved arguments
            self.args.logging_nan_inf_filter = self._host_nan_inf_filter
        if self.nonfinite_stop_step is not None:
            self.control.should_save = False  # keep the last good checkpoint as the newest one
        return super()._maybe_log_save_evaluate(*args, **kwargs)

    # ---- atomic checkpoints ----

    def _get_output_dir(self, trial):
        return self._staging_root or super()._get_output_dir(trial)

    def _save_checkpoint(self, model, trial):
        run_dir = super()._get_output_dir(trial)
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        staging_root = os.path.join(run_dir, STAGING_DIR)
        if self.args.should_save and os.path.exists(staging_root):
            shutil.rmtree(staging_root)  # what a killed save left behind
        counts = self.token_counts()  # collectives: before the rank-0-only writing below
        loss_sum = self._resumed_loss_sum + self._session_loss_sum()
        self.accelerator.wait_for_everyone()
        self._staging_root = staging_root
        try:
            with disk_full_is_a_user_error(staging_root, f"saving {name}"):
                super()._save_checkpoint(model, trial)
        finally:
            self._staging_root = None
        self.accelerator.wait_for_everyone()
        final, staged = os.path.join(run_dir, name), os.path.join(staging_root, name)
        best = self.state.best_model_checkpoint
        if best and os.path.abspath(best).startswith(os.path.abspath(staging_root)):
            # The Trainer recorded the best checkpoint where it wrote it: record where it is kept.
            self.state.best_model_checkpoint = os.path.join(run_dir, os.path.basename(best))
        if self.args.should_save:
            with disk_full_is_a_user_error(staging_root, f"saving {name}"):
                if best != self.state.best_model_checkpoint:
                    self.state.save_to_json(os.path.join(staged, "trainer_state.json"))
                if self.run_mode is not None:
                    record = {"mode": self.run_mode, "identity": self.identity, **counts, "loss_sum": loss_sum}
                    write_run_info(staged, record)
            replace_folder(staged, final)
            shutil.rmtree(staging_root, ignore_errors=True)
            rotate_checkpoints(
                output_dir=run_dir,
                save_total_limit=self.args.save_total_limit,
                best_model_checkpoint=self.state.best_model_checkpoint,
                use_mtime=True,
            )
        self.accelerator.wait_for_everyone()


def init_deepspeed_comm(training_args) -> None:
    """On the CPU, accelerate starts torch.distributed (gloo) but not DeepSpeed's comm layer; ZeRO-3 shards the
    model while loading it and would then count one process instead of all of them. Start it on the same group."""
    if training_args.deepspeed and training_args.device.type == "cpu" and dist.is_initialized():
        import deepspeed

        if not deepspeed.comm.is_initialized():
            deepspeed.init_distributed(dist_backend=dist.get_backend(), auto_mpi_discovery=False)


def train_until_done(trainer: FinetuneTrainer, checkpoint: str | None, output_dir: str):
    """Runs the training loop (resuming from `checkpoint`) and plots its curves, also after a stop. Raises
    Preempted when a signal stopped it (a checkpoint is saved) and NonFiniteLoss when the NaN guard did."""
    from sft.plots import save_training_curves  # matplotlib only where a run plots

    preemption = PreemptionHandler()
    trainer.add_callback(preemption)
    try:
        result = trainer.train(resume_from_checkpoint=checkpoint)
    finally:
        preemption.restore()
    if trainer.is_world_process_zero():  # also after a stop: the curves up to it
        logger.info("Wrote %s", save_training_curves(trainer.state.log_history, output_dir))
    if preemption.requested:
        logger.warning(
            "Stopped on request after step %d; checkpoint saved. Rerun the same command to resume.",
            preemption.stopped_at_step,
        )
        raise Preempted(preemption.stopped_at_step)
    if trainer.nonfinite_stop_step is not None:
        raise NonFiniteLoss(
            f"non-finite loss or gradient norm for {trainer.nonfinite_steps} step(s) in a row, the last at "
            f"step {trainer.nonfinite_stop_step}; stopped. The last good checkpoint in {output_dir} "
            "is kept (lower --learning_rate, or check the data?)"
        )
    trainer.save_state()
    return result
