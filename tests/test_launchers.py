"""finetune/*.sh end to end on the CPU through torchrun (gloo): every launcher, DeepSpeed ZeRO-2/3 with 2 processes.

Each launch trains the tiny model a few steps and is checked for several things at once (launches are the slow
part). The first DeepSpeed launch on a fresh machine JIT-compiles DeepSpeed's CPU ops (g++, ninja; a few
minutes, cached in TORCH_EXTENSIONS_DIR, default ~/.cache/torch_extensions).
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
from pathlib import Path

import pytest
import torch
from peft import AutoPeftModelForCausalLM
from ports import free_port
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from sft.args import TrainingArguments
from sft.errors import UserError
from sft.outputs import RUN_INFO_FILE

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = "data/example_chatml.jsonl"
STEPS = 4
LEARNING_RATE = 5e-3
# Same global batch in every run: 4 samples, as 1 process x 4 or 2 processes x 2.
GLOBAL_BATCH = 4
# Every launcher gets these after -m/-d/-o: they pass through to finetune.py and replace its defaults.
PASSTHROUGH = [
    "--max_steps",
    str(STEPS),
    "--learning_rate",
    str(LEARNING_RATE),
    "--lr_scheduler_type",
    "cosine",
    "--warmup_steps",
    "0",
    "--weight_decay",
    "0",
    "--gradient_accumulation_steps",
    "1",
    "--save_strategy",
    "no",
    "--seed",
    "0",
    "--lora_r",
    "4",
    "--lora_alpha",
    "8",
    "--lora_dropout",
    "0",
    "--model_max_length",
    "256",
]


def launch(script: str, model: str, output: Path, processes: int, *extra: str) -> subprocess.CompletedProcess:
    """Runs finetune/<script> with -m/-d/-o as a user would, on `processes` CPU processes."""
    env = {**os.environ, "GPUS_PER_NODE": str(processes), "MASTER_PORT": str(free_port()), "CUDA_VISIBLE_DEVICES": ""}
    batch = ["--per_device_train_batch_size", str(GLOBAL_BATCH // processes)]
    command = ["bash", f"finetune/{script}", "-m", model, "-d", EXAMPLES, "-o", str(output), *PASSTHROUGH, *batch]
    return subprocess.run([*command, *extra], cwd=REPO, env=env, capture_output=True, text=True, timeout=900)


def launched(script: str, model: str, output: Path, processes: int, *extra: str) -> dict:
    """A launch that must succeed; returns the run's trainer_state.json."""
    run = launch(script, model, output, processes, *extra)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-6000:]
    return json.loads((output / "trainer_state.json").read_text())


def step_logs(state: dict) -> list[dict]:
    return [entry for entry in state["log_history"] if "loss" in entry]


def losses(state: dict) -> list[float]:
    return [entry["loss"] for entry in step_logs(state)]


def learning_rates(state: dict) -> list[float]:
    return [entry["learning_rate"] for entry in step_logs(state)]


def cosine(steps) -> list[float]:
    """The LR of a cosine schedule without warm-up at each of `steps`."""
    return [LEARNING_RATE * 0.5 * (1 + math.cos(math.pi * step / STEPS)) for step in steps]


def assert_same_tensors(got: dict, expected: dict, rtol: float = 1e-4, atol: float = 1e-5) -> None:
    assert got.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=rtol, atol=atol, msg=name)


@pytest.fixture(scope="module")
def lora_reference(tiny_model, tmp_path_factory) -> tuple[Path, dict]:
    """LoRA in one process at the global batch, without DeepSpeed: what the DeepSpeed runs must reproduce."""
    output = tmp_path_factory.mktemp("launchers") / "lora-single"
    return output, launched("finetune_lora_single_gpu.sh", tiny_model, output, 1)


