"""Keeps other libraries' known-harmless chatter out of what our scripts print, and sets up our own log lines.

Importing this module changes nothing. Every entry point calls `setup()` in its first lines, before it imports the
libraries (some talk while being imported), and `setup_logging()` once it knows how much to log.

Each message silenced here is named precisely (a logger and the start of the message, or a warning's text and
category); everything else, our own errors and the libraries' other warnings included, gets through. Nothing is
redirected. What is silenced, and why it is harmless:

- torchao, when imported by transformers, fails to load its CUDA-only `.so` files on a CPU-only torch
  ("Failed to load ... .so") and registers two enums with torch's pytree ("... is an Enum subclass and is now
  natively supported by torch.compile ..."); neither changes what we run.
- GPT-QModel prints a banner and sets `PYTORCH_ALLOC_CONF` and `CUDA_DEVICE_ORDER` when imported (saying so in
  `INFO  ENV:` lines), logs its kernel choices and compile steps, and warns that the GIL is enabled; optimum logs
  each module it quantises. `quiet_gptq()`, called on the GPTQ paths only, keeps both libraries' warnings and drops
  their INFO lines (optimum's block progress bars stay). peft imports GPT-QModel for every layer it wraps with
  LoRA merely to ask whether the layer is a GPT-QModel layer; a layer can only be one once gptqmodel is imported,
  so until then peft is told that gptqmodel is absent: only GPTQ paths (run_gptq.py, loading a GPTQ model)
  import it. Its GIL warning is turned off with its own GPTQMODEL_DISABLE_GIL_WARNING variable.
- DeepSpeed, imported by accelerate, logs "Setting accelerator to CPU" when torch sees no GPU (silenced only then).
- bitsandbytes logs that its optional `kernels` package is missing on the CPU and falls back to its own code.
- transformers' "`loss_type=None` was set in the config but it is unrecognized. Using the default loss" notice:
  models whose config names no loss (most) get the causal-LM loss, which is what we train with.
- FutureWarning "`is_gradient_checkpointing` is deprecated" (peft asks transformers for it) and torch's
  "'pin_memory' argument is set as true but no accelerator is found" UserWarning on the CPU.
- torchrun's "failed (exitcode: N) ..." line under the launchers (`quiet_torchrun`): the launcher says how the
  run ended itself (sft/torchrun.py).
- peft's "PiSSA/OLoRA changes the base weights of the model ... Consider converting ..." UserWarning: finetune.py
  saves such adapters converted (--init_lora_weights).

`--verbose` on any script's command line (`setup()` takes it off before the script parses its arguments) or
SFT_VERBOSE=1 lets all of it through; so does a library's own variable for its own messages (TORCH_LOGS for torch's
loggers).
"""

from __future__ import annotations

import logging
import os
import sys
import warnings

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
VERBOSE = False  # set by setup()


class _DropMessages(logging.Filter):
    """Drops a logger's records whose message starts with one of `starts` (and contains `contains`, if given)."""

    def __init__(self, *starts: str, contains: str = ""):
        super().__init__()
        self.starts, self.contains = starts, contains

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not (message.startswith(self.starts) and self.contains in message)


class _BelowWarning(logging.Filter):
    """Drops a logger's DEBUG and INFO records; its warnings and errors get through."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING


def quiet_gptq() -> None:
    """On the GPTQ paths, before gptqmodel is imported: GPT-QModel's INFO lines (its banner, `INFO  ENV:` notices of
    the environment variables it sets, kernel choices, extension and compile notices) and optimum's per-module
    "Quantizing ... in block" lines are dropped; both libraries' warnings get through. Nothing when verbose."""
    if VERBOSE:
        return
    try:
        from logbar import LogBar  # GPT-QModel's logger: a logging.Logger of its own that prints by itself
    except ImportError:
        return
    LogBar.shared().setLevel(logging.WARNING)
    logging.getLogger("optimum.gptq.quantizer").addFilter(_BelowWarning())


