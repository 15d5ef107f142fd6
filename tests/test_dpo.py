"""dpo.py: log-probs through the fused output layer, the reference model (fresh LoRA, SFT adapter, full, precomputed),
its step-0 loss of ln 2, and its outputs (merge_lora.py)."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch
from host_reads import HostReads
from transformers import AutoModelForCausalLM

import dpo
import merge_lora
from sft.data.pairs import PairCollator, tokenize_pair
from sft.errors import run_main
from sft.loss import fused_loss_for, sequence_logps
from sft.modeling import load_tokenizer
from sft.preference import AdapterReference
from sft.preference_loss import preference_loss

LN2 = math.log(2)
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory) -> str:
    """Twelve pairs in LLaMA-Factory's sharegpt ranking form, some multi-turn."""
    records = []
    for i in range(12):
        turns = [{"from": "human", "value": f"Question {i}: say something kind."}]
        if i % 3 == 0:
            turns = [{"from": "human", "value": "Hello"}, {"from": "gpt", "value": "Hi there."}, *turns]
        records.append(
            {
                "conversations": turns,
                "chosen": {"from": "gpt", "value": f"You are doing well, friend {i}."},
                "rejected": {"from": "gpt", "value": f"No {i}."},
            }
        )
    path = tmp_path_factory.mktemp("pairs") / "pairs.jsonl"
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return str(path)


def flags(model: str, data: str, output, *extra: str) -> list[str]:
    return [
        *("--model_name_or_path", model, "--data_path", data, "--output_dir", str(output)),
        *("--max_steps", "2", "--per_device_train_batch_size", "2", "--learning_rate", "5e-3"),
        *("--logging_steps", "1", "--save_strategy", "no", "--report_to", "none", "--seed", "0"),
        *("--model_max_length", "128", "--dataloader_pin_memory", "false", "--lora_r", "8"),
        *extra,
    ]


def run_dpo(*argv: str):
    return dpo.train(*dpo.parse_arguments(list(argv)))


def first_step(trainer) -> dict:
    return next(entry for entry in trainer.state.log_history if "loss" in entry)


def batch_of(tokenizer, count: int = 3) -> dict:
    pairs = []
    for i in range(count):
        pair = {
            "prompt": [{"role": "user", "content": f"Tell me about number {i}" + " please" * i}],
            "chosen": {"role": "assistant", "content": f"It is {i}, a fine number."},
            "rejected": {"role": "assistant", "content": "No."},
        }
        t = tokenize_pair(tokenizer, pair, 256)
        pairs.append(
            {
                "chosen_input_ids": t.chosen_ids,
                "chosen_labels": t.chosen_labels,
                "rejected_input_ids": t.rejected_ids,
                "rejected_labels": t.rejected_labels,
            }
        )
    return PairCollator(tokenizer.pad_token_id)(pairs)


def test_log_probs_and_their_gradients_equal_the_models_own_forward(tiny_model, tokenizer):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    batch = batch_of(tokenizer)
    fused = fused_loss_for(model)
    assert fused is not None
    fused.chunk = 5  # several chunks, so the chunking is exercised
    ours, counts = sequence_logps(model, batch, fused)
    ours.sum().backward()
    ours_grad = model.lm_head.weight.grad.clone()
    model.zero_grad()

    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1].float()
    targets = batch["labels"][:, 1:]
    mask = targets.ne(-100)
    token_logps = logits.log_softmax(-1).gather(-1, targets.clamp(min=0)[..., None]).squeeze(-1)
    expected = (token_logps * mask).sum(1)
    expected.sum().backward()
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-4)
    assert counts.tolist() == mask.sum(1).tolist()
    torch.testing.assert_close(ours_grad, model.lm_head.weight.grad, rtol=1e-4, atol=1e-5)


