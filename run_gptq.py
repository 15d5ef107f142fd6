"""Quantises a fine-tuned (full or merged) model to 4 or 8 bits with GPTQ, calibrated on the fine-tuning data.

    python run_gptq.py --model_name_or_path output/merged --data_path data/train.jsonl --out_path output/gptq-int4

Calibration samples are the data's conversations rendered with the model's chat template and tokenised exactly
as for training (sft.data). Quantisation runs in GPTQModel through transformers' GPTQConfig, on the GPU when
there is one, else on the CPU. The output folder holds the quantised weights, the tokenizer, chat template and
generation config, and loads with `AutoModelForCausalLM.from_pretrained(out_path)` (gptqmodel and optimum
installed). Before it is moved into place it is reloaded that way, and the perplexity of the original and the
quantised model on held-out samples of the data is printed, with the size of each on disk.
"""

from __future__ import annotations

import sft.quiet

if __name__ == "__main__":
    sft.quiet.setup()  # first: it silences known chatter of the libraries imported below

# isort: split
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from transformers import AutoModelForCausalLM, GPTQConfig, HfArgumentParser

from sft.data import Conversation, DataError, load_data
from sft.errors import ConfigurationError, run_main
from sft.evaluation import (
    format_size,
    head,
    perplexity,
    save_chat_files,
    split_held_out,
    tokenize_samples,
    weights_size,
)
from sft.gptq import require_gptq
from sft.modeling import (
    ModelPathError,
    gpu_bf16,
    inference_device_map,
    inference_dtype,
    load_config,
    load_model,
    load_tokenizer,
)
from sft.outputs import check_new_output, replace_folder, staging_folder
from sft.qwen1 import resolve_model_path

logger = logging.getLogger("run_gptq")

QUANTIZE_INFO_FILE = "gptq_run.json"