def test_lora_single_gpu_launcher_passes_arguments_through(tiny_model, lora_reference):
    output, state = lora_reference
    # Pass-through flags replaced the launcher's defaults: 4 steps, rank 4, our LR, one log per step.
    assert state["global_step"] == STEPS and state["max_steps"] == STEPS
    assert [entry["step"] for entry in step_logs(state)] == [1, 2, 3, 4]
    adapter_config = json.loads((output / "adapter_config.json").read_text())
    assert adapter_config["r"] == 4 and adapter_config["lora_alpha"] == 8
    assert adapter_config["base_model_name_or_path"] == tiny_model
    # The Trainer pickled sft.args.TrainingArguments: it loads anywhere sft imports, not only in finetune.py.
    args = torch.load(output / "training_args.bin", weights_only=False)
    assert type(args) is TrainingArguments
    assert args.learning_rate == LEARNING_RATE and args.weight_decay == 0 and args.per_device_train_batch_size == 4
    # The launcher's own defaults that were not overridden are still there.
    assert args.adam_beta2 == 0.95 and args.gradient_checkpointing and args.use_cpu
    AutoPeftModelForCausalLM.from_pretrained(output)


@pytest.mark.parametrize("config", ["zero2", "zero3"])
def test_lora_deepspeed_two_processes_match_one_process(tiny_model, tmp_path, lora_reference, config):
    reference_output, reference = lora_reference
    output = tmp_path / config
    extra = [] if config == "zero2" else ["--deepspeed", "ds_configs/zero3.json"]  # zero2 is the default
    state = launched("finetune_lora_ds.sh", tiny_model, output, 2, *extra)

    run_info = json.loads((output / RUN_INFO_FILE).read_text())
    assert run_info["mode"] == "lora"
    # 2 processes x 2 samples follow 1 process x 4 samples, step by step.
    assert losses(state) == pytest.approx(losses(reference), rel=1e-4)
    # The LR is the cosine schedule asked for, not a DeepSpeed scheduler's; the Trainer builds the optimizer and
    # the schedule (the configs have no optimizer block), so each step logs the LR it used, as a plain run does.
    assert learning_rates(state) == pytest.approx(cosine(range(STEPS)), rel=1e-6, abs=1e-12)
    assert learning_rates(reference) == pytest.approx(cosine(range(STEPS)), rel=1e-6, abs=1e-12)
    # The adapter (gathered from the shards under ZeRO-3) is the one the single process trained, and loads.
    assert_same_tensors(
        load_file(output / "adapter_model.safetensors"), load_file(reference_output / "adapter_model.safetensors")
    )
    AutoPeftModelForCausalLM.from_pretrained(output)


def test_full_zero3_two_processes_save_the_trained_model(tiny_model, tmp_path, run_finetune):
    output = tmp_path / "zero3"
    state = launched("finetune_ds.sh", tiny_model, output, 2)

    # The same run in one plain process (no DeepSpeed) at the global batch, with the launcher's defaults. ZeRO-3
    # with a trained output layer keeps the plain loss (sft/loss.py), so the reference does too: the fused loss's
    # gradients differ from it by rounding alone, but Adam turns rounding on near-zero gradients into updates of
    # the learning rate's size, beyond this comparison's tolerance.
    reference_output = tmp_path / "plain"
    argv = ["--model_name_or_path", tiny_model, "--data_path", EXAMPLES, "--output_dir", str(reference_output)]
    argv += ["--fused_loss", "false"]
    argv += PASSTHROUGH + ["--per_device_train_batch_size", str(GLOBAL_BATCH), "--adam_beta2", "0.95"]
    argv += ["--logging_steps", "1", "--gradient_checkpointing", "true", "--report_to", "none", "--use_cpu", "true"]
    reference = run_finetune(*argv)

    assert losses(state) == pytest.approx([e["loss"] for e in reference.state.log_history if "loss" in e], rel=1e-4)
    saved = AutoModelForCausalLM.from_pretrained(output)  # plain transformers, no DeepSpeed
    trained = {name: tensor.detach() for name, tensor in reference.model.state_dict().items()}
    assert_same_tensors(saved.state_dict(), trained)
    initial = AutoModelForCausalLM.from_pretrained(tiny_model).state_dict()
    assert not torch.allclose(saved.state_dict()["model.norm.weight"], initial["model.norm.weight"])


