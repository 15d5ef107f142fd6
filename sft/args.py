"""finetune.py's arguments: four dataclasses (model, data, training, LoRA), their checks, and the parser.

The flags follow Qwen's finetune.py, so its users' commands keep working. A run's arguments come from the command
line, or from one JSON or YAML file followed by command-line flags that override it
(`python finetune.py run.yaml --learning_rate 1e-4`). `sft.inspect` takes the same flags.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal, NamedTuple

import torch
import transformers
import yaml
from transformers import HfArgumentParser
from transformers.integrations import is_deepspeed_zero3_enabled

from sft.data.sources import source_names
from sft.errors import ConfigurationError

CONFIG_SUFFIXES = (".json", ".yaml", ".yml")


@dataclass
class ModelArguments:
    model_name_or_path: str | None = field(
        default=None, metadata={"help": "Hub id or local folder of the model to fine-tune (required)."}
    )
    trust_remote_code: bool = field(
        default=False,
        metadata={"help": "Run the model's own code from its folder (Qwen-1 needs it). Off unless asked."},
    )
    attn_implementation: str | None = field(
        default=None, metadata={"help": "eager, sdpa or flash_attention_2; the model's default when unset."}
    )
    model_dtype: str | None = field(
        default=None,
        metadata={
            "help": "dtype to load the weights in (bfloat16, float16, float32). Default: float32 for full "
            "fine-tuning (the optimizer keeps fp32 weights, --bf16/--fp16 run in autocast), the --bf16/"
            "--fp16 precision for the frozen base of LoRA."
        },
    )
    chat_template: str | None = field(
        default=None,
        metadata={
            "help": "Chat template to train with instead of the model's own: a Jinja file, or chatml (built in). "
            "Saved with the output (chat_template.jinja), so the demos and merge_lora.py use it too."
        },
    )


@dataclass
class DataArguments:
    data_path: list[str] | None = field(
        default=None,
        metadata={
            "help": "Training data (required): one or more sources, one argument each (--data_path a.jsonl "
            "'my data/b.parquet'): files (.json, .jsonl, .parquet, "
            ".csv, .tsv, .arrow), globs, folders (a downloaded hub dataset, a save_to_disk folder), hub dataset ids, "
            "or a data config file (YAML, or JSON with 'sources') listing sources with options. Samples: Qwen "
            "'conversations', ChatML 'messages', 'prompt'/'completion', alpaca or plain 'text'."
        },
    )
    eval_data_path: list[str] | None = field(
        default=None, metadata={"help": "Evaluation data: one or more sources, as --data_path."}
    )
    val_size: float | None = field(
        default=None,
        metadata={
            "help": "Without --eval_data_path: cut a validation set off the training data, a fraction (0.05) or a "
            "count (500) of samples, drawn with --seed."
        },
    )
    max_samples: int | None = field(
        default=None, metadata={"help": "Take at most the first N samples of each source (quick runs)."}
    )
    lazy_preprocess: bool = field(
        default=False,
        metadata={"help": "Accepted for Qwen compatibility; preprocessing is always done once up front and cached."},
    )
    system_prompt: str | None = field(
        default=None,
        metadata={"help": "System message for samples that have none. Unset: the chat template's own default."},
    )
    train_on: Literal["assistant", "last_assistant", "all"] = field(
        default="assistant",
        metadata={
            "help": "Tokens that carry loss: every assistant turn (with its end-of-turn token), only the "
            "last one, or all tokens."
        },
    )
    drop_long_samples: bool = field(
        default=False, metadata={"help": "Drop samples longer than model_max_length instead of truncating them."}
    )
    fold_system_prompt: bool = field(
        default=True,
        metadata={
            "help": "Where the chat template refuses a system message (Gemma-2), put its text at the start of the "
            "first user message; false: such a sample is an error."
        },
    )
    preprocessing_num_workers: int | None = field(
        default=None, metadata={"help": "Processes for tokenisation (datasets.map num_proc)."}
    )
    preprocessing_cache_dir: str | None = field(
        default=None, metadata={"help": "Where tokenised data is cached. Default: the datasets cache."}
    )
    packing: bool = field(
        default=False,
        metadata={
            "help": "Pack samples into sequences of up to model_max_length (best-fit decreasing), each keeping its "
            "own position ids and attending only to itself; no padding. Batch size then counts packed sequences. "
            "dpo.py packs whole pairs (a pair's chosen and rejected answers in the same row)."
        },
    )

    def __post_init__(self):
        # A config file's string (one path, or the older space-separated names) as the list the flags give.
        self.data_path = source_names(self.data_path) if self.data_path is not None else None
        self.eval_data_path = source_names(self.eval_data_path) if self.eval_data_path is not None else None


@dataclass
class TrainingArguments(transformers.TrainingArguments):
    output_dir: str = field(default="output", metadata={"help": "Where checkpoints and the final model go."})
    model_max_length: int = field(
        default=2048, metadata={"help": "Maximum tokens per sample; longer ones are truncated (or dropped)."}
    )
    use_lora: bool = field(default=False, metadata={"help": "Train LoRA adapters instead of all weights."})
    group_by_length: bool = field(
        default=False, metadata={"help": "Batch samples of similar length together (less padding)."}
    )
    start_over: bool = field(
        default=False,
        metadata={
            "help": "Train from scratch: the earlier run in output_dir is moved aside to "
            "<output_dir>.previous-<time> (kept), instead of resumed."
        },
    )
    max_nonfinite_steps: int = field(
        default=1,
        metadata={
            "help": "Stop after this many optimizer steps in a row with a NaN/inf loss or gradient norm "
            "(each such step's update is skipped; fp16 overflows the loss scaler skips do not count; under "
            "DeepSpeed, whose update is already applied, the first stops the run); the last good checkpoint is kept."
        },
    )
    pad_to_multiple_of: int | None = field(
        default=None,
        metadata={
            "help": "Pad each batch's rows (padded or packed) to a multiple of this many tokens, never past "
            "model_max_length, so that attention kernels meet a handful of shapes in a run (cuDNN attention and "
            "torch.compile build a plan per new shape); the padding is never trained. Default: 64 on CUDA, none "
            "(the longest row) elsewhere; 1: none."
        },
    )
    fused_loss: bool = field(
        default=True,
        metadata={
            "help": "Compute the training loss chunk by chunk over trained positions only, without the whole "
            "[tokens x vocabulary] logits (same loss and gradients, far less memory); false: the model's own loss."
        },
    )

    def __post_init__(self):
        if self.bf16 and self.fp16:
            raise ConfigurationError("--bf16 and --fp16 exclude each other: pick one")
        if self.bf16 and not self.use_cpu:
            from sft.modeling import gpu_bf16  # the one dtype policy (a slow import, only where --bf16 is asked)

            cuda_bf16 = gpu_bf16("cuda") if torch.cuda.is_available() else None
            check_bf16(cuda_bf16, torch.accelerator.current_accelerator() is not None, _gpu_name())
        if self.group_by_length:
            self.train_sampling_strategy = "group_by_length"
        super().__post_init__()


def _gpu_name() -> str:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "none"


def check_bf16(cuda_bf16: bool | None, accelerator_present: bool, gpu_name: str = "this GPU") -> None:
    """--bf16 (without --use_cpu) on this machine: `cuda_bf16` is None without a CUDA GPU, else whether it computes
    bf16 natively (an emulating GPU, V100 or T4, would run far slower than in fp16)."""
    if cuda_bf16 is False:
        raise ConfigurationError(f"--bf16: this GPU ({gpu_name}) has no native bf16; use --fp16")
    if cuda_bf16 is None and not accelerator_present:
        raise ConfigurationError("--bf16: no GPU found; drop --bf16, or add --use_cpu for bf16 autocast on the CPU")


@dataclass
class LoraArguments:
    lora_r: int = field(default=64, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA scaling numerator (scale = alpha / r)."})
    lora_dropout: float = field(default=0.05, metadata={"help": "Dropout on the LoRA input."})
    lora_target_modules: list[str] = field(
        default_factory=lambda: ["all-linear"],
        metadata={"help": "Module names to adapt; 'all-linear' is every linear layer but the output layer."},
    )
    lora_target: Literal["all", "attention"] = field(
        default="all",
        metadata={
            "help": "What LoRA adapts. all: --lora_target_modules, and on a mixture-of-experts model the experts "
            "too (their fused parameters, without dropout; the router never). attention: the attention and "
            "linear-attention projections only (no MLP, expert, shared expert or router); not with "
            "--lora_target_modules."
        },
    )
    lora_weight_path: str = field(
        default="",
        metadata={
            "help": "A LoRA adapter folder to continue training (its own rank, alpha and targets are used; the "
            "other --lora_* flags are then ignored)."
        },
    )
    lora_bias: Literal["none", "all", "lora_only"] = field(default="none", metadata={"help": "Which biases to train."})
    q_lora: bool = field(default=False, metadata={"help": "Q-LoRA: LoRA on a bitsandbytes-quantised base model."})
    bits: int = field(default=4, metadata={"help": "Q-LoRA quantisation: 4 (NF4/FP4) or 8 (LLM.int8)."})
    bnb_4bit_quant_type: Literal["nf4", "fp4"] = field(default="nf4", metadata={"help": "4-bit data type."})
    double_quant: bool = field(default=True, metadata={"help": "Quantise the 4-bit quantisation constants too."})
    train_special_tokens: bool = field(
        default=False,
        metadata={
            "help": "Also train the embedding and output rows of the chat template's special tokens "
            "(<|im_start|>, <|im_end|>, ...): for LoRA on a base model that never saw them. With a --chat_template "
            "whose markers are not single tokens of the tokenizer: add them as special tokens (embeddings "
            "resized), trained by LoRA or the full fine-tune."
        },
    )
    use_dora: bool = field(
        default=False,
        metadata={"help": "DoRA (peft): LoRA on the direction of each weight plus a trained magnitude per output."},
    )
    use_rslora: bool = field(
        default=False,
        metadata={"help": "rsLoRA (peft): scale the adapter by lora_alpha / sqrt(r) instead of lora_alpha / r."},
    )
    init_lora_weights: str = field(
        default="true",
        metadata={
            "help": "How peft initialises the adapter: true (A random, B zero: starts as the base model), gaussian, "
            "orthogonal, pissa or pissa_niter_N (principal singular vectors of each weight, fast SVD with N "
            "iterations), olora (QR of each weight). pissa/olora move part of each base weight into the adapter: "
            "the saved adapter is converted to a plain LoRA of rank 2r on the unchanged base."
        },
    )
    loraplus_lr_ratio: float | None = field(
        default=None,
        metadata={
            "help": "LoRA+ (peft's optimizer helper): the B matrices learn this many times faster than the A "
            "matrices (the paper suggests 16). Unset: one learning rate."
        },
    )


class RunArguments(NamedTuple):
    """A run's parsed arguments; unpacks as (model_args, data_args, training_args, lora_args)."""

    model: ModelArguments
    data: DataArguments
    training: TrainingArguments
    lora: LoraArguments