@dataclass
class GptqArguments:
    model_name_or_path: str = field(metadata={"help": "Model to quantise: a merged or full fine-tuned model folder."})
    data_path: list[str] = field(
        metadata={
            "help": "Calibration data: the fine-tuning data, as finetune.py's --data_path takes it (files, globs, "
            "folders, hub ids, a data config), rendered as in training; the first samples of each source."
        }
    )
    out_path: str = field(metadata={"help": "Folder for the quantised model; must be new or empty unless --overwrite."})
    bits: int = field(default=4, metadata={"help": "4 or 8."})
    group_size: int = field(
        default=128,
        metadata={
            "help": "Input columns sharing one scale; must divide every quantised layer's in-features. -1: none."
        },
    )
    num_samples: int = field(
        default=128, metadata={"help": "Calibration samples (at most; fewer if the data has fewer)."}
    )
    max_len: int = field(default=2048, metadata={"help": "Calibration and evaluation samples are truncated to this."})
    desc_act: bool = field(
        default=False, metadata={"help": "Quantise columns in order of decreasing activation (act-order)."}
    )
    sym: bool = field(default=True, metadata={"help": "Symmetric quantisation (--sym false: asymmetric)."})
    damp_percent: float = field(default=0.01, metadata={"help": "Dampening added to the Hessian diagonal."})
    eval_data_path: list[str] | None = field(
        default=None,
        metadata={
            "help": "Held-out samples for the perplexity report (sources as --data_path). Default: "
            "--num_eval_samples drawn from --data_path's first samples (at most a quarter) and left out of "
            "calibration."
        },
    )
    num_eval_samples: int = field(default=16, metadata={"help": "Held-out samples for the perplexity report."})
    dtype: Literal["auto", "bf16", "fp16", "fp32"] = field(
        default="auto",
        metadata={
            "help": "dtype of the unquantised parts (and of the original for the report); auto: bf16 on a "
            "GPU that has it (fp16 on older ones), fp32 on the CPU."
        },
    )
    max_shard_size: str = field(default="5GB", metadata={"help": "Largest safetensors shard."})
    overwrite: bool = field(default=False, metadata={"help": "Replace what --out_path holds."})
    seed: int = field(default=0, metadata={"help": "Seed for drawing the held-out samples."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Run the model's own code."})


def check_model(args: GptqArguments) -> None:
    """The model exists, and --group_size divides the in-features of every layer that will be quantised."""
    path = Path(args.model_name_or_path)
    if path.exists() and not (path / "config.json").is_file():
        hint = " (an adapter: merge it first with merge_lora.py)" if (path / "adapter_config.json").is_file() else ""
        raise ModelPathError(f"{path}: no config.json, not a model folder{hint}")
    config = load_config(args.model_name_or_path, args.trust_remote_code)
    if getattr(config, "quantization_config", None):
        raise ConfigurationError(f"{path} is already quantised ({config.quantization_config.get('quant_method')})")
    if args.group_size == -1:
        return
    if args.group_size <= 0:
        raise ConfigurationError(f"--group_size must be positive or -1, got {args.group_size}")
    # A model built on the meta device costs no memory and gives every layer's real shape.
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config, trust_remote_code=args.trust_remote_code)
    output_layer = skeleton.get_output_embeddings()
    for name, module in skeleton.named_modules():
        if isinstance(module, torch.nn.Linear) and module is not output_layer and module.in_features % args.group_size:
            raise ConfigurationError(
                f"--group_size {args.group_size} does not divide the {module.in_features} in-features of {name}: "
                "choose a divisor (e.g. 32, 64, 128) or -1"
            )


def read_data(args: GptqArguments) -> tuple[list[Conversation], list[Conversation]]:
    """(calibration, held-out) conversations."""
    if args.eval_data_path:
        calibration = load_data(args.data_path, max_samples=args.num_samples)
        return head(calibration, args.num_samples), head(
            load_data(args.eval_data_path, max_samples=args.num_eval_samples), args.num_eval_samples
        )
    # Enough to hold out up to a quarter and still calibrate on --num_samples.
    conversations = load_data(args.data_path, max_samples=args.num_samples + args.num_eval_samples)
    if len(conversations) < 2:
        raise DataError(
            " ".join(args.data_path), "", None, "one sample only: need more to hold some out, or --eval_data_path"
        )
    calibration, held_out = split_held_out(
        conversations, max(1, min(args.num_eval_samples, len(conversations) // 4)), args.seed
    )
    return head(calibration, args.num_samples), held_out


def main() -> None:
    (args,) = HfArgumentParser(GptqArguments).parse_args_into_dataclasses()
    sft.quiet.setup_logging(logging.INFO)
    require_gptq("run_gptq.py")
    if args.bits not in (4, 8):
        raise ConfigurationError(f"--bits must be 4 or 8, got {args.bits}")
    check_new_output(args.out_path, args.overwrite, inputs=(args.model_name_or_path,))
    calibration_conversations, held_out_conversations = read_data(args)
    # A Qwen-1 model is quantised as its native conversion.
    args.model_name_or_path = resolve_model_path(args.model_name_or_path)
    check_model(args)
    dtype = inference_dtype(args.dtype, gpu_bf16("cuda" if torch.cuda.is_available() else "cpu"))

    tokenizer = load_tokenizer(args.model_name_or_path, args.trust_remote_code)
    calibration = tokenize_samples(tokenizer, calibration_conversations, args.max_len, train_on="all")
    held_out = tokenize_samples(tokenizer, held_out_conversations, args.max_len)
    logger.info("%d calibration samples, %d held-out samples", len(calibration), len(held_out))

    logger.info("Perplexity of the original model on the held-out samples")
    # Spread over every GPU (then CPU memory) where a model does not fit one, as for the quantised model below.
    device_map = inference_device_map("cuda" if torch.cuda.is_available() else "cpu")
    original = load_model(
        args.model_name_or_path, dtype, trust_remote_code=args.trust_remote_code, device_map=device_map
    )
    original_ppl = perplexity(original, held_out)
    del original

    logger.info("Loading and calibrating: GPTQ %d-bit, group size %d", args.bits, args.group_size)
    gptq = GPTQConfig(
        bits=args.bits,
        dataset=[
            {
                "input_ids": torch.tensor([sample.input_ids]),
                "attention_mask": torch.ones(1, len(sample.input_ids), dtype=torch.long),
            }
            for sample in calibration
        ],
        group_size=args.group_size,
        desc_act=args.desc_act,
        sym=args.sym,
        damp_percent=args.damp_percent,
        model_seqlen=args.max_len,
    )
    quantized = AutoModelForCausalLM.from_pretrained(
        args.model_name_or_path,
        dtype=dtype,
        quantization_config=gptq,
        device_map=device_map,
        trust_remote_code=args.trust_remote_code,
    )
    quantized.config.quantization_config.dataset = None  # the calibration tensors: not for config.json

    staging = staging_folder(args.out_path)
    logger.info("Writing the quantised model to %s", staging)
    quantized.save_pretrained(staging, max_shard_size=args.max_shard_size)
    save_chat_files(staging, tokenizer, args.model_name_or_path)
    del quantized

    logger.info("Checking: reloading it with plain transformers")
    # On the GPU, as it will be served (GPTQ's CPU kernels are a fallback, not what users run).
    reloaded = AutoModelForCausalLM.from_pretrained(
        staging, device_map=device_map, trust_remote_code=args.trust_remote_code
    )
    quantized_ppl = perplexity(reloaded, held_out)
    del reloaded

    original_size, quantized_size = weights_size(args.model_name_or_path), weights_size(staging)
    report = {
        "model": args.model_name_or_path,
        "bits": args.bits,
        "group_size": args.group_size,
        "calibration_samples": len(calibration),
        "held_out_samples": len(held_out),
        "perplexity_original": original_ppl,
        "perplexity_quantized": quantized_ppl,
        "weights_bytes_original": original_size,
        "weights_bytes_quantized": quantized_size,
    }
    (staging / QUANTIZE_INFO_FILE).write_text(json.dumps(report, indent=2))
    replace_folder(staging, args.out_path)
    print(
        f"held-out perplexity ({len(held_out)} samples): original {original_ppl:.4f}, "
        f"GPTQ {args.bits}-bit {quantized_ppl:.4f} (x{quantized_ppl / original_ppl:.3f})"
    )
    print(f"weights on disk: original {format_size(original_size)}, GPTQ {args.bits}-bit {format_size(quantized_size)}")
    print(f"quantised model: {args.out_path}")


if __name__ == "__main__":
    run_main(main)
