"""What our code decides for each model family, and the README's table of families written from it.

For every family of scripts/tiny_families.py a tiny random model is built and put through our own code paths, one
forward and backward pass each, no training: finetune.py's `sft.model_setup.build_model` for full fine-tuning, LoRA
and Q-LoRA with the default flags; sft.packing's collator choice and leak probe; sft.loss's fused-or-plain decision;
merge_lora.py on a (randomly perturbed) adapter; sft.chat loading and replying. Each mode comes out as works,
refused (our one-line `error:` message), wrong (runs, but its result is off) or crash (a traceback: a bug). The
training itself is proven per family by tests/test_architectures.py, which also checks that the README's table is
the one this module writes now.

    python -m scripts.family_table            # rewrites the README's section between the markers
    python -m scripts.family_table --check    # exits 1 when the README's table is not what the code decides
"""

from __future__ import annotations

import sft.quiet

if __name__ == "__main__":
    sft.quiet.setup()  # first: it silences known chatter of the libraries imported below

# isort: split
import argparse
import contextlib
import difflib
import io
import logging
import re
import sys
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from scripts.tiny_families import FAMILIES, Family, build_family_model
from sft.errors import UserError

README = Path(__file__).resolve().parent.parent / "README.md"
START = "<!-- family-table:start (python -m scripts.family_table writes this section) -->"
END = "<!-- family-table:end -->"
EXAMPLES = str(Path(__file__).resolve().parent.parent / "data" / "example_chatml.jsonl")
MODES = ("full", "lora", "qlora", "packing", "loss", "merge", "chat")
# The leak probe's tolerance (relative to what full cross-sample attention changes) for a model in fp32: samples
# kept apart differ by rounding only (about 1e-6 of it); a short convolution or state-space layer that carries
# over from one sample into the next, by 1e-3 of it on the tiny models, within the probe's 5% for bf16.
STRICT_LEAK_TOLERANCE = 1e-4
# merge_lora.py's own check: the merged model's logits against base + adapter's, in fp32.
MERGE_TOLERANCE = 1e-4


@dataclass(frozen=True)
class Outcome:
    """One mode of one family: status "yes" (works), "refused" (a clean error), "wrong" (runs, result off),
    "crash" (a traceback) or "n/a" (what it needs does not work); `detail` says how it works or why not."""

    status: str
    detail: str = ""

    @property
    def works(self) -> bool:
        return self.status == "yes"


@dataclass
class Row:
    family: Family
    loads_as: str  # the class finetune.py loads the folder as
    outcomes: dict[str, Outcome]


def without_measurements(message: str) -> str:
    """A message's first line as the same on every machine and run: without parenthesised figures (a probe's
    measured differences), a printed set of names in sorted order (a set's order changes with each process)."""
    first_line = message.strip().splitlines()[0] if message.strip() else ""
    first_line = re.sub(r"\s*\([^()]*\d\.\d[^()]*\)", "", first_line)
    return re.sub(r"\{'[^{}]*'\}", lambda names: "{" + ", ".join(sorted(names[0][1:-1].split(", "))) + "}", first_line)


class WrongResult(Exception):
    """A mode that runs but whose result is not what it should be."""


def attempt(action: Callable[[], str | None]) -> Outcome:
    """Runs `action` (which returns a detail, or raises): our UserError is a refusal, anything else a crash."""
    try:
        return Outcome("yes", action() or "")
    except UserError as error:
        return Outcome("refused", without_measurements(str(error)))
    except WrongResult as error:
        return Outcome("wrong", str(error))
    except Exception as error:  # a traceback a user would see: reported as a crash, not hidden
        return Outcome("crash", without_measurements(f"{type(error).__name__}: {error}"))


def run_flags(folder: str, output: str, *extra: str) -> list[str]:
    """finetune.py's flags for this folder: the defaults, but for these extra flags."""
    return ["--model_name_or_path", folder, "--data_path", EXAMPLES, "--output_dir", output, *extra]


def build(folder: str, *extra: str):
    """finetune.py's model for these flags (its `build_model`), with its tokenizer and a batch of the example data."""
    from sft import model_setup
    from sft.args import parse_arguments
    from sft.data import load_conversations, make_collator
    from sft.evaluation import tokenize_samples

    with tempfile.TemporaryDirectory() as output:
        model_args, _data_args, training_args, lora_args = parse_arguments(run_flags(folder, output, *extra))
        tokenizer = model_setup.tokenizer_or_error(model_args, training_args.model_max_length)
        model = model_setup.build_model(model_args, training_args, lora_args, tokenizer)
    samples = tokenize_samples(tokenizer, load_conversations(EXAMPLES)[:2], 128)
    batch = make_collator(tokenizer)([{"input_ids": s.input_ids, "labels": s.labels} for s in samples])
    return model, tokenizer, batch


