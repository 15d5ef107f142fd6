"""Stopping and resuming: SIGTERM, SIGKILL while saving, the NaN guard, and checks made before any loading."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from host_reads import HostReads
from safetensors.torch import load_file
from transformers import Trainer

from sft.errors import UserError
from sft.stopping import EXIT_NONFINITE, EXIT_PREEMPTED, NonFiniteLoss, nonfinite_verdict
from sft.training import STAGING_DIR, last_complete_checkpoint

REPO = Path(__file__).resolve().parent.parent


def start_finetune(*args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "finetune.py", *args],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


def logged_losses(output: Path) -> list[tuple[int, float]]:
    state = json.loads((output / "trainer_state.json").read_text())
    return [(entry["step"], entry["loss"]) for entry in state["log_history"] if "loss" in entry]


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_sigterm_saves_and_a_rerun_reaches_the_uninterrupted_result(tiny_model, tmp_path, run_finetune, common_args,
                                                                    mode):  # fmt: skip
    extra = ["--use_lora"] if mode == "lora" else []
    weights = "adapter_model.safetensors" if mode == "lora" else "model.safetensors"
    steps = 120

    reference = tmp_path / "reference"
    run_finetune(*common_args(tiny_model, reference, steps=steps), *extra)

    output = tmp_path / "interrupted"
    args = [*common_args(tiny_model, output, steps=steps), *extra]
    process = start_finetune(*args)
    seen = 0
    for line in process.stdout:
        seen += "'loss'" in line
        if seen == 3:
            process.send_signal(signal.SIGTERM)
            break
    log = process.communicate(timeout=600)[0]
    assert process.returncode == EXIT_PREEMPTED, log
    assert "SIGTERM received" in log
    checkpoint = last_complete_checkpoint(output)
    stopped_at = int(checkpoint.rsplit("-", 1)[1])
    assert 3 <= stopped_at < steps
    assert not (output / weights).exists()  # no final output from an unfinished run

    resumed = start_finetune(*args)
    log = resumed.communicate(timeout=600)[0]
    assert resumed.returncode == 0, log
    assert f"Resuming from {checkpoint}" in log

    # Steps and losses apart: pytest.approx takes no nested structures (pytest 9.2 refuses them).
    got_losses, expected_losses = logged_losses(output), logged_losses(reference)
    assert [step for step, _ in got_losses] == [step for step, _ in expected_losses]
    assert [loss for _, loss in got_losses] == pytest.approx([loss for _, loss in expected_losses], rel=1e-3)
    expected, got = load_file(reference / weights), load_file(output / weights)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-4, atol=1e-5)


def test_a_repeated_signal_is_one_request_and_a_later_one_exits_at_once():
    # Ctrl-C or a scheduler signals torchrun and its workers, and torchrun passes the signal on: a worker gets it
    # twice within milliseconds, and must still save. A second signal sent later means "stop now".
    script = (
        "import os, signal, sys, time\n"
        "from sft.stopping import PreemptionHandler, REPEATED_SIGNAL_WINDOW_S\n"
        "handler = PreemptionHandler()\n"
        "os.kill(os.getpid(), signal.SIGTERM)\n"
        "os.kill(os.getpid(), signal.SIGINT)\n"
        "print('still running, requested:', handler.requested, flush=True)\n"
        "time.sleep(REPEATED_SIGNAL_WINDOW_S + 0.5)\n"
        "os.kill(os.getpid(), signal.SIGTERM)\n"
        "time.sleep(5)\n"
        "print('not reached', flush=True)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert "still running, requested: True" in done.stdout, done.stderr
    assert "not reached" not in done.stdout
    assert done.returncode == 128 + signal.SIGTERM
    assert "Second SIGTERM: exiting now, without saving" in done.stderr


def test_sigkill_while_saving_leaves_a_resumable_checkpoint(tiny_model, tmp_path, common_args):
    output = tmp_path / "killed"
    args = [*common_args(tiny_model, output, steps=150), "--use_lora", "--save_strategy", "steps", "--save_steps", "1",
            "--save_total_limit", "2"]  # fmt: skip
    process = start_finetune(*args)
    deadline = time.monotonic() + 240
    # Killed while a checkpoint is being written, with an earlier one already in place.
    while not ((output / STAGING_DIR).exists() and any(output.glob("checkpoint-*"))):
        assert process.poll() is None, "the run ended before a save could be interrupted"
        assert time.monotonic() < deadline
        time.sleep(0.001)
    process.kill()
    process.communicate()

    checkpoint = last_complete_checkpoint(output)
    assert checkpoint is not None
    for folder in output.glob("checkpoint-*"):  # every checkpoint in place is whole
        json.loads((folder / "trainer_state.json").read_text())
        assert (folder / "adapter_model.safetensors").is_file() and (folder / "optimizer.pt").is_file()

    resumed = start_finetune(*args)
    log = resumed.communicate(timeout=600)[0]
    assert resumed.returncode == 0, log
    assert f"Resuming from {checkpoint}" in log
    assert json.loads((output / "finetune_run.json").read_text())["global_step"] == 150


def test_a_half_written_checkpoint_is_never_resumed_from(tmp_path):
    for step in (2, 4):
        (tmp_path / f"checkpoint-{step}").mkdir()
    (tmp_path / "checkpoint-2" / "trainer_state.json").write_text('{"global_step": 2}')
    (tmp_path / "checkpoint-4" / "trainer_state.json").write_text('{"global_st')
    assert last_complete_checkpoint(tmp_path) == str(tmp_path / "checkpoint-2")
    assert not (tmp_path / "checkpoint-4").exists() and (tmp_path / ".incomplete-checkpoint-4").is_dir()


def test_nan_guard_stops_the_run_and_keeps_the_last_good_checkpoint(tiny_model, tmp_path, run_finetune, common_args):
    output = tmp_path / "nan"
    args = common_args(tiny_model, output, steps=20) + [
        "--use_lora", "--save_strategy", "steps", "--save_steps", "2", "--max_nonfinite_steps", "2",
    ]  # fmt: skip
    # A learning rate this large overflows the weights within a few steps: the loss turns to inf, then NaN.
    with pytest.raises(NonFiniteLoss) as stopped:
        run_finetune(*args, "--learning_rate", "1e30", "--optim", "sgd", "--max_grad_norm", "0")
    assert stopped.value.exit_code == EXIT_NONFINITE
    message = str(stopped.value)
    assert "non-finite loss or gradient norm for 2 step(s) in a row, the last at step" in message
    last_step = int(message.split("the last at step ")[1].split(";")[0])
    checkpoint = last_complete_checkpoint(output)
    assert int(checkpoint.rsplit("-", 1)[1]) < last_step
    assert not (output / "adapter_model.safetensors").exists()


@pytest.mark.parametrize(
    ("loss_nonfinite", "norm_nonfinite", "engine", "step_skipped", "verdict"),
    [
        (False, False, "plain", False, "ok"),
        (False, True, "plain", False, "skipped"),  # bf16/fp32: we drop the gradients, the optimizer skips
        (True, True, "plain", False, "skipped"),
        # fp16's loss scaler: an overflowing step (the norm is inf after unscaling) is ordinary, skipped by it
        (False, True, "scaler", True, "overflow"),
        (True, True, "scaler", True, "skipped"),  # a non-finite loss is counted, even though the scaler skipped
        (False, True, "scaler", False, "applied"),
        (False, False, "scaler", False, "ok"),
        # DeepSpeed has applied the update before anyone sees the step: fp16 overflows it skips itself...
        (False, True, "deepspeed", True, "overflow"),
        (True, True, "deepspeed", True, "skipped"),
        # ...but in bf16/fp32 a non-finite step is applied (the weights may hold NaN): stop at once
        (False, True, "deepspeed", False, "applied"),
        (True, False, "deepspeed", False, "applied"),
        (False, False, "deepspeed", False, "ok"),
        (False, False, "deepspeed", True, "overflow"),  # ZeRO skipped the step without reporting its norm
    ],
)
def test_nonfinite_verdict(loss_nonfinite, norm_nonfinite, engine, step_skipped, verdict):
    assert nonfinite_verdict(loss_nonfinite, norm_nonfinite, engine, step_skipped) == verdict


def test_target_modules_that_match_nothing_list_the_real_ones(tiny_model, tmp_path, run_finetune, common_args):
    with pytest.raises(UserError) as stopped:
        run_finetune(*common_args(tiny_model, tmp_path / "out"), "--use_lora",
                     "--lora_target_modules", "c_attn", "w1")  # fmt: skip
    message = str(stopped.value)
    assert "match no module of this model" in message
    for name in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"):
        assert name in message


def test_model_max_length_below_the_template_overhead(tiny_model, tmp_path, run_finetune, common_args):
    with pytest.raises(UserError, match="leaves no room for text: the chat template alone takes"):
        run_finetune(*common_args(tiny_model, tmp_path / "out"), "--model_max_length", "8")


def test_output_dir_of_another_mode_is_refused_before_loading(tiny_model, tmp_path, run_finetune, common_args):
    # The tiny model's tokenizer without its weights: reaching the model load would fail with another error.
    no_weights = tmp_path / "tokenizer-only"
    shutil.copytree(tiny_model, no_weights, ignore=shutil.ignore_patterns("*.safetensors"))
    output = tmp_path / "out"
    run_finetune(*common_args(tiny_model, output, steps=2), "--use_lora")
    with pytest.raises(UserError, match='holds another run: mode: "lora" there, "full" now'):
        run_finetune(*common_args(str(no_weights), output, steps=2))

    checkpoints_only = tmp_path / "checkpoints"
    run_finetune(*common_args(tiny_model, checkpoints_only, steps=2), "--use_lora",
                 "--save_strategy", "steps", "--save_steps", "2")  # fmt: skip
    (checkpoints_only / "finetune_run.json").unlink()
    with pytest.raises(UserError, match='checkpoint-2 holds another run: mode: "lora" there, "full" now'):
        run_finetune(*common_args(str(no_weights), checkpoints_only, steps=2))
    # Resuming LoRA checkpoints as Q-LoRA would silently train on a quantised base: refused as well.
    with pytest.raises(UserError, match='checkpoint-2 holds another run: mode: "lora" there, "qlora-4bit" now'):
        run_finetune(*common_args(str(no_weights), checkpoints_only, steps=2),
                     "--use_lora", "--q_lora")  # fmt: skip
    # A checkpoint that does not say its mode is still told apart by its files.
    (checkpoints_only / "checkpoint-2" / "finetune_run.json").unlink()
    with pytest.raises(UserError, match="checkpoint-2 is from a LoRA run; this run is full"):
        run_finetune(*common_args(str(no_weights), checkpoints_only, steps=2))


def test_bf16_without_a_gpu_says_so(tmp_path, run_finetune):
    if torch.accelerator.current_accelerator() is not None:
        pytest.skip("this machine has an accelerator")
    with pytest.raises(UserError, match="--bf16: no GPU found"):
        run_finetune("--output_dir", str(tmp_path / "out"), "--bf16")


# The training loop's own code, ours and the Trainer's. The fused loss's reads depend on the device it runs on
# (FusedLoss.compact: on the CPU it reads its trained-token count, which waits for nothing there); the accelerator
# strategy's are counted in tests/test_loss.py.
TRAINING_LOOP = (str(REPO / "sft" / "training.py"), sys.modules[Trainer.__module__].__file__)


def test_the_loop_reads_the_device_once_per_optimizer_step_not_per_micro_batch(tiny_model, tmp_path, run_finetune,
                                                                               common_args):  # fmt: skip
    reads = {}
    for accumulation in (1, 4):  # 2 optimizer steps of 1 or 4 micro-batches, all within one epoch
        with HostReads(TRAINING_LOOP) as host_reads:
            run_finetune(
                *common_args(tiny_model, tmp_path / f"accumulation-{accumulation}", steps=2),
                *("--use_lora", "--per_device_train_batch_size", "1"),
                *("--gradient_accumulation_steps", str(accumulation)),
            )
        reads[accumulation] = host_reads.by_caller
    assert reads[4] == reads[1]  # four times the micro-batches, not one read more
    assert reads[1]["training.py:_get_grad_norm"] == 2  # the NaN guard: one read of its flags per optimizer step
