"""Supervised fine-tuning of a chat LLM: full-parameter, LoRA or Q-LoRA, with the Hugging Face Trainer.

    python finetune.py --model_name_or_path MODEL --data_path data.jsonl --output_dir out --use_lora

Also takes one JSON or YAML file holding the same arguments: `python finetune.py config.yaml`.
Flags follow Qwen's finetune.py, so its users' commands keep working. Rerunning the same command resumes
from the last checkpoint in --output_dir (--start_over ignores them).
"""

from __future__ import annotations

import sft.quiet  # noqa: F401  (first: it silences known chatter of the libraries imported below)

# isort: split
import logging
import os
import shutil
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import torch
import transformers
from transformers import HfArgumentParser, Trainer
from transformers.integrations import is_deepspeed_zero3_enabled

from sft.data import DataError, load_conversations, make_collator, template_overhead, tokenize_conversations
from sft.modeling import (
    add_lora,
    chat_special_token_ids,
    load_model,
    load_tokenizer,
    quantization_config,
    training_dtype,
    training_weights_dtype,
)
from sft.outputs import publish, read_run_info, write_run_info
from sft.packing import PackingError, prepare_packing
from sft.plots import save_training_curves
from sft.qwen1 import Qwen1Error, native_lora_targets, resolve_model_path
from sft.training import EXIT_NONFINITE, EXIT_PREEMPTED, FinetuneTrainer, PreemptionHandler, last_complete_checkpoint

logger = logging.getLogger("finetune")


@dataclass
class ModelArguments:
    model_name_or_path: str = field(
        default="tiny-qwen2", metadata={"help": "Hub id or local folder of the model to fine-tune."}
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


@dataclass
class DataArguments:
    data_path: str = field(
        default="data/example_chatml.jsonl",
        metadata={"help": "Training data: JSON list or JSONL of Qwen 'conversations', ChatML 'messages' or alpaca."},
    )
    eval_data_path: str | None = field(default=None, metadata={"help": "Evaluation data, same formats."})
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
            "own position ids and attending only to itself; no padding. Batch size then counts packed sequences."
        },
    )


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
        default=False, metadata={"help": "Ignore checkpoints already in output_dir instead of resuming from them."}
    )
    max_nonfinite_steps: int = field(
        default=1,
        metadata={
            "help": "Stop after this many optimizer steps in a row with a NaN/inf loss or gradient norm "
            "(each such step's update is skipped); the last good checkpoint is kept."
        },
    )

    def __post_init__(self):
        if self.bf16 and self.fp16:
            raise ValueError("--bf16 and --fp16 exclude each other: pick one")
        if self.bf16 and not self.use_cpu:
            if torch.cuda.is_available() and not torch.cuda.is_bf16_supported():
                raise ValueError(f"--bf16: this GPU ({torch.cuda.get_device_name()}) has no bf16; use --fp16")
            if torch.accelerator.current_accelerator() is None:
                raise ValueError("--bf16: no GPU found; drop --bf16, or add --use_cpu for bf16 autocast on the CPU")
        if self.group_by_length:
            self.train_sampling_strategy = "group_by_length"
        super().__post_init__()


