"""GPU memory and speed of LoRA, Q-LoRA and full fine-tuning, in the layout of the Qwen README's profiling table.

The model is a randomly initialised one of a real shape (the configs below are copied from the released
models' config.json, so nothing is downloaded; weight values change neither speed nor memory). It is written
once to --work_dir and loaded through sft.modeling, the same path finetune.py takes. Each cell trains
--steps optimizer steps (at least 4) of batch 1 and gradient accumulation 8 on random tokens of one sequence
length, and reports the peak GPU memory allocated and the median seconds per optimizer step. Before them, a
warm-up step and one forward and backward pass on each further shape the timed steps meet (timed apart): a
kernel that builds a plan per new shape (cuDNN attention) pays for it there, not in a timed step. Each step's and
each micro-batch's time is kept (`measure_batches`; micro-batches by CUDA events, with no synchronisation between
them), as are the attention kernels that ran (sdpa's choice among flash, memory-efficient, cuDNN and math).

    python -m bench.gpu_profile --model qwen2.5-1.5b                      # all modes, 256..8192
    python -m bench.gpu_profile --model qwen2-7b --modes lora qlora --attn_implementation flash_attention_2
    python -m bench.gpu_profile --model qwen2-7b --use_liger_kernel      # pip install liger-kernel
    python -m bench.gpu_profile --tiny --device cpu                       # a smoke run anywhere (tests use it)
"""

from __future__ import annotations

import sft.quiet

if __name__ == "__main__":
    sft.quiet.setup()  # first: it silences known chatter of the libraries imported below

# isort: split
import argparse
import gc
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from transformers import AutoConfig, AutoModelForCausalLM  # noqa: E402

from sft.loss import causal_lm_loss, fused_loss_for  # noqa: E402
from sft.modeling import add_lora, load_model, quantization_config  # noqa: E402

