"""Merges a LoRA or Q-LoRA adapter into its base model: a standalone model that loads with
`AutoModelForCausalLM.from_pretrained(output)`, with the tokenizer, chat template and generation config.

    python merge_lora.py --adapter output/lora --output output/merged

The base model is the one recorded in the adapter (`--base_model` to use another copy of it). Adapters that
train token rows (`--train_special_tokens`) or whole modules (`modules_to_save`) are merged too. A Q-LoRA
adapter is merged onto the base loaded in 16/32 bits, not onto its quantised weights. The merged model is
written to a temporary folder and moved into place only after it reloaded and checked out: its logits on a few
rendered samples are compared with those of base + adapter, and the largest difference is printed.
"""

from __future__ import annotations

import sft.quiet

if __name__ == "__main__":
    sft.quiet.setup()  # first: it silences known chatter of the libraries imported below

# isort: split
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from transformers import AutoModelForCausalLM, AutoTokenizer, HfArgumentParser

from sft.chat import adapter_base_model
from sft.data import Conversation, load_data, source_names
from sft.data.pairs import pair_conversation, pair_sample
from sft.data.template_fit import grow_embeddings
from sft.errors import run_main
from sft.evaluation import (
    format_size,
    head,
    max_abs_diff,
    sample_logits,
    save_chat_files,
    tokenize_samples,
    weights_size,
)
from sft.modeling import (
    ModelPathError,
    load_config,
    load_model,
    load_tokenizer,
    merge_dtype,
    quantization_config,
    tokenizer_folder,
)
from sft.outputs import check_new_output, read_run_info, replace_folder, staging_folder
from sft.qwen1 import resolve_model_path

logger = logging.getLogger("merge_lora")

MERGE_INFO_FILE = "merge_info.json"

# Used for the self-check when neither --data_path nor the adapter's training data is at hand.
FALLBACK_CHECK_CONVERSATIONS: list[Conversation] = [
    [
        {"role": "user", "content": "What is your name?"},
        {"role": "assistant", "content": "I am a helpful assistant."},
    ],
    [
        {"role": "system", "content": "You answer in one short sentence."},
        {"role": "user", "content": "请介绍一下长城。"},
        {"role": "assistant", "content": "长城是中国古代的伟大建筑。"},
    ],
]