def read_config_file(path: str | os.PathLike) -> dict[str, Any]:
    """The arguments in a JSON or YAML file: a mapping of flag names (without --) to values."""
    try:
        text = Path(path).read_text()
    except OSError as error:
        raise ConfigurationError(f"{path}: cannot read the config file ({error.strerror})") from None
    try:
        values = json.loads(text) if str(path).endswith(".json") else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as error:  # both say where in the file
        raise ConfigurationError(f"{path}: cannot parse the config file ({error})") from None
    if not isinstance(values, dict):
        raise ConfigurationError(f"{path}: expected a mapping of argument names to values")
    return values


def parse_dataclasses(dataclass_types: Sequence[type], argv: Sequence[str]) -> tuple:
    """Instances of `dataclass_types` from `argv`: flags, or a JSON/YAML config file first and flags that
    override it after. Raises ConfigurationError for values the dataclasses refuse (argparse itself still
    prints its usage and exits with code 2 on an unknown flag or an unparsable value)."""
    parser = HfArgumentParser(dataclass_types)
    argv = list(argv)
    if argv and argv[0].endswith(CONFIG_SUFFIXES) and not argv[0].startswith("-"):
        config_file, argv = os.path.abspath(argv[0]), argv[1:]
        values = read_config_file(config_file)
        known = {f.name for dataclass_type in dataclass_types for f in fields(dataclass_type) if f.init}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigurationError(f"{config_file}: unknown argument(s) {', '.join(unknown)}")
        # The file's values become the parser's defaults: flags after the file override them, as on the command line.
        parser.set_defaults(**values)
    try:
        # look_for_args_file=False: a `<script>.args` file next to sys.argv[0] must not change a run.
        return parser.parse_args_into_dataclasses(argv, look_for_args_file=False)
    except ValueError as error:  # the dataclasses' own checks, transformers.TrainingArguments' included
        raise ConfigurationError(str(error)) from None