def expert_parameters(model) -> list[tuple[str, torch.nn.Parameter]]:
    """The routed experts' parameters of a mixture-of-experts model (a shared expert is not among them)."""
    return [(name, p) for name, p in model.named_parameters() if ".experts." in name and "lora_" not in name]


def lora_experts(model) -> str:
    """For a mixture of experts: whether LoRA adapts the routed experts."""
    if not expert_parameters(model):
        return ""
    adapted = any(".experts." in name and "lora_" in name for name, _ in model.named_parameters())
    return "experts adapted" if adapted else "experts frozen"


def quantized_experts(model) -> str:
    """For a mixture of experts: whether the routed experts are quantised (bitsandbytes packs them as uint8)."""
    experts = expert_parameters(model)
    if not experts:
        return ""
    return "experts quantised" if all(p.dtype == torch.uint8 for _, p in experts) else "experts not quantised"


def train_step(model, batch) -> None:
    """One forward and backward pass, as a training step starts."""
    model.train()
    model(**batch).loss.backward()
    model.zero_grad()


@contextlib.contextmanager
def captured_log(name: str):
    """The messages logged to logger `name` while the context is open."""
    messages: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: messages.append(record.getMessage())
    logger = logging.getLogger(name)
    level, propagate = logger.level, logger.propagate
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False  # caught here, not printed
    try:
        yield messages
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
        logger.propagate = propagate


def loss_decision(model) -> str:
    """sft.loss's decision for the model: "fused", or "plain: why" as it logs it."""
    from sft.loss import fused_loss_for

    with captured_log("sft.loss") as messages:
        fused = fused_loss_for(model)
    if fused is not None:
        return "fused"
    reasons = [m.split("not fused: ", 1)[-1] for m in messages if m.startswith("Loss: plain")]
    return "plain: " + (reasons[0] if reasons else "no reason logged")


def packing_decision(model, tokenizer) -> str:
    """sft.packing's collator for the model and its leak probe; the attention implementation and layout."""
    from sft.packing import PackingError, check_no_leak, packing_collator

    collator = packing_collator(model, tokenizer.pad_token_id)
    check_no_leak(model, collator.layout)
    try:  # the probe's tolerance is for bf16; in fp32 a model that keeps samples apart is far within this one
        check_no_leak(model, collator.layout, tolerance=STRICT_LEAK_TOLERANCE)
    except PackingError:
        raise WrongResult(
            "packed samples still see each other (the leak probe's tolerance lets it pass): a sample's logits "
            "change with the sample packed before it"
        ) from None
    return f"{model.config._attn_implementation}, {collator.layout}"


def merge_decision(model, tokenizer, folder: str, work: Path) -> str:
    """merge_lora.py on the LoRA model's adapter (its B matrices made non-zero, so the merge changes the weights)."""
    import json

    import merge_lora

    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.05)
    adapter, merged = work / "adapter", work / "merged"
    model.save_pretrained(adapter)
    tokenizer.save_pretrained(adapter)
    argv = sys.argv
    sys.argv = ["merge_lora.py", "--adapter", str(adapter), "--output", str(merged), "--dtype", "fp32"]
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # its report of the check: read from merge_info.json
            merge_lora.main()
    finally:
        sys.argv = argv
    difference = json.loads((merged / merge_lora.MERGE_INFO_FILE).read_text())["max_logit_diff_vs_base_plus_adapter"]
    if not difference <= MERGE_TOLERANCE:
        raise WrongResult("the merged model's logits differ from base + adapter's")
    return ""


def chat_decision(path: str) -> str:
    """sft.chat on the folder (a model, or an adapter on its base): loads and replies, as the demos do."""
    from sft.chat import load_for_chat, reply

    model, tokenizer = load_for_chat(path, cpu_only=True)
    reply(model, tokenizer, [{"role": "user", "content": "Hello"}], max_new_tokens=4)
    return ""