def test_fresh_lora_starts_at_ln2_with_zero_rewards_and_learns(tiny_model, pairs_file, tmp_path):
    trainer = run_dpo(*flags(tiny_model, pairs_file, tmp_path / "out", "--use_lora", "--max_steps", "4"))
    steps = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert steps[0]["loss"] == pytest.approx(LN2, abs=1e-4)
    assert steps[0]["rewards/chosen"] == 0 and steps[0]["rewards/rejected"] == 0
    assert steps[-1]["loss"] < steps[0]["loss"]
    for name in ("rewards/margins", "rewards/accuracies", "logps/chosen", "length/chosen", "length/rejected"):
        assert name in steps[0]
    out = tmp_path / "out"
    run_info = json.loads((out / "finetune_run.json").read_text())
    assert run_info["stage"] == "preference" and run_info["mode"] == "lora"
    assert (out / "adapter_config.json").is_file() and (out / "training_curves.png").is_file()
    assert not (out / "reference").exists()


def test_from_an_sft_adapter_the_reference_is_the_sft_model(tiny_model, chat_adapter, pairs_file, tmp_path):
    trainer = run_dpo(*flags(chat_adapter, pairs_file, tmp_path / "out", "--use_lora", "--max_steps", "1"))
    step = first_step(trainer)
    assert step["loss"] == pytest.approx(LN2, abs=1e-4)
    assert step["rewards/chosen"] == 0 and step["rewards/rejected"] == 0
    # The same pairs with the base model (adapter off) as the reference: the SFT adapter's change shows.
    tokenizer = load_tokenizer(chat_adapter)
    batch = batch_of(tokenizer)
    model = trainer.model
    with torch.no_grad():
        policy = sequence_logps(model, batch, trainer.fused_loss)
        base = AdapterReference(model, None).logps(model, batch, trainer.fused_loss)
    half = policy[0].shape[0] // 2
    lengths = policy[1]
    result = preference_loss(
        "sigmoid", policy[0][:half], policy[0][half:], lengths[:half], lengths[half:], base[:half], base[half:]
    )
    assert abs(result.loss.item() - LN2) > 1e-3
    assert result.chosen_rewards.abs().max().item() > 1e-3


def test_precomputed_reference_equals_the_live_one_and_is_reused(tiny_model, pairs_file, tmp_path, caplog):
    cache = tmp_path / "cache"
    extra = ("--max_steps", "1", "--preprocessing_cache_dir", str(cache), "--precompute_reference")
    trainer = run_dpo(*flags(tiny_model, pairs_file, tmp_path / "full", *extra))
    assert first_step(trainer)["loss"] == pytest.approx(LN2, abs=1e-4)
    dataset = trainer.train_dataset
    # The live reference of full fine-tuning: the starting model, loaded afresh.
    reference = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    collator = PairCollator(0)
    rows = [dataset[k] for k in range(4)]
    batch = collator(rows)
    with torch.no_grad():
        live = sequence_logps(reference, batch, fused_loss_for(reference))[0]
    torch.testing.assert_close(batch["ref_logps"], live, rtol=1e-5, atol=1e-4)
    assert len(list(Path(cache, "llm_finetuning").glob("reference-*.pt"))) == 1
    caplog.clear()
    with caplog.at_level("INFO"):
        run_dpo(*flags(tiny_model, pairs_file, tmp_path / "again", *extra))
    assert "precomputed before, read from" in caplog.text


def test_full_fine_tuning_with_a_frozen_copy_starts_at_ln2(tiny_model, pairs_file, tmp_path, caplog):
    with caplog.at_level("INFO"):
        trainer = run_dpo(*flags(tiny_model, pairs_file, tmp_path / "out", "--max_steps", "1"))
    assert first_step(trainer)["loss"] == pytest.approx(LN2, abs=1e-4)
    assert "Reference model: a frozen copy of the starting model" in caplog.text


@pytest.mark.parametrize("loss_type", ["simpo", "orpo", "ipo"])
def test_other_losses_train(tiny_model, pairs_file, tmp_path, loss_type):
    trainer = run_dpo(*flags(tiny_model, pairs_file, tmp_path / "out", "--use_lora", "--loss_type", loss_type))
    assert math.isfinite(first_step(trainer)["loss"])


def test_merge_lora_takes_a_dpo_adapter(tiny_model, pairs_file, tmp_path, monkeypatch):
    run_dpo(*flags(tiny_model, pairs_file, tmp_path / "adapter", "--use_lora"))
    merged = tmp_path / "merged"
    argv = ["merge_lora.py", "--adapter", str(tmp_path / "adapter"), "--output", str(merged), "--dtype", "fp32"]
    monkeypatch.setattr(sys, "argv", argv)
    run_main(merge_lora.main)
    assert AutoModelForCausalLM.from_pretrained(merged) is not None