def parse_arguments(argv: Sequence[str]) -> RunArguments:
    """finetune.py's arguments from its command line (without the program name)."""
    return RunArguments(*parse_dataclasses((ModelArguments, DataArguments, TrainingArguments, LoraArguments), argv))


def check_required(model_args: ModelArguments, data_args: DataArguments) -> None:
    """The arguments without a default: a forgotten one is an error, never a stand-in model or data set."""
    if not model_args.model_name_or_path:
        raise ConfigurationError("--model_name_or_path is required: the hub id or local folder of the model to train")
    if not data_args.data_path:
        raise ConfigurationError("--data_path is required: the training data file")


def check_arguments(training_args: TrainingArguments, lora_args: LoraArguments) -> None:
    """Argument combinations that cannot work, refused before anything is loaded."""
    if training_args.pad_to_multiple_of is not None and training_args.pad_to_multiple_of < 1:
        raise ConfigurationError(
            f"--pad_to_multiple_of must be 1 (no rounding) or more, got {training_args.pad_to_multiple_of}"
        )
    if lora_args.q_lora and not training_args.use_lora:
        raise ConfigurationError("--q_lora trains LoRA adapters on a quantised model: add --use_lora")
    if lora_args.bits not in (4, 8):
        raise ConfigurationError(f"--bits must be 4 or 8, got {lora_args.bits}")
    if lora_args.lora_weight_path and not training_args.use_lora:
        raise ConfigurationError("--lora_weight_path continues a LoRA adapter: add --use_lora")
    if lora_args.lora_weight_path and not Path(lora_args.lora_weight_path, "adapter_config.json").is_file():
        raise ConfigurationError(
            f"--lora_weight_path {lora_args.lora_weight_path}: no LoRA adapter there (no adapter_config.json)"
        )
    if lora_args.lora_target == "attention" and lora_args.lora_target_modules not in (["all-linear"], ["all_linear"]):
        raise ConfigurationError(
            "--lora_target attention chooses the modules itself: drop --lora_target_modules "
            f"{' '.join(lora_args.lora_target_modules)}"
        )
    check_lora_variant(training_args, lora_args)