def test_qlora_launchers_one_process_zero2_and_zero3_agree(tiny_model, tmp_path):
    runs = {}
    for name, script, processes, extra in [
        ("single", "finetune_qlora_single_gpu.sh", 1, []),
        ("zero2", "finetune_qlora_ds.sh", 2, []),
        ("zero3", "finetune_qlora_ds.sh", 2, ["--deepspeed", "ds_configs/zero3.json"]),
    ]:
        output = tmp_path / name
        runs[name] = (output, launched(script, tiny_model, output, processes, *extra))
        assert json.loads((output / RUN_INFO_FILE).read_text())["mode"] == "qlora-4bit"
        AutoPeftModelForCausalLM.from_pretrained(output)
    single_output, single = runs["single"]
    for name in ("zero2", "zero3"):
        output, state = runs[name]
        assert losses(state) == pytest.approx(losses(single), rel=1e-4), name
        assert_same_tensors(
            load_file(output / "adapter_model.safetensors"), load_file(single_output / "adapter_model.safetensors")
        )


def test_ctrl_c_under_torchrun_saves_a_checkpoint_and_the_rerun_resumes(tiny_model, tmp_path):
    # Ctrl-C signals the whole process group: torchrun and both workers get SIGINT, and torchrun passes it on to
    # the workers again. Each worker must take the two as one request: finish the step, save, stop. (Whether the
    # copy lands before a worker has handled the first is a race; test_training checks that rule on its own.)
    output = tmp_path / "out"
    env = {**os.environ, "GPUS_PER_NODE": "2", "MASTER_PORT": str(free_port()), "CUDA_VISIBLE_DEVICES": ""}
    # Two processes: the multi-process LoRA launcher (DeepSpeed ZeRO-2); the one-GPU launchers run one process.
    command = ["bash", "finetune/finetune_lora_ds.sh", "-m", tiny_model, "-d", EXAMPLES, "-o", str(output)]
    command += [*PASSTHROUGH, "--per_device_train_batch_size", "2", "--max_steps", "500"]
    run = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                           start_new_session=True)  # fmt: skip
    lines, losses = [], 0
    for line in run.stdout:
        lines.append(line)
        losses += "'loss'" in line
        if losses == 3:
            os.killpg(run.pid, signal.SIGINT)
            break
    log = "".join(lines) + run.communicate(timeout=600)[0]
    assert run.returncode == 75, log[-4000:]  # the workers' own code: stopped on request, checkpoint saved
    assert "Traceback" not in log
    assert log.count("SIGINT received: finishing this step") == 2, log[-4000:]  # one per worker
    assert "Second SIGINT" not in log
    assert "Stopped on request after step" in log
    checkpoints = sorted(output.glob("checkpoint-*"))
    assert len(checkpoints) == 1, log[-4000:]
    stopped_at = int(checkpoints[0].name.split("-")[1])
    assert 3 <= stopped_at < 500
    assert {path.name for path in checkpoints[0].glob("rng_state_*.pth")} == {"rng_state_0.pth", "rng_state_1.pth"}
    assert not (output / "adapter_model.safetensors").exists()

    env["MASTER_PORT"] = str(free_port())
    resumed = subprocess.run([*command, "--max_steps", str(stopped_at + 2)], cwd=REPO, env=env,
                             capture_output=True, text=True, timeout=600)  # fmt: skip
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-6000:]
    assert f"Resuming from {checkpoints[0]}" in resumed.stdout + resumed.stderr
    assert json.loads((output / "trainer_state.json").read_text())["global_step"] == stopped_at + 2
    AutoPeftModelForCausalLM.from_pretrained(output)