def quiet_torchrun() -> None:
    """In sft.torchrun, the launchers' torchrun: its "failed (exitcode: N) local_rank: ..." line, logged as soon as
    a worker fails, is dropped; the launcher then prints the worker's error line, or for a crash torchrun's report,
    which names the same exit code and worker. Nothing when verbose."""
    if not VERBOSE and os.environ.get("SFT_VERBOSE", "0") in ("", "0"):
        logging.getLogger("torch.distributed.elastic.multiprocessing.api").addFilter(_DropMessages("failed (exitcode"))


def _silence_known_chatter() -> None:
    # Filters, not levels: the libraries set their loggers' levels themselves on import, and other messages of the
    # same loggers should still get through.
    logging.getLogger("torchao").addFilter(_DropMessages("Failed to load ", contains=".so"))
    if "TORCH_LOGS" not in os.environ:
        logging.getLogger("torch.utils._pytree").addFilter(
            _DropMessages("<enum ", contains="is an Enum subclass and is now natively supported by torch.compile")
        )
    logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(
        _DropMessages("Failed to load CPU gemm_4bit_forward from kernels-community")
    )
    os.environ.setdefault("GPTQMODEL_DISABLE_GIL_WARNING", "1")
    # The Trainer and GPTQ packing ask a model config without `loss_type` (most have none) for its loss: the default.
    logging.getLogger("transformers.modeling_utils").addFilter(
        _DropMessages("`loss_type=None` was set in the config but it is unrecognized")
    )
    warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing` is deprecated", category=FutureWarning)
    warnings.filterwarnings(
        "ignore", message=r"'pin_memory' argument is set as true but no accelerator is found", category=UserWarning
    )
    # finetune.py converts PiSSA/OLoRA adapters to plain LoRA on save, which is what peft's warning recommends.
    warnings.filterwarnings(
        "ignore", message=r"(PiSSA|OLoRA) changes the base weights of the model", category=UserWarning
    )
    import torch

    if not torch.cuda.is_available():
        logging.getLogger("DeepSpeed").addFilter(_DropMessages("Setting accelerator to CPU."))


def _gptqmodel_only_once_imported() -> None:
    """peft asks `is_gptqmodel_available()` before looking for GPT-QModel layers, and then imports gptqmodel."""
    import importlib

    for name in ("peft.utils.other", "peft.tuners.lora.gptq", "peft.tuners.lora.awq", "peft.utils.quantization_utils"):
        try:
            module = importlib.import_module(name)
        except ImportError:  # another peft version: nothing to do there
            continue
        available = getattr(module, "is_gptqmodel_available", None)
        if available is None or getattr(available, "_sft_gated", False):
            continue

        def gated(available=available) -> bool:
            return "gptqmodel" in sys.modules and available()

        gated._sft_gated = True  # type: ignore[attr-defined]
        module.is_gptqmodel_available = gated


def setup(argv: list[str] | None = None) -> bool:
    """Takes `--verbose` off `argv` (default: sys.argv, edited in place, so the script's parser never sees it),
    silences the known chatter unless verbose, and keeps peft from importing gptqmodel. Returns whether verbose."""
    global VERBOSE
    argv = sys.argv if argv is None else argv
    asked = "--verbose" in argv[1:]
    argv[1:] = [argument for argument in argv[1:] if argument != "--verbose"]
    VERBOSE = asked or os.environ.get("SFT_VERBOSE", "0") not in ("", "0")
    if not VERBOSE:
        _silence_known_chatter()
    _gptqmodel_only_once_imported()
    return VERBOSE


def setup_logging(level: int = logging.INFO) -> None:
    """Our log lines on stderr, `<time> <LEVEL> <logger>: <message>`, from `level` up: the same in every script."""
    logging.basicConfig(format=LOG_FORMAT, level=level)