# peft's initialisations that need nothing but the weights (eva, corda and loftq need data or a quantised copy).
LORA_INITS = ("true", "gaussian", "orthogonal", "pissa", "pissa_niter_N", "olora")


def lora_init(value: str) -> bool | str:
    """--init_lora_weights as peft's LoraConfig takes it (True or the method's name); ConfigurationError if it is
    none of LORA_INITS."""
    name = value.strip().lower()
    if name == "true":
        return True
    niter = name.removeprefix("pissa_niter_")
    if name in ("gaussian", "orthogonal", "pissa", "olora") or (niter != name and niter.isdigit()):
        return name
    raise ConfigurationError(f"--init_lora_weights {value}: expected one of {', '.join(LORA_INITS)} (N a number)")


def lora_init_moves_base_weights(value: str) -> bool:
    """PiSSA and OLoRA take part of each base weight into the adapter at the start (the base changes with it)."""
    return str(lora_init(value)).startswith(("pissa", "olora"))


def check_lora_variant(training_args: TrainingArguments, lora_args: LoraArguments) -> None:
    """--use_dora, --use_rslora, --init_lora_weights and --loraplus_lr_ratio: LoRA only, and what peft can save."""
    asked = [
        flag
        for flag, given in [
            ("--use_dora", lora_args.use_dora),
            ("--use_rslora", lora_args.use_rslora),
            ("--init_lora_weights", lora_init(lora_args.init_lora_weights) is not True),
            ("--loraplus_lr_ratio", lora_args.loraplus_lr_ratio is not None),
        ]
        if given
    ]
    if asked and not training_args.use_lora:
        raise ConfigurationError(f"{asked[0]} is a LoRA option: add --use_lora")
    if lora_args.loraplus_lr_ratio is not None and not lora_args.loraplus_lr_ratio > 0:
        raise ConfigurationError(f"--loraplus_lr_ratio must be above 0, got {lora_args.loraplus_lr_ratio}")
    if lora_args.loraplus_lr_ratio is not None and training_args.deepspeed:
        if "optimizer" in training_args.hf_deepspeed_config.config:
            # DeepSpeed would build that optimizer itself, with one learning rate for every matrix.
            raise ConfigurationError(
                "--loraplus_lr_ratio needs the Trainer's optimizer, but the DeepSpeed config "
                f'{training_args.deepspeed} defines its own (its "optimizer" section would train A and B at one '
                "rate): remove that section"
            )
    if lora_init_moves_base_weights(lora_args.init_lora_weights):
        init = lora_args.init_lora_weights
        if lora_args.q_lora:
            raise ConfigurationError(f"--init_lora_weights {init} changes the base weights: not with --q_lora")
        if lora_args.use_dora:
            raise ConfigurationError(
                f"--init_lora_weights {init} with --use_dora: peft cannot convert it to a plain adapter"
            )
        if is_deepspeed_zero3_enabled():
            raise ConfigurationError(
                f"--init_lora_weights {init} is not supported with ZeRO-3 here (the conversion of the saved adapter "
                "needs whole weights): use ZeRO-2 or one process"
            )