@dataclass
class LoraArguments:
    lora_r: int = field(default=64, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA scaling numerator (scale = alpha / r)."})
    lora_dropout: float = field(default=0.05, metadata={"help": "Dropout on the LoRA input."})
    lora_target_modules: list[str] = field(
        default_factory=lambda: ["all-linear"],
        metadata={"help": "Module names to adapt; 'all-linear' is every linear layer but the output layer."},
    )
    lora_weight_path: str = field(default="", metadata={"help": "Accepted for Qwen compatibility; unused."})
    lora_bias: Literal["none", "all", "lora_only"] = field(default="none", metadata={"help": "Which biases to train."})
    q_lora: bool = field(default=False, metadata={"help": "Q-LoRA: LoRA on a bitsandbytes-quantised base model."})
    bits: int = field(default=4, metadata={"help": "Q-LoRA quantisation: 4 (NF4/FP4) or 8 (LLM.int8)."})
    bnb_4bit_quant_type: Literal["nf4", "fp4"] = field(default="nf4", metadata={"help": "4-bit data type."})
    double_quant: bool = field(default=True, metadata={"help": "Quantise the 4-bit quantisation constants too."})
    train_special_tokens: bool = field(
        default=False,
        metadata={
            "help": "Also train the embedding and output rows of the chat template's special tokens "
            "(<|im_start|>, <|im_end|>, ...): for LoRA on a base model that never saw them."
        },
    )


def parse_arguments() -> tuple[ModelArguments, DataArguments, TrainingArguments, LoraArguments]:
    parser = HfArgumentParser((ModelArguments, DataArguments, TrainingArguments, LoraArguments))
    if len(sys.argv) == 2 and sys.argv[1].endswith(".json"):
        return parser.parse_json_file(os.path.abspath(sys.argv[1]))
    if len(sys.argv) == 2 and sys.argv[1].endswith((".yaml", ".yml")):
        return parser.parse_yaml_file(os.path.abspath(sys.argv[1]))
    return parser.parse_args_into_dataclasses()


def check_arguments(training_args: TrainingArguments, lora_args: LoraArguments) -> None:
    """Argument combinations that cannot work, refused before anything is loaded."""
    if lora_args.q_lora and not training_args.use_lora:
        raise ValueError("--q_lora trains LoRA adapters on a quantised model: add --use_lora")
    if lora_args.bits not in (4, 8):
        raise ValueError(f"--bits must be 4 or 8, got {lora_args.bits}")
    if lora_args.train_special_tokens and not training_args.use_lora:
        raise ValueError("--train_special_tokens applies to LoRA; a full fine-tune trains every row already")


def check_output_dir(output_dir: str, mode: str, start_over: bool) -> str | None:
    """The checkpoint to resume from, if any; refuses an output_dir that holds a run of another mode."""
    finished = read_run_info(output_dir)
    if finished is not None and finished.get("mode") != mode:
        raise ValueError(
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
            raise ValueError(
                f"{checkpoint} is from a {checkpoint_mode} run; this run is {mode}: choose another --output_dir, "
                "or pass --start_over to train from scratch there"
            )
    return checkpoint


def check_parallelism(training_args: TrainingArguments, lora_args: LoraArguments) -> None:
    """DeepSpeed and FSDP set-ups that would silently train or save something else, refused before loading."""
    if lora_args.q_lora and training_args.fsdp:
        # FSDP can only shard 4-bit weights stored in the compute dtype (bnb_4bit_quant_storage): not set up here.
        raise ValueError(
            "--q_lora does not run with FSDP here: use finetune/finetune_qlora_single_gpu.sh (one process) or "
            "finetune/finetune_qlora_ds.sh (DeepSpeed ZeRO-2, or ZeRO-3 with --deepspeed ds_configs/zero3.json)"
        )
    if training_args.fsdp and training_args.device.type == "cpu":
        # accelerate enables FSDP on GPUs only: on the CPU the Trainer would quietly run plain DDP.
        raise ValueError(
            "--fsdp needs GPUs: on the CPU the Trainer silently falls back to plain DDP. On the CPU use DeepSpeed "
            "(finetune/finetune_ds.sh, ZeRO-3) or drop --fsdp"
        )
    if is_deepspeed_zero3_enabled() and not training_args.hf_deepspeed_config.is_true(
        "zero_optimization.stage3_gather_16bit_weights_on_model_save"
    ):
        raise ValueError(
            f"{training_args.deepspeed}: ZeRO-3 without zero_optimization.stage3_gather_16bit_weights_on_model_save"
            " = true saves sharded weights that transformers cannot load; set it (ds_configs/zero3.json does)"
        )
    if training_args.fsdp and "FULL_STATE_DICT" not in str(training_args.fsdp_config.get("state_dict_type", "FULL")):
        raise ValueError("FSDP saves a loadable final model only with fsdp_config state_dict_type FULL_STATE_DICT")


def init_deepspeed_comm(training_args: TrainingArguments) -> None:
    """On the CPU, accelerate starts torch.distributed (gloo) but not DeepSpeed's comm layer; ZeRO-3 shards the
    model while loading it and would then count one process instead of all of them. Start it on the same group."""
    if training_args.deepspeed and training_args.device.type == "cpu" and torch.distributed.is_initialized():
        import deepspeed

        if not deepspeed.comm.is_initialized():
            deepspeed.init_distributed(dist_backend=torch.distributed.get_backend(), auto_mpi_discovery=False)


def training_mode(training_args: TrainingArguments, lora_args: LoraArguments) -> str:
    if lora_args.q_lora:
        return f"qlora-{lora_args.bits}bit"
    return "lora" if training_args.use_lora else "full"


def compute_dtype(training_args: TrainingArguments) -> torch.dtype:
    return training_dtype(training_args.bf16, training_args.fp16)


def save_final(trainer: Trainer, tokenizer, output_dir: str, run_info: dict) -> None:
    """Model (or adapter), tokenizer and chat template, written to a staging folder and moved into output_dir."""
    staging = Path(output_dir) / ".final.tmp"
    if trainer.is_world_process_zero() and staging.exists():
        shutil.rmtree(staging)
    trainer.accelerator.wait_for_everyone()
    trainer.save_model(str(staging))  # every rank takes part: ZeRO-3 gathers the weights here
    if trainer.is_world_process_zero():
        tokenizer.save_pretrained(staging)
        write_run_info(staging, run_info)
        publish(staging, output_dir)
        logger.info("Saved the final %s to %s", "adapter" if run_info["mode"] != "full" else "model", output_dir)


def train() -> Trainer:
    try:
        model_args, data_args, training_args, lora_args = parse_arguments()
    except ValueError as error:  # the Trainer's own argument checks
        sys.exit(f"error: {error}")
    logging.basicConfig(
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        level=logging.INFO if training_args.should_log else logging.WARNING,
    )
    try:
        check_arguments(training_args, lora_args)
        check_parallelism(training_args, lora_args)
        # Every data error is reported before the (slow) model load.
        train_conversations = load_conversations(data_args.data_path, data_args.system_prompt)
        eval_conversations = (
            load_conversations(data_args.eval_data_path, data_args.system_prompt) if data_args.eval_data_path else None
        )
        mode = training_mode(training_args, lora_args)
        checkpoint = check_output_dir(training_args.output_dir, mode, training_args.start_over)
    except (DataError, ValueError) as error:
        sys.exit(f"error: {error}")
    logger.info("Mode: %s; %d training conversations from %s", mode, len(train_conversations), data_args.data_path)
    if os.path.isdir(model_args.model_name_or_path):
        # Adapters record the base model's path: make it one that works from anywhere.
        model_args.model_name_or_path = os.path.abspath(model_args.model_name_or_path)
    qwen1_source = None
    try:
        native = resolve_model_path(model_args.model_name_or_path)
    except Qwen1Error as error:
        sys.exit(f"error: {error}")
    if native != model_args.model_name_or_path:
        # A Qwen-1 model trains as its native conversion, recorded as the base: the adapter loads without it.
        qwen1_source, model_args.model_name_or_path = model_args.model_name_or_path, native
        lora_args.lora_target_modules = native_lora_targets(lora_args.lora_target_modules)

    tokenizer = load_tokenizer(
        model_args.model_name_or_path, model_args.trust_remote_code, training_args.model_max_length
    )
    overhead = template_overhead(tokenizer)
    if training_args.model_max_length <= overhead + 1:
        sys.exit(
            f"error: --model_max_length {training_args.model_max_length} leaves no room for text: the chat "
            f"template alone takes {overhead} tokens"
        )
    tokenize_options = dict(
        tokenizer=tokenizer,
        max_length=training_args.model_max_length,
        train_on=data_args.train_on,
        drop_long=data_args.drop_long_samples,
        num_proc=data_args.preprocessing_num_workers,
        cache_dir=data_args.preprocessing_cache_dir,
        fold_system=data_args.fold_system_prompt,
    )
    with training_args.main_process_first(desc="tokenising"):
        try:  # the chat template's refusals, still before the model loads
            train_dataset, _ = tokenize_conversations(train_conversations, description="train", **tokenize_options)
            eval_dataset = None
            if eval_conversations:
                eval_dataset, _ = tokenize_conversations(eval_conversations, description="eval", **tokenize_options)
        except DataError as error:
            sys.exit(f"error: {error}")

    dtype = training_weights_dtype(
        model_args.model_dtype, training_args.bf16, training_args.fp16, training_args.use_lora
    )
    quantization = (
        quantization_config(
            lora_args.bits, compute_dtype(training_args), lora_args.bnb_4bit_quant_type, lora_args.double_quant
        )
        if lora_args.q_lora
        else None
    )
    init_deepspeed_comm(training_args)
    # The LoRA initialisation draws random numbers too: --seed fixes it, whatever ran before.
    transformers.set_seed(training_args.seed)
    model = load_model(
        model_args.model_name_or_path,
        dtype,
        quantization,
        model_args.trust_remote_code,
        model_args.attn_implementation,
    )
    if training_args.gradient_checkpointing:
        model.config.use_cache = False
    if training_args.use_lora:
        try:
            model = add_lora(
                model,
                r=lora_args.lora_r,
                alpha=lora_args.lora_alpha,
                dropout=lora_args.lora_dropout,
                target_modules=lora_args.lora_target_modules,
                bias=lora_args.lora_bias,
                trainable_token_ids=chat_special_token_ids(tokenizer) if lora_args.train_special_tokens else None,
                quantized=lora_args.q_lora,
                gradient_checkpointing=training_args.gradient_checkpointing,
            )
        except ValueError as error:  # e.g. target modules that match nothing
            sys.exit(f"error: {error}")

    data_collator = make_collator(tokenizer)
    if data_args.packing:
        try:
            train_dataset, eval_dataset, data_collator = prepare_packing(
                model,
                tokenizer.pad_token_id,
                training_args.model_max_length,
                train_dataset,
                eval_dataset,
                check=not is_deepspeed_zero3_enabled(),  # ZeRO-3 weights are only whole inside the Trainer
                use_cache=training_args.use_cache,
            )
        except PackingError as error:
            sys.exit(f"error: {error}")

    trainer = FinetuneTrainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        data_collator=data_collator,
        processing_class=tokenizer,
        max_nonfinite_steps=training_args.max_nonfinite_steps,
        run_mode=mode,
    )
    if training_args.fsdp and not trainer.is_fsdp_enabled:
        sys.exit("error: --fsdp was given but accelerate did not enable FSDP (it needs GPUs and torchrun)")
    preemption = PreemptionHandler()
    trainer.add_callback(preemption)
    if checkpoint:
        logger.info("Resuming from %s (pass --start_over to ignore it)", checkpoint)
    try:
        result = trainer.train(resume_from_checkpoint=checkpoint)
    finally:
        preemption.restore()
    if trainer.is_world_process_zero():  # also after a stop: the curves up to it
        logger.info("Wrote %s", save_training_curves(trainer.state.log_history, training_args.output_dir))
    if preemption.requested:
        logger.warning(
            "Stopped on request after step %d; checkpoint saved. Rerun the same command to resume.",
            preemption.stopped_at_step,
        )
        sys.exit(EXIT_PREEMPTED)
    if trainer.nonfinite_stop_step is not None:
        print(
            f"error: non-finite loss or gradient norm for {trainer.nonfinite_steps} step(s) in a row, the last at "
            f"step {trainer.nonfinite_stop_step}; stopped. The last good checkpoint in {training_args.output_dir} "
            "is kept (lower --learning_rate, or check the data?)",
            file=sys.stderr,
        )
        sys.exit(EXIT_NONFINITE)
    trainer.save_state()

    run_info = {
        "mode": mode,
        "base_model": model_args.model_name_or_path,
        "data_path": os.path.abspath(data_args.data_path),
        "global_step": trainer.state.global_step,
        "train_loss": result.training_loss,
        **trainer.throughput(result.metrics["train_runtime"]),  # trained tokens and tokens per second
        "arguments": {**asdict(model_args), **asdict(data_args), **asdict(lora_args)},
    }
    if qwen1_source:
        run_info["qwen1_source"] = qwen1_source
    save_final(trainer, tokenizer, training_args.output_dir, run_info)
    return trainer


if __name__ == "__main__":
    train()
