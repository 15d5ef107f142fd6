"""Every family of the README's table of families, as a tiny random model, through our own code.

What each test asserts follows what the code decides (scripts/family_table.py): a mode the table claims trains
through finetune.train() with the default flags (LoRA resumes, merges and reloads to the same logits; packed loss
equals unpacked; the fused loss equals the model's own), and a mode the table refuses stops with that one-line
UserError, never a traceback. The README's table must be what the code decides now.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from scripts.family_table import (
    EXAMPLES,
    MERGE_TOLERANCE,
    README,
    STRICT_LEAK_TOLERANCE,
    Row,
    decide,
    readme_section,
    render,
    run_flags,
    without_measurements,
)
from scripts.tiny_families import FAMILIES, Family, build_family_model
from sft.errors import UserError

# Modes that end in a traceback (a bug of ours or of a library under us, not a clean refusal) or run wrong today:
# expected to fail until fixed. Any other crash or wrong result fails its test.
KNOWN_BUGS: dict[tuple[str, str], str] = {}

# One or two steps of batches of 2 on the example data: every other flag is finetune.py's default.
SHORT_RUN = ["--max_steps", "1", "--per_device_train_batch_size", "2", "--model_max_length", "128"]
SHORT_RUN += [
    "--save_strategy",
    "no",
    "--report_to",
    "none",
    "--dataloader_pin_memory",
    "false",
    "--logging_steps",
    "1",
]


@pytest.fixture(scope="module")
def decided(tmp_path_factory: pytest.TempPathFactory):
    """`decided(family)`: (folder of its tiny model, what the code decides for it), each built once per module."""
    models = tmp_path_factory.mktemp("families")
    rows: dict[str, tuple[str, Row]] = {}

    def get(family: Family) -> tuple[str, Row]:
        if family.name not in rows:
            folder = str(build_family_model(family, models / family.model_type))
            rows[family.name] = (folder, decide(family, folder))
        return rows[family.name]

    return get


def outcome_of(row: Row, mode: str):
    """The code's decision for `mode`; a crash or wrong result fails the test (or is expected to, when known)."""
    outcome = row.outcomes[mode]
    if outcome.status in ("crash", "wrong"):
        known = KNOWN_BUGS.get((row.family.model_type, mode))
        if known:
            pytest.xfail(f"known bug: {known}")
        pytest.fail(f"{row.family.name}, {mode}: {outcome.status}: {outcome.detail}")
    return outcome


def train(folder: str, output: Path, *extra: str):
    import finetune
    from sft.args import parse_arguments

    return finetune.train(*parse_arguments([*run_flags(folder, str(output), *SHORT_RUN), *extra]))


def assert_refused(folder: str, output: Path, detail: str, *extra: str) -> None:
    """finetune.train() stops with the table's refusal: one UserError line."""
    with pytest.raises(UserError) as refusal:
        train(folder, output, *extra)
    message = str(refusal.value)
    assert "\n" not in message.strip(), message
    assert without_measurements(message) == detail


def example_batch(tokenizer, count: int = 3) -> list:
    from sft.data import load_conversations
    from sft.evaluation import tokenize_samples

    return tokenize_samples(tokenizer, load_conversations(EXAMPLES)[:count], 128)


@pytest.mark.parametrize("family", FAMILIES, ids=lambda family: family.model_type)
def test_lora_trains_resumes_merges_and_chats(family, decided, tmp_path, caplog):
    folder, row = decided(family)
    outcome = outcome_of(row, "lora")
    output = tmp_path / "lora"
    if not outcome.works:
        assert_refused(folder, output, outcome.detail, "--use_lora")
        return
    # Two steps saved at each; the run stopped after the first checkpoint: the rerun resumes from it.
    args = ["--use_lora", "--max_steps", "2", "--save_strategy", "steps", "--save_steps", "1"]
    train(folder, output, *args)
    shutil.rmtree(output / "checkpoint-2")
    (output / "finetune_run.json").unlink()
    caplog.set_level("INFO", logger="finetune")
    resumed = train(folder, output, *args)
    assert "Resuming from" in caplog.text and "checkpoint-1" in caplog.text
    assert [entry["step"] for entry in resumed.state.log_history if "loss" in entry] == [1, 2]

    merge = row.outcomes["merge"]
    assert merge.works, merge  # a LoRA that trains must merge
    merged = tmp_path / "merged"
    run_merge("--adapter", str(output), "--output", str(merged), "--dtype", "fp32")
    info = json.loads((merged / "merge_info.json").read_text())
    assert info["max_logit_diff_vs_base_plus_adapter"] <= MERGE_TOLERANCE
    from peft import PeftModel

    from sft.modeling import load_tokenizer

    samples = example_batch(load_tokenizer(str(output)))
    with_adapter = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(folder), output).eval()
    reloaded = AutoModelForCausalLM.from_pretrained(merged).eval()
    with torch.no_grad():
        for sample in samples:
            ids = torch.tensor([sample.input_ids])
            torch.testing.assert_close(reloaded(ids).logits, with_adapter(ids).logits, rtol=0, atol=MERGE_TOLERANCE)

    if outcome_of(row, "chat").works:
        from sft.chat import load_for_chat, reply

        model, tokenizer = load_for_chat(str(output), cpu_only=True)
        assert isinstance(reply(model, tokenizer, [{"role": "user", "content": "Hello"}], max_new_tokens=4), str)


