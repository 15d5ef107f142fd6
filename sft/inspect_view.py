"""How `python -m sft.inspect` shows what it found: training rows token by token, and the report as text."""

from __future__ import annotations

import os
import sys

from transformers import PreTrainedTokenizerBase

from sft.data import IGNORE_INDEX

FORMAT_NAMES = {
    "qwen": "Qwen 'conversations'",
    "chatml": "ChatML 'messages'",
    "alpaca": "alpaca",
    "prompt_completion": "prompt/completion",
    "text": "plain text",
    "unknown": "?",
}
FATES = {
    "ok": "fit",
    "truncated": "truncated to --model_max_length",
    "chunked": "split into --model_max_length chunks (plain text)",
    "dropped_too_long": "dropped: longer than --model_max_length (--drop_long_samples)",
    "dropped_no_label": "dropped: no trained token left",
}


def trained_count(labels: list[int]) -> int:
    """Tokens whose label the loss sees: the model shifts labels by one, so a row's first label never counts."""
    return sum(label != IGNORE_INDEX for label in labels[1:])


RESET = "\033[0m"
TRAINED_SHADES = ("\033[30;42m", "\033[30;102m")  # black on green, black on light green: alternate per token
PLAIN_SHADES = ("\033[37m", "\033[90m")  # light grey, dark grey
SPECIAL = "\033[1;4m"  # bold, underlined


def token_pieces(tokenizer: PreTrainedTokenizerBase, input_ids: list[int]) -> list[tuple[int, int, str]]:
    """(first token, end token, text) pieces covering `input_ids`: one token each, or a few where a character
    spans tokens. Each piece is decoded after a few tokens of context, so that tokenizers that decode a lone
    token differently (sentencepiece drops its leading space) still give the text as it reads."""

    def decode(ids: list[int]) -> str:
        return tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)

    pieces = []
    start = 0
    for end in range(1, len(input_ids) + 1):
        context = max(0, start - 4)
        text = decode(input_ids[context:end])
        if text.endswith("\ufffd") and end < len(input_ids):
            continue  # part of a character: wait for the rest
        before = decode(input_ids[context:start])
        pieces.append((start, end, text[len(before) :] if text.startswith(before) else text))
        start = end
    return pieces


def render_row(
    tokenizer: PreTrainedTokenizerBase,
    input_ids: list[int],
    labels: list[int],
    position_ids: list[int] | None = None,
    color: bool = False,
    from_token: int = 0,
) -> str:
    """The row's text, token by token, with its trained tokens highlighted: colours when `color`, else
    [[...]] around each run of trained tokens. Newlines show as ↵; packed samples are separated by a line.
    `from_token`: the row from that token on (a preference pair's answer after its prompt), the tokens before
    it only read as the first tokens' context."""
    special_ids = set(tokenizer.all_special_ids)
    out = []
    in_trained = False
    for n, (start, end, text) in enumerate(token_pieces(tokenizer, input_ids)):
        if end <= from_token:
            continue
        if position_ids is not None and start > 0 and 0 in position_ids[start:end]:
            if in_trained and not color:
                out.append("]]")
                in_trained = False
            out.append(f"\n{'-' * 20} next packed sample {'-' * 20}\n")
        # A row's first label is never trained (the model shifts labels by one), whatever it holds.
        trained = any(labels[i] != IGNORE_INDEX for i in range(max(start, 1), end))
        shown = text.replace("\n", "↵\n")
        if color:
            shade = (TRAINED_SHADES if trained else PLAIN_SHADES)[n % 2]
            special = SPECIAL if any(i in special_ids for i in input_ids[start:end]) else ""
            # The colour is closed before each newline, so a trained newline does not paint the rest of the line.
            out.append("\n".join(f"{shade}{special}{line}{RESET}" if line else "" for line in shown.split("\n")))
        else:
            if trained != in_trained:
                out.append("[[" if trained else "]]")
                in_trained = trained
            out.append(shown)
    if in_trained and not color:
        out.append("]]")
    return "".join(out)


def format_report(report: dict) -> str:
    r = report
    lines = [f"Data: {' '.join(r['data_path'])} ({r['samples']} samples), tokenizer of {r['model']}"]
    if r["validation_samples"] is not None:
        lines.append(
            f"  validation:     {r['validation_samples']} more samples cut off by --val_size {r['val_size']:g} "
            "(not in the figures below)"
        )
    lines.append(
        "  formats:        " + ", ".join(f"{FORMAT_NAMES.get(k, k)} {v}" for k, v in sorted(r["formats"].items()))
    )
    lines.append(
        f"  turns:          {r['messages']} messages, {r['assistant_turns']} assistant turns "
        f"({r['messages'] / max(1, r['samples']):.1f} messages per sample)"
    )
    percentiles = ", ".join(f"{k} {v:.0f}" for k, v in r["length_percentiles"].items())
    lines.append(f"  length:         mean {r['length_mean']:.0f} tokens; {percentiles} (before truncation)")
    lines.append(f"Preprocessing (--model_max_length {r['model_max_length']}, --train_on {r['train_on']}):")
    for fate, text in FATES.items():
        count = r["fates"][fate]
        if fate == "ok" or count:
            lines.append(f"  {count:>6} {text}")
    if r["fates"]["truncated"]:
        lines.append(
            f"         truncation cuts {r['tokens_cut_by_truncation']} tokens, "
            f"{r['trained_tokens_cut_by_truncation']} of them trained"
        )
    if r["fates"]["chunked"]:
        lines.append(f"         chunking makes {r['chunk_rows']} training rows, every token kept")
    share = r["trained_tokens"] / max(1, r["tokens"])
    lines.append(
        f"  kept:           {r['kept_samples']} samples, {r['tokens']} tokens, "
        f"{r['trained_tokens']} trained ({share:.0%})"
    )
    if r["packing"]:
        p = r["packing"]
        lines.append(
            f"  packing:        {p['rows']} rows of up to {r['model_max_length']} tokens, "
            f"{p['samples_per_row']:.1f} samples per row, {p['efficiency']:.1%} of the rows' room is real tokens"
        )
    # Chunks of plain texts are training rows of their own: then a batch is not one of samples.
    unit = "packed rows" if r["packing"] else "rows" if r["chunk_rows"] else "samples"
    lines.append(
        f"Batches: {r['per_device_train_batch_size']} {unit} x {r['gradient_accumulation_steps']} accumulation "
        f"x {r['world_size']} process(es) = {r['rows_per_step']} {unit} per optimizer step"
    )
    total = (
        f"--max_steps {r['max_steps']} ({r['max_steps'] / r['steps_per_epoch']:.1f} epochs)"
        if r["max_steps"] > 0
        else f"{r['total_steps']} steps in {r['num_train_epochs']:g} epoch(s)"
    )
    lines.append(f"  {r['steps_per_epoch']} optimizer steps per epoch; {total}")
    return "\n".join(lines)


def use_color(choice: str) -> bool:
    if choice != "auto":
        return choice == "always"
    return sys.stdout.isatty() and not os.environ.get("NO_COLOR")
