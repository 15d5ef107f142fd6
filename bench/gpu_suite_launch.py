"""The GPU suite's checks of what users run: every finetune/*.sh launcher with one process (dpo_*.sh on generated
pairs), finetune.py with --packing (sdpa, flash-attention), an fp16 run that overflows early, --use_liger_kernel,
and merge, GPTQ and chat on the launchers' outputs. Each runs as its own process (bash / python), as a user starts
it; bench/gpu_suite.py runs them (several at a time: they share the GPU, so their seconds are wall time under that
sharing) and records each as pass, fail (with the tail of its log) or skip (with the reason).

Launcher runs train a small model (Qwen2 shape, hidden 256, 4 layers, the check model's vocabulary) for
LAUNCH_STEPS steps of short sequences, without saving checkpoints; the final save is part of each check.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

from bench.common import free_port, write_pairs

REPO = Path(__file__).resolve().parent.parent
LAUNCH_STEPS = 6
TIMEOUT_S = 240
LOG_TAIL = 1500

# name: (launcher, extra arguments, what it shows). Every launcher and mode a user starts.
LAUNCHERS = {
    "launch-full-zero3": ("finetune_ds.sh", [], "full fine-tune, DeepSpeed ZeRO-3, saved gathered"),
    "launch-lora-zero2": (
        "finetune_lora_ds.sh",
        ["--optim", "adamw_bnb_8bit"],
        "LoRA, DeepSpeed ZeRO-2, with the --optim asked for (bitsandbytes' 8-bit AdamW)",
    ),
    "launch-lora-zero3": ("finetune_lora_ds.sh", ["--deepspeed", "ds_configs/zero3.json"], "LoRA, ZeRO-3"),
    "launch-qlora-single": ("finetune_qlora_single_gpu.sh", [], "Q-LoRA 4-bit, one process"),
    "launch-qlora-zero2": ("finetune_qlora_ds.sh", [], "Q-LoRA 4-bit, ZeRO-2"),
    "launch-qlora-zero3": (
        "finetune_qlora_ds.sh",
        ["--deepspeed", "ds_configs/zero3.json"],
        "Q-LoRA 4-bit, ZeRO-3 (no device_map, bf16 quant storage)",
    ),
    "launch-fsdp-full": ("finetune_fsdp.sh", [], "full fine-tune, FSDP2, full state dict saved"),
    "launch-fsdp-lora": ("finetune_fsdp.sh", ["--use_lora"], "LoRA, FSDP2"),
    "launch-lora-single": ("finetune_lora_single_gpu.sh", [], "LoRA, one process"),
    # Preference tuning (dpo.py) on generated pairs: the first step's loss must be ln 2 (policy == reference).
    "launch-dpo-lora-single": ("dpo_lora_single_gpu.sh", [], "DPO, LoRA, one process"),
    "launch-dpo-qlora-single": ("dpo_qlora_single_gpu.sh", [], "DPO, Q-LoRA 4-bit, one process"),
    "launch-dpo-lora-zero3": ("dpo_lora_ds.sh", ["--deepspeed", "ds_configs/zero3.json"], "DPO, LoRA, ZeRO-3"),
    "launch-dpo-full-zero2": ("dpo_ds.sh", [], "DPO, full fine-tune, ZeRO-2, a frozen reference copy"),
    "launch-dpo-full-zero3": (
        "dpo_ds.sh",
        ["--deepspeed", "ds_configs/zero3.json"],
        "DPO, full fine-tune, ZeRO-3, reference log-probs computed as training starts",
    ),
    "launch-dpo-fsdp-full": ("dpo_fsdp.sh", [], "DPO, full fine-tune, FSDP2, reference log-probs computed"),
}
# Launcher checks the CPU smoke run can also do (no bitsandbytes CUDA kernels, FSDP or DeepSpeed start-up there).
CPU_LAUNCHERS = ("launch-lora-single", "launch-dpo-lora-single")
OTHER_CHECKS = {
    "finetune-packing-sdpa": "finetune.py --packing, sdpa: leak probe at train begin on the GPU, loss finite",
    "finetune-packing-flash": "finetune.py --packing, flash_attention_2 (one flattened row): probe and loss finite",
    "fp16-overflow": "fp16 under ZeRO-2 with a loss scale of 2^32: overflowing steps skipped, training goes on",
    "liger-kernel": "finetune.py --use_liger_kernel (LoRA): loss finite",
    "outputs-merge": "merge_lora.py on the ZeRO-3 and FSDP LoRA adapters: merged models written",
    "outputs-gptq": "run_gptq.py on a merged launcher output: quantised model reloads",
    "outputs-chat": "sft.chat streams a reply from the ZeRO-3 and FSDP full fine-tunes and a merged adapter",
}
CHECKS = {**{name: f"bash finetune/{spec[0]}: {spec[2]}" for name, spec in LAUNCHERS.items()}, **OTHER_CHECKS}
# What each check needs of the machine besides a CUDA GPU (a reason to skip when missing).
NEEDS_MODULE = {"finetune-packing-flash": "flash_attn", "liger-kernel": "liger_kernel", "outputs-gptq": "gptqmodel"}


def missing_module(name: str) -> str | None:
    """Why a check's optional package cannot be used, or None."""
    module = NEEDS_MODULE.get(name)
    if module is None:
        return None
    try:
        __import__(module)
    except Exception as error:  # not installed, or built for another torch/CUDA
        return f"{module} does not import: {type(error).__name__}: {str(error)[:160]}"
    return None