def run_merge(*args: str) -> None:
    import merge_lora

    argv = sys.argv
    sys.argv = ["merge_lora.py", *args]
    try:
        merge_lora.main()
    finally:
        sys.argv = argv


@pytest.mark.parametrize("family", FAMILIES, ids=lambda family: family.model_type)
def test_full_fine_tuning_and_packing(family, decided, tmp_path):
    folder, row = decided(family)
    outcome_of(row, "full")
    trainer = train(folder, tmp_path / "full")
    assert trainer.state.global_step == 1
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "full").state_dict()
    for name, tensor in trainer.model.state_dict().items():
        torch.testing.assert_close(reloaded[name], tensor)

    packing = outcome_of(row, "packing")
    if not packing.works:
        assert_refused(folder, tmp_path / "packed", packing.detail, "--packing")
        return
    assert train(folder, tmp_path / "packed", "--packing").state.global_step == 1
    assert_packed_loss_equals_unpacked(folder, packing.detail.split(", ")[-1])


def assert_packed_loss_equals_unpacked(folder: str, layout: str) -> None:
    """The same samples' loss, packed into one row (and batched as `layout`) and padded one per row, in fp32."""
    from sft.data import make_collator
    from sft.modeling import load_model, load_tokenizer
    from sft.packing import check_no_leak, packing_collator

    tokenizer = load_tokenizer(folder)
    model = load_model(folder).eval()
    collator = packing_collator(model, tokenizer.pad_token_id)  # sets the model up as finetune.py --packing does
    assert collator.layout == layout
    check_no_leak(model, layout, tolerance=STRICT_LEAK_TOLERANCE)  # fp32: each sample's logits as alone
    samples = example_batch(tokenizer)
    padded = make_collator(tokenizer)([{"input_ids": s.input_ids, "labels": s.labels} for s in samples])
    row = {"input_ids": [], "labels": [], "position_ids": []}
    for sample in samples:
        row["input_ids"] += sample.input_ids
        row["labels"] += [-100] + sample.labels[1:]  # as packing does: a sample's first label predicts nothing
        row["position_ids"] += list(range(len(sample.input_ids)))
    packed = collator([row])
    with torch.no_grad():  # no cache, as in training: with one, transformers does not look for packed samples
        packed_loss = model(**packed, use_cache=False).loss
        torch.testing.assert_close(packed_loss, model(**padded, use_cache=False).loss, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES, ids=lambda family: family.model_type)
def test_fused_loss_decision_and_equality(family, decided):
    from sft.loss import causal_lm_loss, fused_loss_for
    from sft.modeling import load_model, load_tokenizer
    from sft.moe import keep_router_aux_loss

    folder, row = decided(family)
    outcome = outcome_of(row, "loss")
    model = load_model(folder)  # fp32
    keep_router_aux_loss(model)  # as finetune.py's model set-up does: the router's auxiliary loss in the loss
    fused = fused_loss_for(model)
    if outcome.detail != "fused":
        assert fused is None and "\n" not in outcome.detail
        return
    assert fused is not None
    tokenizer = load_tokenizer(folder)
    from sft.data import make_collator

    samples = example_batch(tokenizer)
    batch = make_collator(tokenizer)([{"input_ids": s.input_ids, "labels": s.labels} for s in samples])
    model.eval()  # no dropout: both losses see the same forward pass
    own = model(**batch).loss
    ours = causal_lm_loss(model, batch, fused)
    torch.testing.assert_close(ours, own, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES, ids=lambda family: family.model_type)
def test_qlora_trains_or_is_refused(family, decided, tmp_path):
    folder, row = decided(family)
    outcome = outcome_of(row, "qlora")
    if not outcome.works:
        assert_refused(folder, tmp_path / "qlora", outcome.detail, "--use_lora", "--q_lora")
        return
    assert train(folder, tmp_path / "qlora", "--use_lora", "--q_lora").state.global_step == 1


def test_readme_table_is_what_the_code_decides(decided):
    table = render([decided(family)[1] for family in FAMILIES])
    assert readme_section(README.read_text()) == table, "the README's table is stale: python -m scripts.family_table"