def test_unsupported_set_ups_stop_before_the_model_load(tiny_model, tmp_path):
    no_gather = json.loads((REPO / "ds_configs/zero3.json").read_text())
    del no_gather["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"]
    (tmp_path / "no_gather.json").write_text(json.dumps(no_gather))
    for script, extra, message in [
        ("finetune_fsdp.sh", [], "--fsdp needs GPUs: on the CPU the Trainer silently falls back to plain DDP"),
        (
            "finetune_ds.sh",
            ["--deepspeed", str(tmp_path / "no_gather.json")],
            "ZeRO-3 without zero_optimization.stage3_gather_16bit_weights_on_model_save = true",
        ),
        (
            "finetune_lora_ds.sh",
            ["--loraplus_lr_ratio", "16", "--deepspeed", "ds_configs/zero3_offload.json"],
            "--loraplus_lr_ratio needs the Trainer's optimizer, but the DeepSpeed config",
        ),
    ]:
        run = launch(script, tiny_model, tmp_path / "out", 1, *extra)
        assert run.returncode != 0
        assert f"error: {message}" in run.stderr or message in run.stderr, run.stderr[-3000:]
        assert "Loading " not in run.stderr  # stopped before the model load
        assert not (tmp_path / "out").exists()


def test_a_user_error_in_the_workers_ends_the_launcher_with_its_error_line(tiny_model, tmp_path):
    # Missing data, found by both workers; --optim against a DeepSpeed config with its own optimizer block.
    for processes, extra, message in [
        (2, ["-d", "missing.jsonl"], "missing.jsonl: no such file"),
        (1, ["--optim", "adafactor", "--deepspeed", "ds_configs/zero3_offload.json"], "--optim adafactor: "),
    ]:
        run = launch("finetune_lora_ds.sh", tiny_model, tmp_path / "out", processes, *extra)
        assert run.returncode == 2, run.stderr[-3000:]
        errors = [line for line in run.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and errors[0].startswith(f"error: {message}"), run.stderr[-3000:]
        assert "Traceback" not in run.stderr and "ChildFailedError" not in run.stderr


def test_qlora_with_fsdp_names_the_supported_launchers(tiny_model, tmp_path, run_finetune):
    argv = ["--model_name_or_path", str(tmp_path / "no-model"), "--data_path", EXAMPLES, "--output_dir", "x"]
    with pytest.raises(UserError) as stopped:
        run_finetune(*argv, "--use_lora", "--q_lora", "--fsdp", "--report_to", "none")
    assert "--q_lora does not run with FSDP here: use finetune/finetune_qlora_single_gpu.sh" in str(stopped.value)


def test_launcher_help_and_unedited_data():
    for script in sorted(os.listdir(REPO / "finetune")):
        if not script.endswith(".sh") or script == "common.sh" or script.startswith("_"):
            continue
        shown = subprocess.run(["bash", f"finetune/{script}", "--help"], cwd=REPO, capture_output=True, text=True)
        assert shown.returncode == 0 and "GPUS_PER_NODE" in shown.stdout and "-m, --model" in shown.stdout
        # As shipped, DATA= holds the placeholder: the launch stops before torchrun, saying what to edit.
        unedited = subprocess.run(["bash", f"finetune/{script}"], cwd=REPO, capture_output=True, text=True)
        assert unedited.returncode == 2, unedited.stderr
        assert unedited.stderr.startswith(
            f"error: no training data: DATA= at the top of finetune/{script} still holds the placeholder "
            "path_to_data.json; edit it to your data file, or pass -d DATA"
        )
        assert "torchrun" not in unedited.stderr


@pytest.mark.parametrize("script", ["finetune_lora_single_gpu.sh", "finetune_qlora_single_gpu.sh"])
def test_one_gpu_launchers_start_one_process_whatever_the_gpu_count(tmp_path, script):
    command = [
        "bash",
        f"finetune/{script}",
        "-m",
        str(tmp_path / "no-model"),
        "-d",
        EXAMPLES,
        "-o",
        str(tmp_path / "o"),
    ]
    # GPUS_PER_NODE=2 on this CPU machine: refused, naming the launchers that do start several processes.
    env = {**os.environ, "GPUS_PER_NODE": "2", "CUDA_VISIBLE_DEVICES": ""}
    run = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 2, run.stderr[-3000:]
    assert "error: this launcher trains in one process; GPUS_PER_NODE=2 asks for more" in run.stderr
    assert "finetune/finetune_lora_ds.sh" in run.stderr and "torchrun" not in run.stderr
    # An 8-GPU node with native bf16, described to the launcher: one process, in bf16 (the command, not run).
    env = {**os.environ, "SFT_GPU_COUNT": "8", "SFT_GPU_BF16": "1", "SFT_DRY_RUN": "1"}
    env.pop("GPUS_PER_NODE", None)
    run = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    started = next(line for line in run.stderr.splitlines() if line.startswith("+ torchrun"))
    assert " --nproc_per_node 1 " in started and " --bf16 true " in started and "--use_cpu" not in started


def test_multi_process_launchers_start_one_process_per_gpu_in_the_precision_it_has(tmp_path):
    command = ["bash", "finetune/finetune_lora_ds.sh", "-m", str(tmp_path / "no-model"), "-d", EXAMPLES]
    env = {**os.environ, "SFT_GPU_COUNT": "4", "SFT_GPU_BF16": "0", "SFT_DRY_RUN": "1"}
    env.pop("GPUS_PER_NODE", None)
    run = subprocess.run([*command, "-o", str(tmp_path / "o")], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=300)  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    started = next(line for line in run.stderr.splitlines() if line.startswith("+ torchrun"))
    # A V100-like GPU emulates bf16: fp16 it is.
    assert " --nproc_per_node 4 " in started and " --fp16 true " in started and "--bf16" not in started


def edited_copy(script: str, **lines: str) -> Path:
    """finetune/<script> with its `NAME=` lines at the top replaced, as a user edits it, saved next to it (where it
    finds common.sh) as finetune/_edited_<pid>_<script>; the caller removes it."""
    text = (REPO / "finetune" / script).read_text()
    for name, value in lines.items():
        start = text.index(f"\n{name}=") + 1
        end = text.index("\n", start)
        text = text[:start] + f'{name}="{value}"' + text[end:]
    copy = REPO / "finetune" / f"_edited_{os.getpid()}_{script}"
    copy.write_text(text)
    return copy


def test_a_launcher_with_model_and_data_edited_trains(tiny_model, tmp_path):
    output = tmp_path / "out"
    copy = edited_copy("finetune_lora_single_gpu.sh", MODEL=tiny_model, DATA=EXAMPLES, OUTPUT=str(output))
    env = {**os.environ, "GPUS_PER_NODE": "1", "MASTER_PORT": str(free_port()), "CUDA_VISIBLE_DEVICES": ""}
    try:
        run = subprocess.run(
            ["bash", str(copy.relative_to(REPO)), "--max_steps", "2", "--per_device_train_batch_size", "2",
             "--gradient_checkpointing", "false", "--model_max_length", "128"],
            cwd=REPO, env=env, capture_output=True, text=True, timeout=900,
        )  # fmt: skip
    finally:
        copy.unlink()
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-6000:]
    # The edited lines are what ran: that model, that data, that folder.
    assert f"--model_name_or_path {tiny_model} --data_path {EXAMPLES} --output_dir {output}" in run.stderr
    assert json.loads((output / "trainer_state.json").read_text())["global_step"] == 2
    assert json.loads((output / "adapter_config.json").read_text())["base_model_name_or_path"] == tiny_model


def test_command_line_paths_override_the_edited_lines(tiny_model, tmp_path):
    # -d given: the placeholder is no error; -m/-o replace MODEL/OUTPUT. --help after them shows what would run.
    run = subprocess.run(
        ["bash", "finetune/finetune_lora_single_gpu.sh", "-m", "some/model", "-d", EXAMPLES, "-o", "x", "--help"],
        cwd=REPO, capture_output=True, text=True,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert "(default: some/model)" in run.stdout and "(default: x)" in run.stdout