def check_parallelism(
    training_args: TrainingArguments,
    lora_args: LoraArguments,
    device_type: str | None = None,
    zero3: bool | None = None,
) -> None:
    """DeepSpeed and FSDP set-ups that would silently train or save something else, refused before loading.
    `device_type` ("cuda", "cpu") and `zero3` describe the machine and the DeepSpeed stage; by default they are
    read from `training_args` and transformers."""
    device_type = device_type or training_args.device.type
    zero3 = is_deepspeed_zero3_enabled() if zero3 is None else zero3
    if lora_args.q_lora and training_args.fsdp:
        # FSDP can only shard 4-bit weights stored in the compute dtype (bnb_4bit_quant_storage): not set up here.
        raise ConfigurationError(
            "--q_lora does not run with FSDP here: use finetune/finetune_qlora_single_gpu.sh (one process) or "
            "finetune/finetune_qlora_ds.sh (DeepSpeed ZeRO-2, or ZeRO-3 with --deepspeed ds_configs/zero3.json)"
        )
    if training_args.fsdp and device_type == "cpu":
        # accelerate enables FSDP on GPUs only: on the CPU the Trainer would quietly run plain DDP.
        raise ConfigurationError(
            "--fsdp needs GPUs: on the CPU the Trainer silently falls back to plain DDP. On the CPU use DeepSpeed "
            "(finetune/finetune_ds.sh, ZeRO-3) or drop --fsdp"
        )
    if lora_args.q_lora and lora_args.bits == 8 and zero3:
        # ZeRO-3 shards every weight; bitsandbytes' int8 weights cannot be split and gathered like that.
        raise ConfigurationError(
            "--q_lora --bits 8 does not run under DeepSpeed ZeRO-3 (int8 weights cannot be sharded): use --bits 4, "
            "or ZeRO-2 (ds_configs/zero2.json)"
        )
    if zero3 and not training_args.hf_deepspeed_config.is_true(
        "zero_optimization.stage3_gather_16bit_weights_on_model_save"
    ):
        raise ConfigurationError(
            f"{training_args.deepspeed}: ZeRO-3 without zero_optimization.stage3_gather_16bit_weights_on_model_save"
            " = true saves sharded weights that transformers cannot load; set it (ds_configs/zero3.json does)"
        )
    if training_args.deepspeed:
        check_deepspeed_optimizer(
            training_args.hf_deepspeed_config.config, training_args.optim, training_args.deepspeed
        )
    # transformers writes no state_dict_type into fsdp_config unless the user does; its default is FULL_STATE_DICT.
    state_dict_type = str((training_args.fsdp_config or {}).get("state_dict_type", "FULL_STATE_DICT"))
    if training_args.fsdp and "FULL_STATE_DICT" not in state_dict_type:
        raise ConfigurationError(
            f"fsdp_config state_dict_type {state_dict_type}: FSDP saves a model transformers can load only with "
            "FULL_STATE_DICT (the default; ds_configs/fsdp.json)"
        )


DEFAULT_OPTIM = str(transformers.TrainingArguments.__dataclass_fields__["optim"].default)


def check_deepspeed_optimizer(ds_config: dict, optim: str, config_path: Any = "the DeepSpeed config") -> None:
    """A DeepSpeed config with an `optimizer` block makes DeepSpeed build that optimizer and the Trainer ignore
    --optim: refused unless --optim is left at its default. Without the block the Trainer builds --optim's optimizer
    and hands it to DeepSpeed (ds_configs/zero2.json and zero3.json have none)."""
    optim = str(getattr(optim, "value", optim))
    if "optimizer" in ds_config and optim != DEFAULT_OPTIM:
        kind = ds_config["optimizer"].get("type", "its own") if isinstance(ds_config["optimizer"], dict) else "its own"
        raise ConfigurationError(
            f"--optim {optim}: {config_path} has an optimizer block, so DeepSpeed would train with {kind} "
            "instead; remove that block (ds_configs/zero2.json and zero3.json have none) or drop --optim"
        )


def training_mode(training_args: TrainingArguments, lora_args: LoraArguments) -> str:
    """What a run trains, as finetune_run.json and its checkpoints record it: full, lora or qlora-<bits>bit."""
    if lora_args.q_lora:
        return f"qlora-{lora_args.bits}bit"
    return "lora" if training_args.use_lora else "full"
