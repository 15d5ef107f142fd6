"""Measuring exported models: perplexity and logits on rendered samples, size on disk; and the files that must
travel with exported weights (tokenizer, chat template, generation config).

Shared by merge_lora.py and run_gptq.py. Samples are rendered and tokenised by `sft.data`, exactly as for
training, so "held-out perplexity" means the loss the fine-tune itself was trained to lower.
"""

from __future__ import annotations

import math
import os
import random
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import GenerationConfig, PreTrainedModel, PreTrainedTokenizerBase

from sft.data import (
    IGNORE_INDEX,
    Conversation,
    Conversations,
    DataError,
    TemplateRefusal,
    Tokenized,
    TrainOn,
    tokenize_conversation,
)


def tokenize_samples(
    tokenizer: PreTrainedTokenizerBase,
    conversations: list[Conversation],
    max_length: int,
    train_on: TrainOn = "assistant",
) -> list[Tokenized]:
    """Each conversation rendered and tokenised as for training (truncated to max_length); samples left with no
    labelled token are skipped.

    A conversation the chat template refuses is a DataError naming its file and line (or sample) when the
    conversations come from `load_conversations` (or `take`), else its index among `conversations`."""
    samples = []
    for k, messages in enumerate(conversations):
        try:
            samples.append(tokenize_conversation(tokenizer, messages, max_length, train_on))
        except TemplateRefusal as refusal:
            raise DataError(*where(conversations, k), None, refusal.message) from None
    return [sample for sample in samples if sample.input_ids]


def where(conversations: list[Conversation], k: int) -> tuple[str, str]:
    """(file, line or sample) of conversation k, for a DataError: its place in its data file when known."""
    wheres, paths = getattr(conversations, "wheres", None), getattr(conversations, "paths", None)
    if wheres:
        return paths[k] if paths else conversations.path, wheres[k]
    return getattr(conversations, "path", "built-in samples"), f"sample {k + 1}"


def take(conversations: list[Conversation], indices: list[int] | range) -> list[Conversation]:
    """The conversations at `indices`, still knowing the file and line each came from (a plain slice forgets)."""
    if isinstance(conversations, Conversations):
        return conversations.take(indices)
    return [conversations[i] for i in indices]


def head(conversations: list[Conversation], count: int) -> list[Conversation]:
    """The first `count` conversations, as `take` keeps them."""
    return take(conversations, range(min(count, len(conversations))))


def split_held_out(
    conversations: list[Conversation], num_held_out: int, seed: int = 0
) -> tuple[list[Conversation], list[Conversation]]:
    """(kept, held_out): `num_held_out` conversations drawn at random (fixed seed), the rest in file order."""
    if not 0 < num_held_out < len(conversations):
        raise ValueError(f"cannot hold out {num_held_out} of {len(conversations)} samples and keep some")
    held = set(random.Random(seed).sample(range(len(conversations)), num_held_out))
    kept = [i for i in range(len(conversations)) if i not in held]
    return take(conversations, kept), take(conversations, sorted(held))


@torch.no_grad()
def sample_logits(model: PreTrainedModel, samples: list[Tokenized]) -> list[torch.Tensor]:
    """The model's logits for each sample (one at a time, no padding), as float32 on the CPU."""
    model.eval()
    device = next(model.parameters()).device
    return [
        model(input_ids=torch.tensor([sample.input_ids], device=device)).logits[0].float().cpu() for sample in samples
    ]


def max_abs_diff(first: list[torch.Tensor], second: list[torch.Tensor]) -> float:
    """Largest |difference| between two lists of same-shaped tensors."""
    if len(first) != len(second) or not first:
        raise ValueError(f"expected two equally long, non-empty lists, got {len(first)} and {len(second)} tensors")
    return max((a - b).abs().max().item() for a, b in zip(first, second, strict=True))


@torch.no_grad()
def perplexity(model: PreTrainedModel, samples: list[Tokenized]) -> float:
    """exp of the mean next-token loss over all labelled tokens of the samples (token-weighted, as training)."""
    total_loss, total_tokens = 0.0, 0
    for logits, sample in zip(sample_logits(model, samples), samples, strict=True):
        labels = torch.tensor(sample.labels[1:])
        total_loss += F.cross_entropy(logits[:-1], labels, ignore_index=IGNORE_INDEX, reduction="sum").item()
        total_tokens += int((labels != IGNORE_INDEX).sum())
    if total_tokens == 0:
        raise ValueError("no labelled token to measure perplexity on")
    return math.exp(total_loss / total_tokens)


def is_weights_file(file: Path) -> bool:
    """safetensors files and PyTorch model/adapter .bin files (not training_args.bin and the like)."""
    return file.suffix == ".safetensors" or (
        file.suffix == ".bin" and file.name.startswith(("pytorch_model", "adapter_model"))
    )


def weights_size(path: str | os.PathLike) -> int:
    """Bytes of the weight files in a model folder."""
    return sum(file.stat().st_size for file in Path(path).rglob("*") if file.is_file() and is_weights_file(file))


def format_size(size: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.1f} {unit}" if unit != "B" else f"{size} B"
        size /= 1024
    raise AssertionError("unreachable")


def save_chat_files(folder: str | os.PathLike, tokenizer: PreTrainedTokenizerBase, generation_source: str) -> None:
    """Writes the tokenizer (with its chat template) and the generation config of `generation_source`, when it
    has one, so the exported folder chats as the original did."""
    tokenizer.save_pretrained(folder)
    if (Path(generation_source) / "generation_config.json").is_file():
        GenerationConfig.from_pretrained(generation_source).save_pretrained(folder)