def make_launch_model(ctx) -> str:
    """A small model of Qwen2's shape with the check model's tokenizer (the check model itself in --smoke)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    if ctx.smoke:
        return ctx.model
    folder = ctx.work / "launch-model"
    if not (folder / "config.json").is_file():
        check_config = AutoConfig.from_pretrained(ctx.model)
        config = AutoConfig.for_model(
            model_type="qwen2",
            vocab_size=check_config.vocab_size,
            hidden_size=256,
            intermediate_size=704,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=4096,
            tie_word_embeddings=True,
            bos_token_id=check_config.bos_token_id,
            eos_token_id=check_config.eos_token_id,
            pad_token_id=check_config.pad_token_id,
        )
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
        model.save_pretrained(folder)
        ctx.tokenizer.save_pretrained(folder)
    return str(folder)


def launch_args(ctx, name: str) -> list[str]:
    """What every launcher check passes after -m/-d/-o: a few short steps, no checkpoints, memory recorded."""
    return [
        *("--max_steps", str(LAUNCH_STEPS), "--per_device_train_batch_size", "2"),
        *("--gradient_accumulation_steps", "1", "--learning_rate", "1e-3", "--warmup_steps", "0"),
        *("--model_max_length", "256", "--save_strategy", "no", "--logging_steps", "1"),
        *("--lora_r", "8", "--lora_alpha", "16", "--seed", "0", "--disable_tqdm", "true"),
        *("--skip_memory_metrics", "false", "--preprocessing_cache_dir", str(ctx.work / f"cache-{name}")),
    ]


def run_logged(command: list[str], env: dict | None = None) -> tuple[int, str, float]:
    """(exit code, stdout+stderr, seconds) of a command run from the repository."""
    start = time.perf_counter()
    environ = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    try:
        done = subprocess.run(
            command, cwd=REPO, env=environ, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            timeout=TIMEOUT_S,
        )  # fmt: skip
        return done.returncode, done.stdout, time.perf_counter() - start
    except subprocess.TimeoutExpired as expired:
        output = expired.stdout or ""
        output = output.decode(errors="replace") if isinstance(output, bytes) else output
        return 124, output + f"\n[timed out after {TIMEOUT_S} s]", time.perf_counter() - start


def training_figures(output: Path) -> dict:
    """Losses, steps and GPU memory from the run's trainer_state.json (the Trainer's memory tracker)."""
    state = json.loads((output / "trainer_state.json").read_text())
    losses = [entry["loss"] for entry in state["log_history"] if "loss" in entry]
    figures = dict(steps=state["global_step"], first_loss=losses[0] if losses else None, last_loss=losses[-1:])
    final = state["log_history"][-1] if state["log_history"] else {}
    for key in ("train_mem_gpu_alloc_delta", "train_mem_gpu_peaked_delta"):
        if key in final:
            figures[key.removeprefix("train_mem_gpu_") + "_gib"] = round(final[key] / 2**30, 3)
    figures["finite"] = all(math.isfinite(value) for value in losses) and len(losses) > 0
    return figures


def judge_training(
    report, name: str, code: int, log: str, seconds: float, output: Path, steps: int, first_loss: float | None = None
) -> bool:
    """Records a training check: it must exit 0 after `steps` steps with finite losses and a final save (and the
    first step's loss `first_loss`, to 1e-3, where given)."""
    figures = {"seconds": round(seconds, 1)}
    if code != 0 or not (output / "trainer_state.json").is_file():
        report.check(name, "fail", f"exited {code}; log tail: {log[-LOG_TAIL:]!r}", **figures)
        return False
    figures.update(training_figures(output))
    saved = (output / "adapter_config.json").is_file() or (output / "config.json").is_file()
    off = first_loss is not None and abs((figures["first_loss"] or 0) - first_loss) > 1e-3
    if figures["steps"] != steps or not figures.pop("finite") or not saved or off:
        expected = f", a first loss of {first_loss:.4f}" if first_loss is not None else ""
        reason = f"expected {steps} steps with finite losses{expected} and a saved model; log tail: {log[-LOG_TAIL:]!r}"
        report.check(name, "fail", reason, **figures)
        return False
    report.check(name, "pass", **figures)
    return True


def make_pairs(ctx) -> Path:
    """Preference pairs for the dpo_*.sh launchers (bench.common's generated ones), written once."""
    path = ctx.work / "pairs.jsonl"
    return path if path.is_file() else write_pairs(path, 48, high=300)


def check_launcher(ctx, report, name: str) -> None:
    script, extra, _ = LAUNCHERS[name]
    output = ctx.work / name
    model = make_launch_model(ctx)
    preference = script.startswith("dpo_")
    data = make_pairs(ctx) if preference else ctx.data
    command = ["bash", f"finetune/{script}", "-m", model, "-d", str(data), "-o", str(output)]
    # One process on one GPU (the one-GPU launchers refuse anything else, the others default to every GPU).
    env = {"GPUS_PER_NODE": "1", "MASTER_PORT": str(free_port())}
    code, log, seconds = run_logged([*command, *launch_args(ctx, name), *extra], env)
    judge_training(
        report, name, code, log, seconds, output, LAUNCH_STEPS, first_loss=math.log(2) if preference else None
    )


def finetune_py(ctx, name: str, steps: int, *extra: str) -> tuple[int, str, float, Path]:
    output = ctx.work / name
    args = ctx.finetune_args(output, steps, *extra, "--skip_memory_metrics", "false")
    args += ["--preprocessing_cache_dir", str(ctx.work / f"cache-{name}")]
    code, log, seconds = run_logged([sys.executable, "finetune.py", *args])
    return code, log, seconds, output


def check_finetune_packing(ctx, report, name: str, attn_implementation: str) -> None:
    code, log, seconds, output = finetune_py(
        ctx, name, LAUNCH_STEPS, "--use_lora", "--packing", "--attn_implementation", attn_implementation
    )
    if judge_training(report, name, code, log, seconds, output, LAUNCH_STEPS) and "Packing check passed" not in log:
        report.check(name, "fail", f"the leak probe did not run; log tail: {log[-LOG_TAIL:]!r}")


def check_fp16_overflow(ctx, report) -> None:
    name = "fp16-overflow"
    config = json.loads((REPO / "ds_configs/zero2.json").read_text())
    # A loss scale of 2^32: the first steps' fp16 gradients overflow for certain; each halves the scale.
    config["fp16"].update(initial_scale_power=32, hysteresis=1)
    config_path = ctx.work / "zero2_fp16_overflow.json"
    config_path.write_text(json.dumps(config))
    output = ctx.work / name
    steps = 20
    command = ["bash", "finetune/finetune_lora_ds.sh", "-m", make_launch_model(ctx), "-d", str(ctx.data)]
    command += ["-o", str(output), *launch_args(ctx, name), "--max_steps", str(steps), "--fp16", "true"]
    command += ["--deepspeed", str(config_path)]
    code, log, seconds = run_logged(command, {"GPUS_PER_NODE": "1", "MASTER_PORT": str(free_port())})
    overflows = log.count("fp16 gradients overflowed") + log.count("OVERFLOW!")
    if judge_training(report, name, code, log, seconds, output, steps):
        figures = dict(training_figures(output), overflow_messages=overflows, seconds=round(seconds, 1))
        figures.pop("finite", None)
        if overflows == 0:
            report.check(name, "fail", "no overflow happened: nothing was tested", **figures)
        else:
            report.check(name, "pass", **figures)


def check_liger(ctx, report) -> None:
    name = "liger-kernel"
    code, log, seconds, output = finetune_py(ctx, name, LAUNCH_STEPS, "--use_lora", "--use_liger_kernel", "true")
    judge_training(report, name, code, log, seconds, output, LAUNCH_STEPS)


def check_outputs_merge(ctx, report) -> None:
    name = "outputs-merge"
    adapters = [ctx.work / source for source in ("launch-lora-zero3", "launch-fsdp-lora", "launch-lora-single")]
    adapters = [adapter for adapter in adapters if (adapter / "adapter_config.json").is_file()]
    if not adapters:
        report.check(name, "skip", "no launcher saved an adapter (see the launch-* checks)")
        return
    merged, seconds, failures = [], 0.0, []
    for adapter in adapters:
        target = ctx.work / f"merged-{adapter.name}"
        code, log, took = run_logged(
            [sys.executable, "merge_lora.py", "--adapter", str(adapter), "--output", str(target), "--overwrite"]
        )
        seconds += took
        if code == 0 and (target / "config.json").is_file():
            merged.append(str(target))
        else:
            failures.append(f"{adapter.name}: exited {code}; log tail: {log[-LOG_TAIL // 2 :]!r}")
    ctx.launch_merged = merged
    figures = dict(merged=[Path(m).name for m in merged], seconds=round(seconds, 1))
    report.check(name, "fail" if failures else "pass", "; ".join(failures), **figures)


def check_outputs_gptq(ctx, report) -> None:
    name = "outputs-gptq"
    merged = getattr(ctx, "launch_merged", [])
    if not merged:
        report.check(name, "skip", "needs outputs-merge's merged model")
        return
    target = ctx.work / "gptq"
    command = [sys.executable, "run_gptq.py", "--model_name_or_path", merged[0], "--data_path", str(ctx.data)]
    command += ["--out_path", str(target), "--bits", "4", "--max_len", "256", "--overwrite"]
    code, log, seconds = run_logged(command)
    figures = dict(model=Path(merged[0]).name, seconds=round(seconds, 1))
    if code != 0:
        report.check(name, "fail", f"exited {code}; log tail: {log[-LOG_TAIL:]!r}", **figures)
    else:
        report.check(name, "pass", log.strip().splitlines()[-3] if log.strip() else "", **figures)


def check_outputs_chat(ctx, report) -> None:
    import torch

    from sft.chat import GenerationSettings, load_for_chat, stream_reply

    name = "outputs-chat"
    candidates = [ctx.work / "launch-full-zero3", ctx.work / "launch-fsdp-full", *map(Path, ctx.launch_merged)]
    folders = [folder for folder in candidates if (folder / "config.json").is_file()]
    if not folders:
        report.check(name, "skip", "no launcher saved a full model and no adapter was merged")
        return
    settings = GenerationSettings(max_new_tokens=8, min_new_tokens=8, temperature=0.0)
    start, replies, failures = time.perf_counter(), {}, []
    for folder in folders:
        try:
            model, tokenizer = load_for_chat(str(folder))
            pieces = list(stream_reply(model, tokenizer, [{"role": "user", "content": "Hello"}], settings))
            replies[folder.name] = f"{len(pieces)} pieces on {model.device.type}"
            del model
        except Exception as error:  # a saved model that does not load or generate is this check's failure
            failures.append(f"{folder.name}: {type(error).__name__}: {str(error)[:200]}")
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    figures = dict(replies=replies, seconds=round(time.perf_counter() - start, 1))
    report.check(name, "fail" if failures else "pass", "; ".join(failures), **figures)


def parallel_checks(ctx, report) -> dict:
    """The independent checks, each its own process: name -> function. Run these concurrently."""
    checks = {name: (lambda name=name: check_launcher(ctx, report, name)) for name in LAUNCHERS}
    checks["finetune-packing-sdpa"] = lambda: check_finetune_packing(ctx, report, "finetune-packing-sdpa", "sdpa")
    checks["finetune-packing-flash"] = lambda: check_finetune_packing(
        ctx, report, "finetune-packing-flash", "flash_attention_2"
    )
    checks["fp16-overflow"] = lambda: check_fp16_overflow(ctx, report)
    checks["liger-kernel"] = lambda: check_liger(ctx, report)
    return checks


def output_checks(ctx, report) -> dict:
    """The checks on the launchers' outputs, in this order, after the parallel ones."""
    ctx.launch_merged = []
    return {
        "outputs-merge": lambda: check_outputs_merge(ctx, report),
        "outputs-gptq": lambda: check_outputs_gptq(ctx, report),
        "outputs-chat": lambda: check_outputs_chat(ctx, report),
    }


def gpu_only(name: str) -> bool:
    """Checks that run only on a CUDA GPU in the suite (bitsandbytes kernels, FSDP, DeepSpeed start-up, fp16)."""
    if name in LAUNCHERS:
        return name not in CPU_LAUNCHERS
    return name in ("finetune-packing-flash", "fp16-overflow", "liger-kernel", "outputs-gptq")