def test_user_mistakes_are_one_error_line_before_the_model_loads(user_error, tiny_model, tmp_path):
    broken = tmp_path / "broken.jsonl"
    broken.write_text(json.dumps({"prompt": "q", "chosen": "a"}) + "\n")
    line = user_error("dpo.py", *flags(tiny_model, str(broken), tmp_path / "out"))
    assert "broken.jsonl, line 1, field 'rejected'" in line
    line = user_error("dpo.py", *flags(tiny_model, str(broken), tmp_path / "out", "--loss_type", "kto"))
    assert "--loss_type 'kto'" in line


def test_dpo_launcher_trains_through_torchrun(tiny_model, pairs_file, tmp_path):
    import os
    import socket
    import subprocess

    with socket.socket() as probe:
        probe.bind(("localhost", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, "GPUS_PER_NODE": "1", "MASTER_PORT": str(port), "CUDA_VISIBLE_DEVICES": ""}
    output = tmp_path / "out"
    command = ["bash", "finetune/dpo_lora_single_gpu.sh", "-m", tiny_model, "-d", pairs_file, "-o", str(output)]
    command += ["--max_steps", "2", "--save_strategy", "no", "--gradient_accumulation_steps", "1"]
    command += ["--model_max_length", "128", "--gradient_checkpointing", "false"]
    run = subprocess.run(command, cwd=Path(__file__).resolve().parent.parent, env=env, capture_output=True,
                         text=True, timeout=600)  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    assert "dpo.py" in run.stderr and "--beta 0.1" in run.stderr
    assert json.loads((output / "finetune_run.json").read_text())["stage"] == "preference"


def test_rerun_resumes_and_another_loss_is_another_run(tiny_model, pairs_file, tmp_path, user_error):
    output = tmp_path / "out"
    saving = ("--use_lora", "--save_strategy", "steps", "--save_steps", "1")
    run_dpo(*flags(tiny_model, pairs_file, output, *saving))
    assert (output / "checkpoint-2").is_dir()
    trainer = run_dpo(*flags(tiny_model, pairs_file, output, *saving, "--max_steps", "3"))
    assert trainer.state.global_step == 3
    assert [entry["step"] for entry in trainer.state.log_history if "loss" in entry][-1] == 3
    line = user_error("dpo.py", *flags(tiny_model, pairs_file, output, *saving, "--max_steps", "4", "--beta", "0.5"))
    assert "holds another run" in line and "preference" in line


def test_qlora_from_an_sft_adapter_starts_at_ln2(chat_adapter, pairs_file, tmp_path):
    extra = ("--use_lora", "--q_lora", "--max_steps", "1")
    trainer = run_dpo(*flags(chat_adapter, pairs_file, tmp_path / "out", *extra))
    step = first_step(trainer)
    assert step["loss"] == pytest.approx(LN2, abs=1e-4)
    assert step["rewards/chosen"] == 0 and step["rewards/rejected"] == 0


def test_metrics_are_read_once_per_log_not_per_micro_batch(tiny_model, pairs_file, tmp_path):
    # The preference code's host reads (each one waits for a GPU's queue): none per micro-batch, only at log time.
    preference_code = tuple(str(REPO / "sft" / name) for name in ("preference.py", "preference_metrics.py"))
    reads = {}
    for accumulation in (1, 4):  # 2 optimizer steps (2 logs) of 1 or 4 micro-batches of one pair
        with HostReads(preference_code) as host_reads:
            output = tmp_path / f"accumulation-{accumulation}"
            batches = ("--per_device_train_batch_size", "1", "--gradient_accumulation_steps", str(accumulation))
            run_dpo(*flags(tiny_model, pairs_file, output, "--use_lora", *batches))
        reads[accumulation] = host_reads.by_caller
    micro_batch_code = ("compute_loss", "_record", "add", "_remember")
    assert not [caller for caller in reads[1] + reads[4] if caller.split(":")[1] in micro_batch_code]
    assert reads[4] == reads[1]  # four times the micro-batches, not one read more
    assert reads[1]["preference_metrics.py:summary"] > 0  # the counter sees this code (one read set per log)