# From the released config.json files (Qwen/Qwen2.5-0.5B-Instruct, Qwen/Qwen2.5-1.5B-Instruct, Qwen/Qwen2-7B-Instruct).
CONFIGS = {
    "qwen2.5-0.5b": dict(
        model_type="qwen2",
        vocab_size=151936,
        hidden_size=896,
        intermediate_size=4864,
        num_hidden_layers=24,
        num_attention_heads=14,
        num_key_value_heads=2,
        max_position_embeddings=32768,
        rope_theta=1000000.0,
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
        hidden_act="silu",
    ),
    "qwen2.5-1.5b": dict(
        model_type="qwen2",
        vocab_size=151936,
        hidden_size=1536,
        intermediate_size=8960,
        num_hidden_layers=28,
        num_attention_heads=12,
        num_key_value_heads=2,
        max_position_embeddings=32768,
        rope_theta=1000000.0,
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
        hidden_act="silu",
    ),
    "qwen2-7b": dict(
        model_type="qwen2",
        vocab_size=152064,
        hidden_size=3584,
        intermediate_size=18944,
        num_hidden_layers=28,
        num_attention_heads=28,
        num_key_value_heads=4,
        max_position_embeddings=32768,
        rope_theta=1000000.0,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        hidden_act="silu",
    ),
    "tiny": dict(
        model_type="qwen2",
        vocab_size=1024,
        hidden_size=64,
        intermediate_size=192,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=8192,
        tie_word_embeddings=False,
    ),
}
MODE_NAMES = {"lora": "LoRA", "qlora": "Q-LoRA", "full": "Full-parameter"}
MIN_TIMED_STEPS = 4
# Dispatched operators that are attention kernels: sdpa's choices (aten::_scaled_dot_product_{flash_attention,
# efficient_attention,cudnn_attention,...}) and flash_attn's own. sdpa's math fallback shows none (it decomposes).
ATTENTION_OPERATORS = ("scaled_dot_product", "flash_attn")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(CONFIGS), default="qwen2.5-1.5b", help="model shape")
    parser.add_argument("--tiny", action="store_true", help="shorthand for --model tiny")
    parser.add_argument("--modes", nargs="+", choices=list(MODE_NAMES), default=list(MODE_NAMES))
    parser.add_argument(
        "--seq_lengths", nargs="+", type=int, help="default: 256 512 1024 2048 4096 8192 (32 64 with --tiny)"
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--attn_implementation", default="sdpa", help="sdpa, eager or flash_attention_2")
    parser.add_argument("--use_liger_kernel", action="store_true", help="Liger kernels (as transformers' flag)")
    parser.add_argument(
        "--plain_loss", action="store_true", help="the model's own loss (whole logits), not finetune.py's fused loss"
    )
    parser.add_argument("--gradient_accumulation_steps", type=int, default=8)
    parser.add_argument("--steps", type=int, default=MIN_TIMED_STEPS, help="timed optimizer steps per cell (>= 4)")
    parser.add_argument("--no_gradient_checkpointing", action="store_true", help="Qwen's profile uses it")
    parser.add_argument("--lora_r", type=int, default=64)
    parser.add_argument("--work_dir", default=None, help="where the random model is written (default: a temp dir)")
    args = parser.parse_args(argv)
    if args.steps < MIN_TIMED_STEPS:
        parser.error(f"--steps: at least {MIN_TIMED_STEPS}, so that the median is not one step's accident")
    if args.tiny:
        args.model = "tiny"
    if not args.seq_lengths:
        args.seq_lengths = [32, 64] if args.model == "tiny" else [256, 512, 1024, 2048, 4096, 8192]
    return args


def write_random_model(name: str, work_dir: Path, device: str) -> Path:
    path = work_dir / f"random-{name}"
    if (path / "config.json").exists():
        return path
    config = AutoConfig.for_model(**CONFIGS[name])
    torch.manual_seed(0)
    with torch.device(device):  # initialising 7B parameters is far quicker on the GPU
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(path)
    del model
    return path


def peak_memory_reset(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    else:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM, the process's peak RSS (Linux)


def peak_memory_gib(device: str) -> float:
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**30
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 2**20
    return float("nan")


def build(path: Path, mode: str, args: argparse.Namespace):
    dtype = torch.bfloat16 if args.device != "cpu" else torch.float32
    quantization = quantization_config(4, dtype) if mode == "qlora" else None
    model = load_model(str(path), dtype, quantization, attn_implementation=args.attn_implementation)
    if quantization is None:
        model.to(args.device)
    if args.use_liger_kernel:
        from liger_kernel.transformers import _apply_liger_kernel_to_instance

        _apply_liger_kernel_to_instance(model=model)
    checkpointing = not args.no_gradient_checkpointing
    model.config.use_cache = False
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if mode in ("lora", "qlora"):
        model = add_lora(
            model,
            r=args.lora_r,
            alpha=16,
            dropout=0.05,
            target_modules="all-linear",
            quantized=mode == "qlora",
            gradient_checkpointing=checkpointing,
        )
    return model


def measure(model, seq_length: int, args: argparse.Namespace) -> tuple[float, float]:
    """(peak memory GiB, median seconds per optimizer step) for one sequence length, on rows of random tokens."""
    vocabulary = model.get_input_embeddings().weight.shape[0]
    generator = torch.Generator().manual_seed(seq_length)
    batches = []
    for _ in range((args.steps + 1) * args.gradient_accumulation_steps):
        input_ids = torch.randint(0, vocabulary, (1, seq_length), generator=generator)
        batches.append({"input_ids": input_ids, "labels": input_ids})
    measured = measure_batches(model, batches, args)
    return measured["peak_gib"], measured["median_step_seconds"]


def check_recomputation(model, batch: dict, checkpointing: bool) -> None:
    """Runs one forward and backward pass and checks that the first decoder layer's attention ran twice (forward
    and recompute) with gradient checkpointing, once without: so a cell never reports what it did not measure.
    (The attention, not the layer: transformers may checkpoint the layer's forward inside its hooks.)"""
    layer = next(module for module in model.modules() if type(module).__name__.endswith("DecoderLayer"))
    attention = getattr(layer, "self_attn", None) or next(layer.children())
    calls = []
    handle = attention.register_forward_pre_hook(lambda module, args: calls.append(module.training))
    try:
        model(**batch, use_cache=False).loss.backward()
    finally:
        handle.remove()
    model.zero_grad(set_to_none=True)
    expected = 2 if checkpointing else 1
    if len(calls) != expected or not all(calls):
        raise RuntimeError(
            f"gradient checkpointing {'on' if checkpointing else 'off'}: the first attention layer ran {len(calls)} "
            f"time(s) per step (training mode: {calls}), expected {expected} in training mode"
        )


class AttentionKernels(TorchDispatchMode):
    """The attention operators dispatched while it is active: what ran, not what was asked for (sdpa picks its
    kernel per call from the device, dtype, mask and shapes)."""

    def __init__(self):
        super().__init__()
        self.names: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.name()
        if any(operator in name for operator in ATTENTION_OPERATORS) and not name.endswith("_backward"):
            self.names.add(name.removeprefix("aten::"))
        return func(*args, **(kwargs or {}))


class Clock:
    """Marks in the device's stream (CUDA events: no synchronisation between marks) or on the host (the CPU runs
    synchronously), and the seconds between consecutive marks once the device has finished."""

    def __init__(self, device: str):
        self.cuda = device.startswith("cuda")

    def mark(self):
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def intervals(self, marks: list) -> list[float]:
        if not self.cuda:
            return [end - start for start, end in zip(marks, marks[1:])]
        torch.cuda.synchronize()
        return [start.elapsed_time(end) / 1000 for start, end in zip(marks, marks[1:])]


def shape_of(batch: dict) -> tuple[int, ...]:
    return tuple(batch["input_ids"].shape)


def measure_batches(model, batches: list[dict], args: argparse.Namespace) -> dict:
    """Trains on `batches`, args.gradient_accumulation_steps micro-batches per optimizer step.

    The first step is a warm-up; then one forward and backward pass on each shape the timed steps meet that the
    warm-up did not (gradients dropped), so that no timed step pays for a first run of a shape; the warm-up's
    seconds are reported apart. Returns peak_gib; step_seconds, micro_batch_seconds (per step, per micro-batch)
    and optimizer_seconds of each timed step, and their median_step_seconds; step_losses (each step's mean
    micro-batch loss, read after its timing); warmup_seconds, warmup_shapes and shapes (input_ids shapes of the
    warm-up's extra passes and of the timed micro-batches); attention_kernels (the attention operators that ran).
    """
    accumulation = args.gradient_accumulation_steps
    if len(batches) < 2 * accumulation:
        raise ValueError("measure_batches needs micro-batches for at least two optimizer steps (one is warm-up)")
    # Training mode, as the Trainer sets it: transformers recomputes activations (gradient checkpointing) and
    # applies LoRA dropout only in training mode, so a model left in eval mode would be measured without either.
    model.train()
    # The loss finetune.py trains with (sft/loss.py: no whole logits), or the model's own with --plain_loss; decided
    # once per cell, as the Trainer decides once per run (checked against the model's own loss on the first batch).
    first = {k: v.to(args.device) if isinstance(v, torch.Tensor) else v for k, v in batches[0].items()}
    fused = fused_loss_for(
        model, liger=args.use_liger_kernel, enabled=not getattr(args, "plain_loss", False), batch=first
    )
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=1e-5)
    synchronize = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    clock = Clock(args.device)

    def on_device(batch: dict) -> dict:
        return {k: v.to(args.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}

    def forward_backward(batch: dict) -> torch.Tensor:
        loss = causal_lm_loss(model, {**on_device(batch), "use_cache": False}, fused) / accumulation
        loss.backward()
        return loss.detach()

    peak_memory_reset(args.device)
    start = time.perf_counter()
    check_recomputation(model, on_device(batches[0]), not args.no_gradient_checkpointing)
    kernels = AttentionKernels()
    with kernels:
        forward_backward(batches[0])
    for batch in batches[1:accumulation]:
        forward_backward(batch)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    seen = {shape_of(batch) for batch in batches[:accumulation]}
    timed = batches[accumulation:]
    shapes = sorted({shape_of(batch) for batch in timed})
    warmup_shapes = [shape for shape in shapes if shape not in seen]
    for shape in warmup_shapes:
        forward_backward(next(batch for batch in timed if shape_of(batch) == shape))
        model.zero_grad(set_to_none=True)
    synchronize()
    warmup_seconds = time.perf_counter() - start

    step_seconds, micro_batch_seconds, optimizer_seconds, step_losses = [], [], [], []
    for step in range(len(timed) // accumulation):
        start = time.perf_counter()
        marks = [clock.mark()]
        step_loss = torch.zeros((), device=args.device)
        for batch in timed[step * accumulation : (step + 1) * accumulation]:
            step_loss += forward_backward(batch).float()
            marks.append(clock.mark())
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        marks.append(clock.mark())
        synchronize()
        step_seconds.append(time.perf_counter() - start)
        intervals = clock.intervals(marks)
        micro_batch_seconds.append(intervals[:-1])
        optimizer_seconds.append(intervals[-1])
        step_losses.append(step_loss.item())  # after the step's timing
    peak = peak_memory_gib(args.device)
    del optimizer
    return {
        "peak_gib": peak,
        "median_step_seconds": statistics.median(step_seconds),
        "step_seconds": step_seconds,
        "micro_batch_seconds": micro_batch_seconds,
        "optimizer_seconds": optimizer_seconds,
        "step_losses": step_losses,
        "warmup_seconds": warmup_seconds,
        "warmup_shapes": [list(shape) for shape in warmup_shapes],
        "shapes": [list(shape) for shape in shapes],
        "attention_kernels": sorted(kernels.names) or ["none (eager or sdpa's math: matmul and softmax)"],
    }


def profile(args: argparse.Namespace) -> dict[tuple[str, int], str]:
    work_dir = Path(args.work_dir or tempfile.mkdtemp(prefix="gpu-profile-"))
    path = write_random_model(args.model, work_dir, args.device)
    cells: dict[tuple[str, int], str] = {}
    for mode in args.modes:
        model = None
        try:
            model = build(path, mode, args)
            for seq_length in args.seq_lengths:
                try:
                    peak, seconds = measure(model, seq_length, args)
                    cells[mode, seq_length] = f"{peak:.1f}G / {seconds:.3g}s/it"
                except torch.OutOfMemoryError:
                    cells[mode, seq_length] = "OOM"
                    gc.collect()
                    if args.device.startswith("cuda"):
                        torch.cuda.empty_cache()
                print(f"{MODE_NAMES[mode]} {seq_length}: {cells[mode, seq_length]}", flush=True)
        except torch.OutOfMemoryError:
            for seq_length in args.seq_lengths:
                cells.setdefault((mode, seq_length), "OOM (load)")
        finally:
            del model
            gc.collect()
            if args.device.startswith("cuda"):
                torch.cuda.empty_cache()
    return cells


def table(cells: dict[tuple[str, int], str], args: argparse.Namespace) -> str:
    lengths = args.seq_lengths
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else args.device
    memory = "peak GPU memory allocated" if args.device.startswith("cuda") else "peak process RSS"
    lines = [
        f"{args.model}, {device}, {args.attn_implementation}{', Liger' if args.use_liger_kernel else ''}"
        f"{', plain loss' if args.plain_loss else ', fused loss'}, "
        f"batch 1, gradient accumulation {args.gradient_accumulation_steps}, "
        f"gradient checkpointing {'off' if args.no_gradient_checkpointing else 'on'}; cells: {memory} / median s "
        f"per step of {args.steps}",
        "",
        "| Model Size | Method | " + " | ".join(f"Sequence Length {n}" for n in lengths) + " |",
        "|---|---|" + "---|" * len(lengths),
    ]
    for index, mode in enumerate(args.modes):
        name = args.model if index == 0 else ""
        lines.append(f"| {name} | {MODE_NAMES[mode]} | " + " | ".join(cells[mode, n] for n in lengths) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> str:
    args = parse_args(argv)
    result = table(profile(args), args)
    print(result)
    return result


if __name__ == "__main__":
    main()