@dataclass
class MergeArguments:
    adapter: str = field(
        metadata={"help": "Adapter folder written by finetune.py --use_lora (with adapter_config.json)."}
    )
    output: str = field(metadata={"help": "Folder for the merged model; must be new or empty unless --overwrite."})
    base_model: str | None = field(
        default=None,
        metadata={"help": "Base model (hub id or folder). Default: the one recorded in the adapter's config."},
    )
    dtype: Literal["auto", "bf16", "fp16", "fp32"] = field(
        default="auto",
        metadata={"help": "dtype of the merged weights; auto: the dtype the base model was saved in."},
    )
    max_shard_size: str = field(default="5GB", metadata={"help": "Largest safetensors shard, e.g. 2GB."})
    overwrite: bool = field(default=False, metadata={"help": "Replace what --output holds."})
    data_path: list[str] | None = field(
        default=None,
        metadata={
            "help": "Samples for the self-check: data sources as finetune.py's --data_path takes them (files, "
            "globs, folders, hub ids, a data config), the first of each. Default: the adapter's training data "
            "when it is still there, else two built-in samples."
        },
    )
    num_check_samples: int = field(default=4, metadata={"help": "Samples the self-check compares logits on."})
    check_max_length: int = field(default=256, metadata={"help": "Samples are truncated to this many tokens."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Run the model's own code (Qwen-1 needs it)."})


def check_adapter(adapter: str) -> dict:
    """finetune.py's run info of the adapter (empty if the adapter was made elsewhere)."""
    if not Path(adapter).is_dir():
        raise ModelPathError(f"{adapter}: no such adapter folder")
    if not (Path(adapter) / "adapter_config.json").is_file():
        hint = " (it holds a full model: nothing to merge)" if (Path(adapter) / "config.json").is_file() else ""
        raise ModelPathError(f"{adapter}: no adapter_config.json, not a LoRA adapter folder{hint}")
    return read_run_info(adapter) or {}


def check_base_model(base: str) -> str:
    """The base model's path or hub id; a local path must hold a model."""
    looks_local = os.path.isabs(base) or base.startswith((".", "~")) or base.count("/") > 1 or os.path.exists(base)
    if looks_local and not (Path(base).expanduser() / "config.json").is_file():
        raise ModelPathError(f"base model {base} not found (no config.json there): pass --base_model PATH")
    return base


def check_conversations(args: MergeArguments, run_info: dict) -> list[Conversation]:
    if args.data_path:
        return head(load_data(args.data_path, max_samples=args.num_check_samples), args.num_check_samples)
    trained_on = run_info.get("data_path")
    # A list, or in older records one string of names separated by spaces.
    if trained_on and all(os.path.exists(name) for name in source_names(trained_on)):  # still where the run read it
        if run_info.get("stage") == "preference":  # dpo.py's pairs: each prompt with its chosen answer
            pairs = load_data(trained_on, max_samples=args.num_check_samples, parse=pair_sample)
            return head([pair_conversation(pair) for pair in pairs], args.num_check_samples)
        return head(load_data(trained_on, max_samples=args.num_check_samples), args.num_check_samples)
    return FALLBACK_CHECK_CONVERSATIONS[: args.num_check_samples]


def main() -> None:
    (args,) = HfArgumentParser(MergeArguments).parse_args_into_dataclasses()
    sft.quiet.setup_logging(logging.INFO)
    run_info = check_adapter(args.adapter)
    base = check_base_model(args.base_model or adapter_base_model(args.adapter, ", or pass --base_model"))
    check_new_output(args.output, args.overwrite, inputs=(args.adapter, base))
    conversations = check_conversations(args, run_info)
    base = resolve_model_path(base)  # a Qwen-1 base: its native conversion
    mode = run_info.get("mode", "lora")
    logger.info("Adapter %s (%s) onto base %s", args.adapter, mode, base)

    tokenizer = load_tokenizer(tokenizer_folder(args.adapter, base), args.trust_remote_code)
    samples = tokenize_samples(tokenizer, conversations, args.check_max_length, train_on="all")
    dtype = merge_dtype(args.dtype, load_config(base, args.trust_remote_code).get_text_config().dtype)

    from peft import PeftModel

    logger.info("Loading the base model in %s and the adapter", dtype)
    model = load_model(base, dtype, trust_remote_code=args.trust_remote_code)
    grow_embeddings(model, tokenizer)  # markers a --chat_template added with --train_special_tokens
    model = PeftModel.from_pretrained(model, args.adapter)
    expected = sample_logits(model, samples)

    logger.info("Merging")
    merged = model.merge_and_unload()
    staging = staging_folder(args.output)
    logger.info("Writing the merged model to %s", staging)
    merged.save_pretrained(staging, max_shard_size=args.max_shard_size)
    save_chat_files(staging, tokenizer, base)
    del model, merged

    logger.info("Checking: reloading the merged model with plain transformers")
    reloaded = AutoModelForCausalLM.from_pretrained(staging, dtype=dtype, trust_remote_code=args.trust_remote_code)
    AutoTokenizer.from_pretrained(staging, trust_remote_code=args.trust_remote_code)
    merged_logits = sample_logits(reloaded, samples)
    del reloaded
    difference = max_abs_diff(expected, merged_logits)
    print(f"merged vs base + adapter ({dtype}): max |logit diff| = {difference:.3g} over {len(samples)} samples")
    info = {"adapter": os.path.abspath(args.adapter), "base_model": base, "mode": mode, "dtype": str(dtype)}
    info["max_logit_diff_vs_base_plus_adapter"] = difference

    if mode.startswith("qlora"):
        # What the adapter was trained against: the quantised base. The difference is that quantisation's error.
        trained = run_info.get("arguments", {})
        quantization = quantization_config(
            int(trained.get("bits", 4)),
            dtype,
            trained.get("bnb_4bit_quant_type", "nf4"),
            trained.get("double_quant", True),
        )
        logger.info("Q-LoRA: comparing with the adapter on the %s-bit base it was trained on", trained.get("bits", 4))
        quantized = PeftModel.from_pretrained(
            load_model(base, dtype, quantization, trust_remote_code=args.trust_remote_code), args.adapter
        )
        as_trained = max_abs_diff(sample_logits(quantized, samples), merged_logits)
        del quantized
        print(f"merged vs quantised base + adapter (as trained): max |logit diff| = {as_trained:.3g}")
        info["max_logit_diff_vs_quantized_base_plus_adapter"] = as_trained

    (staging / MERGE_INFO_FILE).write_text(json.dumps(info, indent=2))
    replace_folder(staging, args.output)
    print(f"merged model: {args.output} ({format_size(weights_size(args.output))} of weights)")


if __name__ == "__main__":
    run_main(main)
