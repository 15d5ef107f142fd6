"""Qwen-1 (Qwen-7B-Chat, Qwen-1.8B/14B/72B, base and chat) as native transformers Qwen2 models: no remote code.

A Qwen-1 release folder (`config.json` with model_type "qwen", `qwen.tiktoken`, `modeling_qwen.py`) needs its
own code, which does not run on transformers 5. Qwen-1 is the Qwen2 architecture under other names, so every
script converts such a folder once into a native Qwen2 folder (weights shard by shard, a fast tokenizer with
identical ids, ChatML template, generation config) kept in a cache, and works on that. As a command:

    python -m sft.qwen1 Qwen-7B-Chat Qwen-7B-Chat-native
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import shutil
from pathlib import Path

from sft.errors import UserError, run_main
from sft.qwen1_convert import (
    CONVERSION_FILE,
    CONVERTER_VERSION,
    QWEN1_LORA_TARGETS,
    Qwen1Error,
    convert_qwen1,
    read_qwen1_config,
    weight_files,
)

logger = logging.getLogger(__name__)


def cache_folder() -> Path:
    """Where converted Qwen-1 models are kept: $LLM_FINETUNING_CACHE, else ~/.cache/llm-finetuning."""
    root = os.environ.get("LLM_FINETUNING_CACHE")
    if root:
        return Path(root).expanduser() / "qwen1-native"
    return Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "llm-finetuning" / "qwen1-native"


def native_folder(source: Path) -> Path:
    """The cache folder of `source`'s conversion: named after it and a hash of its path, config and files."""
    digest = hashlib.sha256(f"{source.resolve()}\n{CONVERTER_VERSION}\n".encode())
    digest.update((source / "config.json").read_bytes())
    for file in [*weight_files(source), source / "qwen.tiktoken", source / "generation_config.json"]:
        if file.is_file():  # size and time: a changed file makes a new conversion, without reading 100+ GB
            stat = file.stat()
            digest.update(f"\n{file.name} {stat.st_size} {stat.st_mtime_ns}".encode())
    name = source.resolve().name
    if source.resolve().parent.name == "snapshots":  # the hub cache: models--Qwen--Qwen-7B-Chat/snapshots/<commit>
        name = source.resolve().parent.parent.name.rsplit("--", 1)[-1]
    return cache_folder() / f"{name}-{digest.hexdigest()[:12]}"


def local_qwen1_folder(path: str) -> Path | None:
    """The local folder of `path` when it is a Qwen-1 model (a folder, or a hub id, downloaded), else None."""
    local = Path(path).expanduser()
    if local.is_dir():
        return local if read_qwen1_config(local) is not None else None
    if path.count("/") != 1 or path.startswith((".", "/", "~")):
        return None
    from huggingface_hub import hf_hub_download, snapshot_download

    try:
        config_file = Path(hf_hub_download(path, "config.json"))
    except Exception:  # not a hub model, or no network: transformers says so when it loads `path`
        return None
    if read_qwen1_config(config_file.parent) is None:
        return None
    files = ["*.json", "qwen.tiktoken", "LICENSE*", "NOTICE*"]
    try:
        folder = Path(snapshot_download(path, allow_patterns=[*files, "*.safetensors"]))
        if not list(folder.glob("*.safetensors")):
            folder = Path(snapshot_download(path, allow_patterns=[*files, "*.bin"]))
    except Exception as error:
        raise Qwen1Error(f"{path}: downloading the Qwen-1 model failed ({type(error).__name__}: {error})") from None
    return folder


def resolve_model_path(path: str) -> str:
    """`path`, unless it is a Qwen-1 model: then its native Qwen2 folder, converted on first use and cached.

    Processes started together (torchrun) wait for one conversion under a file lock. Raises Qwen1Error when a
    Qwen-1 model cannot be converted.
    """
    source = local_qwen1_folder(path)
    if source is None:
        return path
    from filelock import FileLock

    output = native_folder(source)
    output.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(output) + ".lock"):
        if (output / CONVERSION_FILE).is_file():
            logger.info("Qwen-1 model %s: using its native Qwen2 conversion %s", path, output)
        else:
            # What an older, non-atomic conversion left (no CONVERSION_FILE); a killed one's staging folder is
            # cleared by the next one. No one else converts this source: we hold the lock.
            shutil.rmtree(output, ignore_errors=True)
            convert_qwen1(source, output)
            logger.info("Qwen-1 model %s converted to the native Qwen2 folder %s (kept for later runs)", path, output)
    return str(output)


def native_lora_targets(targets: list[str]) -> list[str]:
    """Qwen-1's LoRA target module names (c_attn c_proj w1 w2) as the native model's, logged when they change."""
    native: list[str] = []
    for target in targets:
        for name in QWEN1_LORA_TARGETS.get(target, [target]):
            if name not in native:
                native.append(name)
    if native != targets:
        logger.info(
            "--lora_target_modules %s are Qwen-1 names: %s in the native model", " ".join(targets), " ".join(native)
        )
    return native


def main() -> None:
    from sft.quiet import setup, setup_logging  # the command's set-up: importing this module sets up nothing

    setup()
    parser = argparse.ArgumentParser(
        description="Converts a Qwen-1 model folder (Qwen-7B-Chat, ...) into a native transformers Qwen2 folder "
        "with a fast tokenizer, chat template and generation config: no remote code needed to load it.",
    )
    parser.add_argument("source", help="the Qwen-1 folder (config.json with model_type 'qwen', qwen.tiktoken)")
    parser.add_argument("output", help="the new folder to write (must not exist)")
    args = parser.parse_args()
    setup_logging(logging.INFO)
    try:
        output = convert_qwen1(args.source, args.output)
    except OSError as error:  # a folder we cannot read or write (permissions, a full disk): the user's to mend
        raise UserError(f"converting {args.source} to {args.output}: {error}") from error
    print(f"native Qwen2 model: {output}")


if __name__ == "__main__":
    run_main(main)
