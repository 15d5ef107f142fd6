"""The Trainer, made safe to stop: atomic checkpoints, stop-and-save on SIGTERM/SIGINT, a guard against NaN.

- Checkpoints are written to `<output_dir>/.staging/checkpoint-N` and renamed into place once complete, so
  a run killed while saving leaves its previous checkpoint intact and no half-written one to resume from.
- `PreemptionHandler`: the first SIGTERM or SIGINT lets the current optimizer step finish, saves a checkpoint
  and stops training (the caller then exits with `EXIT_PREEMPTED`); a second signal exits at once. Under
  torchrun every rank stops at the same step.
- A loss or gradient norm that is not finite skips that optimizer step (its gradients are dropped);
  `max_nonfinite_steps` such steps in a row stop the run without saving over the last good checkpoint.
- Tokens are counted as they are trained on (`token_counts`, `throughput`), across resumes: each checkpoint's
  finetune_run.json records the counts so far.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import signal
import time
from pathlib import Path

import torch
import torch.distributed as dist
from transformers import Trainer, TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint, rotate_checkpoints

from sft.data import IGNORE_INDEX
from sft.errors import ConfigurationError, RunStopped, UserError
from sft.outputs import publish, read_run_info, replace_folder, staging_folder, staging_path, write_run_info

logger = logging.getLogger(__name__)

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: stopped on request, checkpoint saved; rerun the same command to resume
EXIT_NONFINITE = 3  # stopped by the NaN/inf guard
STAGING_DIR = ".staging"


class NonFiniteLoss(UserError):
    """The NaN/inf guard stopped the run (the user lowers the learning rate or mends the data)."""

    exit_code = EXIT_NONFINITE


class Preempted(RunStopped):
    """A signal asked the run to stop; it saved a checkpoint, and rerunning the same command resumes from it."""

    def __init__(self, step: int | None):
        super().__init__(EXIT_PREEMPTED, f"stopped on request after step {step}")
        self.step = step


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


def resume_checkpoint(output_dir: str, mode: str, start_over: bool) -> str | None:
    """The checkpoint to resume from, if any; refuses an output_dir that holds a run of another mode."""
    finished = read_run_info(output_dir)
    if finished is not None and finished.get("mode") != mode:
        raise ConfigurationError(
            f"--output_dir {output_dir} holds a finished {finished.get('mode')} run; this run is {mode}: "
            "choose another --output_dir"
        )
    checkpoint = None if start_over else last_complete_checkpoint(output_dir)
    if checkpoint:
        recorded = read_run_info(checkpoint)
        if recorded is not None:
            checkpoint_mode = recorded.get("mode")
            same_mode = checkpoint_mode == mode
        else:  # a checkpoint that does not say its mode (another tool's): tell adapters from full models
            holds_adapter = Path(checkpoint, "adapter_config.json").is_file()
            checkpoint_mode = "LoRA" if holds_adapter else "full"
            same_mode = holds_adapter == (mode != "full")
        if not same_mode:
            raise ConfigurationError(
                f"{checkpoint} is from a {checkpoint_mode} run; this run is {mode}: choose another --output_dir, "
                "or pass --start_over to train from scratch there"
            )
    return checkpoint


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
        flag = torch.tensor([float(self.requested)], device=_collective_device())
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def on_step_end(self, args, state, control, **kwargs):
        if self._requested_anywhere():
            self.requested = True
            self.stopped_at_step = state.global_step
            control.should_save = True
            control.should_training_stop = True
        return control


def _collective_device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


class FinetuneTrainer(Trainer):
    """transformers.Trainer with atomic checkpoints and a NaN/inf guard."""

    def __init__(
        self,
        *args,
        max_nonfinite_steps: int = 1,
        run_mode: str | None = None,
        loraplus_lr_ratio: float | None = None,
        **kwargs,
    ):
        self.loraplus_lr_ratio = loraplus_lr_ratio  # read by create_optimizer, which the Trainer may call early
        super().__init__(*args, **kwargs)
        self.max_nonfinite_steps = max_nonfinite_steps
        self.run_mode = run_mode  # written into each checkpoint, so a resume in another mode is refused
        self.nonfinite_steps = 0  # in a row
        self.nonfinite_stop_step: int | None = None
        self._loss_nonfinite = False
        self._staging_root: str | None = None
        self._session_counts: torch.Tensor | None = None  # this process's [trained, non-padding] tokens so far
        self._resumed_counts = {"trained_tokens": 0, "tokens": 0}  # all processes', before this session

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
        return super().train(resume_from_checkpoint, *args, **kwargs)

    # ---- NaN / inf guard ----

    def training_step(self, model, inputs, num_items_in_batch=None):
        self._count_tokens(inputs)
        loss = super().training_step(model, inputs, num_items_in_batch)
        if not torch.isfinite(loss).all():
            self._loss_nonfinite = True
        return loss

    def _get_grad_norm(self, model, grad_norm=None):
        # Called once per optimizer step, after backward and clipping and before optimizer.step().
        grad_norm = super()._get_grad_norm(model, grad_norm)
        norm_finite = grad_norm is None or math.isfinite(float(grad_norm))
        if self._loss_nonfinite or not norm_finite:
            step = self.state.global_step + 1
            self.nonfinite_steps += 1
            logger.warning(
                "Step %d: non-finite %s; skipping its update (%d in a row, limit %d)",
                step, "loss" if self._loss_nonfinite else f"gradient norm ({grad_norm})",
                self.nonfinite_steps, self.max_nonfinite_steps,
            )  # fmt: skip
            for parameter in model.parameters():
                parameter.grad = None  # the optimizer skips parameters without a gradient
            if self.nonfinite_steps >= self.max_nonfinite_steps:
                self.nonfinite_stop_step = step
                self.control.should_training_stop = True
        else:
            self.nonfinite_steps = 0
        self._loss_nonfinite = False
        return grad_norm

    def _maybe_log_save_evaluate(self, *args, **kwargs):
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
        counts = self.token_counts()  # a collective: before the rank-0-only writing below
        self.accelerator.wait_for_everyone()
        self._staging_root = staging_root
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self._staging_root = None
        self.accelerator.wait_for_everyone()
        if self.args.should_save:
            final, staged = os.path.join(run_dir, name), os.path.join(staging_root, name)
            if self.run_mode is not None:
                write_run_info(staged, {"mode": self.run_mode, **counts})
            replace_folder(staged, final)
            shutil.rmtree(staging_root, ignore_errors=True)
            if self.state.best_model_checkpoint and self.state.best_model_checkpoint.startswith(staging_root):
                self.state.best_model_checkpoint = os.path.join(
                    run_dir, os.path.basename(self.state.best_model_checkpoint)
                )
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


def save_initial_adapter(model, folder: str, is_main_process: bool) -> str:
    """PiSSA/OLoRA: the adapter as initialised, before any step, saved to `folder` (the main process writes it).
    save_final converts the trained adapter against it."""
    if is_main_process:
        model.save_pretrained(folder)
    return folder


def save_final(
    trainer: Trainer, tokenizer, output_dir: str, run_info: dict, initial_adapter: str | None = None
) -> None:
    """Model (or adapter), tokenizer and chat template, written to a staging folder and moved into output_dir.

    `initial_adapter`: where a PiSSA/OLoRA adapter was saved before training (see save_initial_adapter); the final
    adapter is then converted by peft into a plain LoRA on the unchanged base model."""
    staging = staging_path(output_dir)
    if trainer.is_world_process_zero():
        staging_folder(output_dir)  # emptied of what a killed save left
    trainer.accelerator.wait_for_everyone()
    trainer.save_model(str(staging))  # every rank takes part: ZeRO-3 gathers the weights here
    if initial_adapter and trainer.is_world_process_zero():
        # The adapter just saved is trained against base weights PiSSA/OLoRA changed: replaced by the difference
        # from the initial adapter, which is a LoRA of twice the rank on the original base (peft's conversion).
        peft_model = trainer.accelerator.unwrap_model(trainer.model)
        peft_model.save_pretrained(str(staging), path_initial_model_for_weight_conversion=initial_adapter)
        rank = peft_model.peft_config["default"].r
        logger.info("Adapter converted to a plain LoRA of rank %d on the unchanged base model (PiSSA/OLoRA)", 2 * rank)
    if trainer.is_world_process_zero():
        tokenizer.save_pretrained(staging)
        write_run_info(staging, run_info)
        publish(staging, output_dir)
        logger.info("Saved the final %s to %s", "adapter" if run_info["mode"] != "full" else "model", output_dir)
