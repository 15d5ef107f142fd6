"""training_curves.png and the token counts of finetune_run.json, at the end of a run and after a stop."""

from __future__ import annotations

import json
import math
import os
import signal
from pathlib import Path

import pytest
from PIL import Image

from sft.data import IGNORE_INDEX, load_conversations, tokenize_conversations
from sft.packing import pack_dataset
from sft.plots import plotted_data, training_curves_figure
from sft.stopping import EXIT_PREEMPTED, Preempted
from sft.training import FinetuneTrainer

EXAMPLES = "data/example_chatml.jsonl"


def assert_curves_match(picture: Path, log_history: list[dict]) -> None:
    """The PNG is a real picture, and its lines are the log history's train loss, eval loss and learning rate."""
    assert picture.stat().st_size > 10_000
    with Image.open(picture) as image:
        image.verify()
        assert image.format == "PNG" and image.size[0] >= 500 and image.size[1] >= 300
    plotted = plotted_data(picture)

    def points(key: str) -> list[list[float]]:
        return [[entry["step"], entry[key]] for entry in log_history if key in entry]

    assert points("loss") and plotted["loss"]["train loss"] == points("loss")
    assert plotted["loss"].get("eval loss", []) == points("eval_loss")
    assert plotted["learning rate"]["learning rate"] == points("learning_rate")


def tokens_per_epoch(tokenizer, max_length: int) -> tuple[int, int, int]:
    """Trained tokens, tokens and packed rows of one pass over the example data."""
    dataset, _ = tokenize_conversations(load_conversations(EXAMPLES), tokenizer, max_length)
    trained = sum(sum(label != IGNORE_INDEX for label in labels[1:]) for labels in dataset["labels"])
    return trained, sum(dataset["length"]), len(pack_dataset(dataset, max_length))


def test_a_finished_run_plots_its_log_history_and_counts_its_tokens(
    tiny_model, tokenizer, tmp_path, run_finetune, common_args
):
    output = tmp_path / "out"
    # 8 samples, 4 per step: 4 steps are exactly 2 epochs, whatever the shuffle.
    args = [*common_args(tiny_model, output, steps=4), "--use_lora", "--eval_data_path", "data/example_qwen.json"]
    run_finetune(*args, "--eval_strategy", "steps", "--eval_steps", "2")

    state = json.loads((output / "trainer_state.json").read_text())
    assert any("eval_loss" in entry for entry in state["log_history"])
    assert_curves_match(output / "training_curves.png", state["log_history"])

    info = json.loads((output / "finetune_run.json").read_text())
    trained, tokens, _ = tokens_per_epoch(tokenizer, 256)
    assert info["trained_tokens"] == 2 * trained
    assert info["tokens"] == 2 * tokens  # padding excluded
    assert info["trained_tokens_per_second"] > 0 and info["tokens_per_second"] > info["trained_tokens_per_second"]


def test_a_stopped_run_plots_up_to_the_stop_and_the_resumed_run_counts_every_token(
    tiny_model, tokenizer, tmp_path, monkeypatch, run_finetune, common_args
):
    output = tmp_path / "out"
    args = [*common_args(tiny_model, output, steps=4), "--use_lora", "--packing"]
    original_step = FinetuneTrainer.training_step

    def step_then_sigterm(self, *step_args, **kwargs):
        loss = original_step(self, *step_args, **kwargs)
        if self.state.global_step == 1:  # during the second optimizer step, as a scheduler's SIGTERM would
            os.kill(os.getpid(), signal.SIGTERM)
        return loss

    with monkeypatch.context() as patch:
        patch.setattr(FinetuneTrainer, "training_step", step_then_sigterm)
        with pytest.raises(Preempted) as stopped:
            run_finetune(*args)
    assert stopped.value.exit_code == EXIT_PREEMPTED
    checkpoint = output / "checkpoint-2"
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    assert [entry["step"] for entry in state["log_history"] if "loss" in entry] == [1, 2]
    assert_curves_match(output / "training_curves.png", state["log_history"])
    half = json.loads((checkpoint / "finetune_run.json").read_text())["trained_tokens"]

    run_finetune(*args)  # resumes from checkpoint-2
    state = json.loads((output / "trainer_state.json").read_text())
    assert [entry["step"] for entry in state["log_history"] if "loss" in entry] == [1, 2, 3, 4]
    assert_curves_match(output / "training_curves.png", state["log_history"])
    # The 8 samples pack into at most 4 rows: one batch, one step per epoch. Packed, each sample's first label
    # is not trained, as unpacked (where the model's shift by one skips it), so an epoch trains as many tokens.
    trained, _, rows = tokens_per_epoch(tokenizer, 256)
    assert rows <= 4
    assert half == 2 * trained
    assert json.loads((output / "finetune_run.json").read_text())["trained_tokens"] == 4 * trained


def test_curves_of_a_history_with_a_skipped_step():
    history = [
        {"step": 1, "loss": 2.5, "learning_rate": 1e-3},
        {"step": 2, "loss": math.nan, "learning_rate": 8e-4},
        {"step": 2, "eval_loss": 2.0},
        {"step": 3, "loss": 1.5, "learning_rate": 6e-4},
        {"step": 3, "train_loss": 2.0, "train_runtime": 1.0},
    ]
    figure = training_curves_figure(history)
    lines = {line.get_label(): line.get_xydata().tolist() for axes in figure.axes for line in axes.lines}
    assert (
        lines["train loss"][0] == [1, 2.5]
        and math.isnan(lines["train loss"][1][1])
        and lines["train loss"][2] == [3, 1.5]
    )
    assert lines["eval loss"] == [[2, 2.0]]
    assert lines["learning rate"] == [[1, 1e-3], [2, 8e-4], [3, 6e-4]]