def decide(family: Family, folder: str) -> Row:
    """Every mode of the table for the family whose tiny model is in `folder`."""
    outcomes: dict[str, Outcome] = {}
    loads_as = ""

    def full() -> str:
        nonlocal loads_as
        model, tokenizer, batch = build(folder)
        loads_as = type(model).__name__
        outcomes["loss"] = attempt(lambda: loss_decision(model))
        outcomes["packing"] = attempt(lambda: packing_decision(model, tokenizer))
        train_step(model, batch)
        return ""

    outcomes["full"] = attempt(full)
    for mode in ("loss", "packing"):
        outcomes.setdefault(mode, Outcome("crash", "the model did not load"))

    with tempfile.TemporaryDirectory() as work:
        lora_model = None

        def lora() -> str:
            nonlocal lora_model
            model, tokenizer, batch = build(folder, "--use_lora")
            train_step(model, batch)
            lora_model = (model, tokenizer)
            return lora_experts(model)

        outcomes["lora"] = attempt(lora)

        def qlora() -> str:
            model, _tokenizer, batch = build(folder, "--use_lora", "--q_lora")
            train_step(model, batch)
            return quantized_experts(model)

        outcomes["qlora"] = attempt(qlora)
        if lora_model is None:
            outcomes["merge"] = Outcome("n/a", "nothing to merge: LoRA does not train")
            outcomes["chat"] = attempt(lambda: chat_decision(folder))
        else:
            outcomes["merge"] = attempt(lambda: merge_decision(*lora_model, folder, Path(work)))
            adapter = Path(work) / "adapter"
            outcomes["chat"] = attempt(lambda: chat_decision(str(adapter if adapter.is_dir() else folder)))
    return Row(family, loads_as, outcomes)


def decide_all(families: Iterable[Family] = FAMILIES, models: Path | None = None) -> list[Row]:
    """The rows of every family, their tiny models built in `models` (a temporary folder when None)."""
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        for family in families:
            folder = build_family_model(family, Path(models or scratch) / family.model_type)
            rows.append(decide(family, str(folder)))
    return rows


CELL_WORDS = {"yes": "yes", "refused": "refused", "wrong": "**wrong**", "crash": "**crash**", "n/a": "n/a"}


def render(rows: list[Row]) -> str:
    """The README section: one line per family, reasons as numbered notes below the table."""
    notes: list[str] = []

    def note(text: str) -> int:
        if text not in notes:
            notes.append(text)
        return notes.index(text) + 1

    def cell(outcome: Outcome) -> str:
        if not outcome.works:
            return f"{CELL_WORDS[outcome.status]} [{note(outcome.detail)}]"
        if outcome.detail.startswith("plain: "):  # the loss: plain, and why
            return f"plain [{note(outcome.detail.removeprefix('plain: '))}]"
        return f"yes ({outcome.detail})" if outcome.detail and outcome.detail != "fused" else outcome.detail or "yes"

    header = "| Family | model type | loads as | full | LoRA | Q-LoRA | packing | loss | merge | chat |"
    lines = [header, "|" + "---|" * header.count(" | ") + "---|"]
    for row in rows:
        cells = [row.family.name, f"`{row.family.model_type}`", f"`{row.loads_as}`" if row.loads_as else "-"]
        cells += [cell(row.outcomes[mode]) for mode in MODES]
        lines.append("| " + " | ".join(cells) + " |")
    if notes:  # a blank line, then the notes the cells point to
        lines.append("")
        lines += [f"{number}. {text}" for number, text in enumerate(notes, start=1)]
    return "\n".join(lines)


def readme_section(readme: str) -> str | None:
    """What the README holds between the markers, or None when it has no such section."""
    if START not in readme or END not in readme:
        return None
    return readme.split(START, 1)[1].split(END, 1)[0].strip("\n")


def with_section(readme: str, table: str) -> str:
    before, rest = readme.split(START, 1)
    return before + START + "\n" + table + "\n" + END + rest.split(END, 1)[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="only compare the README's table with the code's")
    parser.add_argument("--readme", default=str(README), help="the README to write or check")
    args = parser.parse_args()
    sft.quiet.setup_logging(logging.WARNING)
    table = render(decide_all())
    readme = Path(args.readme).read_text()
    if readme_section(readme) is None:
        sys.exit(f"error: {args.readme} has no section between {START!r} and {END!r}")
    if args.check:
        if readme_section(readme) != table:
            print("\n".join(difflib.unified_diff(readme_section(readme).splitlines(), table.splitlines(), lineterm="")))
            sys.exit(f"error: {args.readme}'s table of families is not what the code decides now; run "
                     "python -m scripts.family_table")  # fmt: skip
        print("The README's table of families is current.")
        return
    Path(args.readme).write_text(with_section(readme, table))
    print(table)


if __name__ == "__main__":
    main()
