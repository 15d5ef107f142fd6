"""What a user reads: the scripts print our own lines, progress bars and metrics, not other libraries' chatter."""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import sft.quiet

REPO = Path(__file__).resolve().parents[1]
OUR_LOG_LINE = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (DEBUG|INFO|WARNING|ERROR|CRITICAL) [\w.]+: ")
# tqdm: "Loading weights: 100%|███| 27/27 [00:00]", "Tokenising train data (batches of 1000):  0%|  | 0/1 [...]"
PROGRESS_BAR = r"(\s*[\w .()]+:)?\s*\d+%\|[^|]*\|[^\[]*(\[[^\]]*\])?"
BAR_OR_METRICS = re.compile(rf"({PROGRESS_BAR})?\s*(\{{'[\w/]+': .*\}})?\s*")  # the Trainer logs its metrics dicts


def foreign_lines(output: str, own_prints: tuple[str, ...] = ()) -> list[str]:
    """The lines (and carriage-return segments, where progress bars redraw) that are none of ours."""
    foreign = []
    output = output.replace("\x1b[A", "\n")  # a nested progress bar moves the cursor up to redraw its parent
    # Our log line written while a progress bar is drawn (the fused loss's check on the first batch) starts mid-line.
    output = OUR_LOG_LINE.sub(lambda match: "\n" + match.group(0), output)
    for segment in re.split(r"[\r\n]", output):
        if OUR_LOG_LINE.match(segment) or segment.startswith(own_prints) or BAR_OR_METRICS.fullmatch(segment):
            continue
        foreign.append(segment)
    return foreign


def run_script(*command: str, **env_vars: str) -> str:
    # As a user runs it: Python's default warning filters (pytest's own filters do not reach a subprocess).
    unset = ("SFT_VERBOSE", "TORCH_LOGS", "PYTHONWARNINGS")
    env = {key: value for key, value in os.environ.items() if key not in unset} | env_vars
    done = subprocess.run(
        [sys.executable, *command], cwd=REPO, env=env, capture_output=True, text=True, timeout=600, check=False
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout + done.stderr


def test_a_lora_run_and_its_merge_print_only_our_lines_bars_and_metrics(tiny_model, tmp_path):
    adapter = tmp_path / "lora"
    args = ["--model_name_or_path", tiny_model, "--data_path", "data/example_chatml.jsonl", "--output_dir", adapter]
    args += ["--use_lora", "--lora_r", "8", "--max_steps", "4", "--logging_steps", "2", "--report_to", "none"]
    args += ["--per_device_train_batch_size", "4", "--model_max_length", "128"]
    output = run_script("finetune.py", *map(str, args))
    assert "'loss'" in output and "Saved the final adapter" in output  # what it must print is there
    assert foreign_lines(output) == []

    merged = run_script("merge_lora.py", "--adapter", str(adapter), "--output", str(tmp_path / "merged"))
    assert foreign_lines(merged, own_prints=("merged vs ", "merged model: ")) == []


def test_importing_changes_nothing_and_setup_takes_verbose_off_the_command_line():
    command = (
        "import sys; sys.argv = ['x.py', '--verbose', '-a']; import logging, sft.quiet; "
        "print(sys.argv, logging.getLogger('torchao').filters); "
        "print(sft.quiet.setup(), sys.argv)"
    )
    env = {key: value for key, value in os.environ.items() if key != "SFT_VERBOSE"}
    shown = subprocess.run(
        [sys.executable, "-c", command], cwd=REPO, env=env, capture_output=True, text=True, check=True
    )
    assert shown.stdout.splitlines()[-2:] == ["['x.py', '--verbose', '-a'] []", "True ['x.py', '-a']"]


@pytest.mark.skipif(sft.quiet.VERBOSE, reason="the tests run with SFT_VERBOSE set")
def test_only_the_named_messages_are_dropped():
    def logged(name: str, message: str) -> bool:
        """Whether the message reaches the logger's handlers (the libraries' loggers need not propagate to root)."""
        seen: list[logging.LogRecord] = []
        handler = logging.Handler()
        handler.emit = seen.append
        logger = logging.getLogger(name)
        logger.addHandler(handler)
        try:
            logger.warning(message)
        finally:
            logger.removeHandler(handler)
        return bool(seen)

    assert not logged("torchao", "Failed to load /x/_C_mxfp8.so: Could not load this library")
    assert logged("torchao", "Failed to import something else")
    assert logged("torch.utils._pytree", "<enum 'X'> is registered twice")
    assert logged("DeepSpeed", "Setting accelerator to CUDA.") and logged("DeepSpeed", "ZeRO stage 3 failed")


def test_gptq_quantising_and_asking_the_quantised_model_print_only_our_lines_bars_and_metrics(tiny_model, tmp_path):
    # The demo's GPTQ steps, as scripts/demo.sh runs them (it sets TORCH_COMPILE_DISABLE: compiling GPT-QModel's CPU
    # kernels takes minutes on 2 cores).
    quantised = tmp_path / "gptq"
    args = ["--model_name_or_path", tiny_model, "--data_path", "data/example_chatml.jsonl", "--out_path", quantised]
    args += ["--bits", "4", "--group_size", "32"]
    output = run_script("run_gptq.py", *map(str, args), TORCH_COMPILE_DISABLE="1")
    assert "Quantizing model.layers blocks" in output and "held-out perplexity" in output  # ours is there
    assert foreign_lines(output, own_prints=("held-out perplexity", "weights on disk: ", "quantised model: ")) == []

    asked = run_script("-m", "scripts.ask", "--model", str(quantised), "--data", "data/example_chatml.jsonl",
                       TORCH_COMPILE_DISABLE="1")  # fmt: skip
    assert "answers match exactly" in asked
    # What the tiny model answers is its own (it may hold any text): the other lines are ours, bars or nothing.
    foreign = foreign_lines(asked, own_prints=("Q: ", "   expected: ", "   answer: "))
    assert not [line for line in foreign if "GPT-QModel" in line or line.startswith("INFO ") or "loss_type" in line]
    assert re.search(r"^\d+/\d+ answers match exactly$", asked, re.M)


def test_verbose_lets_gpt_qmodel_speak(tiny_model, tmp_path):
    quantised = tmp_path / "gptq"
    args = ["--model_name_or_path", tiny_model, "--data_path", "data/example_chatml.jsonl", "--out_path", quantised]
    args += ["--group_size", "32", "--verbose"]
    output = run_script("run_gptq.py", *map(str, args), TORCH_COMPILE_DISABLE="1")
    assert "GPT-QModel" in output and "INFO  ENV:" in output
    assert "optimum.gptq.quantizer: Quantizing self_attn.q_proj in block 1/" in output
