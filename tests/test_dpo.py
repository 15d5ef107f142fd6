"""dpo.py: log-probs through the fused output layer, the reference model (fresh LoRA, SFT adapter, full, precomputed),
its step-0 loss of ln 2, and its outputs (merge_lora.py)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from datasets import Dataset
from host_reads import HostReads
from ports import free_port
from transformers import AutoModelForCausalLM

import dpo
import merge_lora
from sft.data.pairs import PairCollator, tokenize_pair
from sft.errors import ConfigurationError, run_main
from sft.loss import fused_loss_for
from sft.modeling import load_tokenizer
from sft.preference import (
    AdapterReference,
    ModelReference,
    PrecomputedReference,
    PreferenceArguments,
    StartingModelReference,
    numbered_pairs,
    reference_precomputed,
)
from sft.preference_loss import preference_loss
from sft.sequence_logps import sequence_logps

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


def pair_rows(tokenizer, count: int = 3) -> list[dict]:
    """`count` tokenised pairs, as tokenize_pairs writes their rows."""
    rows = []
    for i in range(count):
        pair = {
            "prompt": [{"role": "user", "content": f"Tell me about number {i}" + " please" * i}],
            "chosen": {"role": "assistant", "content": f"It is {i}, a fine number."},
            "rejected": {"role": "assistant", "content": "No."},
        }
        t = tokenize_pair(tokenizer, pair, 256)
        rows.append(
            {
                "chosen_input_ids": t.chosen_ids,
                "chosen_labels": t.chosen_labels,
                "rejected_input_ids": t.rejected_ids,
                "rejected_labels": t.rejected_labels,
            }
        )
    return rows


def batch_of(tokenizer, count: int = 3) -> dict:
    return PairCollator(tokenizer.pad_token_id)(pair_rows(tokenizer, count))


@pytest.mark.parametrize("head_trains", [True, False], ids=["full", "frozen_head"])
def test_log_probs_and_their_gradients_equal_the_models_own_forward(tiny_model, tokenizer, head_trains):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    model.lm_head.requires_grad_(head_trains)  # frozen (LoRA): backward recomputes the chunks by hand
    checked = model.lm_head.weight if head_trains else model.model.norm.weight
    batch = batch_of(tokenizer)
    fused = fused_loss_for(model)
    assert fused is not None
    fused.chunk = 5  # several chunks, so the chunking is exercised
    ours, counts = sequence_logps(model, batch, fused)
    (ours * torch.arange(1.0, len(ours) + 1)).sum().backward()  # a different gradient for each row
    ours_grad = checked.grad.clone()
    model.zero_grad()

    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1].float()
    targets = batch["labels"][:, 1:]
    mask = targets.ne(-100)
    token_logps = logits.log_softmax(-1).gather(-1, targets.clamp(min=0)[..., None]).squeeze(-1)
    expected = (token_logps * mask).sum(1)
    (expected * torch.arange(1.0, len(expected) + 1)).sum().backward()
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-4)
    assert counts.tolist() == mask.sum(1).tolist()
    torch.testing.assert_close(ours_grad, checked.grad, rtol=1e-4, atol=1e-5)


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
    assert isinstance(trainer.reference, PrecomputedReference) and trainer.reference.source is None
    # The live reference of full fine-tuning: the starting model, loaded afresh.
    live_chosen, live_rejected = live_reference_logps(tiny_model, trainer.train_dataset)
    torch.testing.assert_close(trainer.reference.chosen, live_chosen, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(trainer.reference.rejected, live_rejected, rtol=1e-5, atol=1e-4)
    assert len(list(Path(cache, "llm_finetuning").glob("reference-*.pt"))) == 1
    caplog.clear()
    with caplog.at_level("INFO"):
        run_dpo(*flags(tiny_model, pairs_file, tmp_path / "again", *extra))
    assert "precomputed before, read from" in caplog.text and "computed for" not in caplog.text


def live_reference_logps(model_path: str, dataset) -> tuple[torch.Tensor, torch.Tensor]:
    """Each pair's chosen and rejected log-probs under the model in `model_path`, in pair_id order."""
    reference = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    rows = sorted((dataset[k] for k in range(len(dataset))), key=lambda row: row["pair_id"])
    with torch.no_grad():
        live = sequence_logps(reference, PairCollator(0)(rows), fused_loss_for(reference))[0]
    return live[: len(rows)], live[len(rows) :]


def test_a_precomputed_reference_is_never_computed_from_a_trained_policy(tiny_model, tokenizer, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    dataset = Dataset.from_list(pair_rows(tokenizer))
    [numbered] = numbered_pairs([dataset])
    cache = tmp_path / "reference.pt"
    precomputed = PrecomputedReference(StartingModelReference(), [numbered], PairCollator(0), 2, cache, "key")
    with pytest.raises(ConfigurationError, match="gone and the policy has trained since"):
        precomputed.fill(model, None, policy_trained=True, write=True)
    # A reference that does not follow the policy (a frozen copy) may be computed at any step.
    frozen = ModelReference(AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32), "a copy")
    precomputed = PrecomputedReference(frozen, [numbered], PairCollator(0), 2, cache, "key")
    precomputed.fill(model, None, policy_trained=True, write=True)
    live_chosen, _ = live_reference_logps(tiny_model, numbered)
    torch.testing.assert_close(precomputed.chosen, live_chosen, rtol=1e-5, atol=1e-4)
    assert PrecomputedReference(frozen, [numbered], PairCollator(0), 2, cache, "key").ready  # read back
    assert not PrecomputedReference(frozen, [numbered], PairCollator(0), 2, cache, "other key").ready


def settle_in_process(rank: int, port: int, model_path: str, rows: list, caches: list, results) -> None:
    """One of two gloo processes: its own cache file (one holds the log-probs, one not), then settle()."""
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=2)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    [numbered] = numbered_pairs([Dataset.from_list(rows)])
    precomputed = PrecomputedReference(StartingModelReference(), [numbered], PairCollator(0), 2, caches[rank], "key")
    precomputed.settle(model, None, policy_trained=False, write=False)
    results[rank] = (precomputed.chosen.tolist(), precomputed.rejected.tolist())
    torch.distributed.destroy_process_group()


def test_processes_agree_to_compute_when_one_has_no_cache_file(tiny_model, tokenizer, tmp_path):
    # A rerun on other machines: one process's cache folder holds the log-probs, the other's does not. Both must
    # join the pass (the one with the file would otherwise wait alone, or skip the collective and hang the other).
    rows = pair_rows(tokenizer, 5)
    caches = [tmp_path / "zero" / "reference.pt", tmp_path / "one" / "reference.pt"]
    caches[0].parent.mkdir()
    torch.save({"key": "key", "chosen": torch.full((5,), -1.0), "rejected": torch.full((5,), -2.0)}, caches[0])
    results = mp.get_context("spawn").Manager().dict()
    arguments = (free_port(), tiny_model, rows, caches, results)
    mp.start_processes(settle_in_process, args=arguments, nprocs=2, start_method="spawn")
    live_chosen, live_rejected = live_reference_logps(tiny_model, numbered_pairs([Dataset.from_list(rows)])[0])
    for rank in (0, 1):  # both computed, and agree with the live model (not rank 0's stale file)
        torch.testing.assert_close(torch.tensor(results[rank][0]), live_chosen, rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(torch.tensor(results[rank][1]), live_rejected, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize(
    ("loss_type", "mode", "sharding", "asked", "expected"),
    [
        ("sigmoid", "full", "FSDP", False, True),  # a whole second copy on every GPU would undo the sharding
        ("sigmoid", "full", "ZeRO-3", False, True),
        ("sigmoid", "full", None, False, False),  # a frozen copy
        ("sigmoid", "lora", "ZeRO-3", False, False),  # the adapter switched off: no copy
        ("sigmoid", "lora", None, True, True),
        ("simpo", "full", "FSDP", False, False),  # no reference at all
    ],
)
def test_sharded_full_fine_tuning_precomputes_the_reference(loss_type, mode, sharding, asked, expected):
    arguments = PreferenceArguments(loss_type=loss_type, precompute_reference=asked)
    assert reference_precomputed(arguments, mode, sharding) is expected


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


def launch_dpo(script: str, model: str, data: str, output: Path, processes: int, *extra: str):
    """finetune/<script> with -m/-d/-o, on `processes` CPU processes through torchrun."""
    env = {**os.environ, "GPUS_PER_NODE": str(processes), "MASTER_PORT": str(free_port()), "CUDA_VISIBLE_DEVICES": ""}
    command = ["bash", f"finetune/{script}", "-m", model, "-d", data, "-o", str(output), *extra]
    return subprocess.run(command, cwd=Path(__file__).resolve().parent.parent, env=env, capture_output=True,
                          text=True, timeout=600)  # fmt: skip


@pytest.mark.parametrize("script", ["dpo_ds.sh", "dpo_lora_ds.sh"])
def test_zero3_two_processes_start_at_ln2_and_learn(script, tiny_model, pairs_file, tmp_path):
    # ZeRO-3 shards every weight: the reference pass and the output layer's backward must gather them.
    cache = tmp_path / "cache"
    steps = ("--max_steps", "3", "--save_strategy", "no", "--gradient_accumulation_steps", "1", "--warmup_steps", "0")
    extra = ("--per_device_train_batch_size", "2", "--model_max_length", "128", "--gradient_checkpointing", "false")
    extra += ("--learning_rate", "5e-3", "--logging_steps", "1", "--preprocessing_cache_dir", str(cache))
    output = tmp_path / "out"
    run = launch_dpo(script, tiny_model, pairs_file, output, 2, "--deepspeed", "ds_configs/zero3.json", *steps, *extra)
    assert run.returncode == 0, run.stderr[-3000:]
    history = json.loads((output / "trainer_state.json").read_text())["log_history"]
    logged = [entry for entry in history if "loss" in entry]
    assert logged[0]["loss"] == pytest.approx(LN2, abs=1e-4) and logged[0]["rewards/margins"] == 0
    assert logged[-1]["rewards/margins"] != 0
    if script == "dpo_ds.sh":  # full fine-tuning: the reference's log-probs computed over both processes, cached
        assert "Full fine-tuning under ZeRO-3 keeps no second (reference) model" in run.stderr
        [cached] = Path(cache, "llm_finetuning").glob("reference-*.pt")
        sharded = torch.load(cached, weights_only=True)
        one = run_dpo(*flags(tiny_model, pairs_file, tmp_path / "one", "--max_steps", "1", "--precompute_reference",
                             "--preprocessing_cache_dir", str(tmp_path / "one-cache")))  # fmt: skip
        for side in ("chosen", "rejected"):  # pairs in another order over two processes: compared as sets
            got, expected = sharded[side].sort()[0], getattr(one.reference, side).sort()[0]
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-4)


def test_fsdp_launcher_refuses_the_cpu_before_the_model_load(tiny_model, pairs_file, tmp_path):
    run = launch_dpo("dpo_fsdp.sh", tiny_model, pairs_file, tmp_path / "out", 1)
    assert run.returncode == 2
    errors = [line for line in run.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith("error: --fsdp needs GPUs"), run.stderr[-3000:]
    assert "Loading " not in run.stderr and not (tmp_path / "out").exists()


def test_dpo_launcher_trains_through_torchrun(tiny_model, pairs_file, tmp_path):
    output = tmp_path / "out"
    extra = ["--max_steps", "2", "--save_strategy", "no", "--gradient_accumulation_steps", "1"]
    extra += ["--model_max_length", "128", "--gradient_checkpointing", "false"]
    run = launch_dpo("dpo_lora_single_gpu.sh", tiny_model, pairs_file, output, 1, *extra)
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


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_packed_pairs_start_at_ln2_and_learn(tiny_model, pairs_file, tmp_path, caplog, mode):
    # Rows of 512 tokens: three pairs or so each (a pair here is about 155 tokens).
    extra = ("--packing", "--model_max_length", "512", "--max_steps", "4", *(("--use_lora",) if mode == "lora" else ()))
    with caplog.at_level("INFO"):
        trainer = run_dpo(*flags(tiny_model, pairs_file, tmp_path / "out", *extra))
    steps = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert steps[0]["loss"] == pytest.approx(LN2, abs=1e-4)
    assert steps[0]["rewards/chosen"] == 0 and steps[0]["rewards/rejected"] == 0
    assert steps[-1]["loss"] < steps[0]["loss"]
    assert "Packed 12 pairs" in caplog.text and "Packing check passed" in caplog.text
    assert len(trainer.train_dataset) < 12 and "sides" in trainer.train_dataset.column_names


def test_precomputed_reference_equals_the_live_one_under_packing(tiny_model, pairs_file, tmp_path):
    extra = ("--max_steps", "1", "--preprocessing_cache_dir", str(tmp_path / "cache"), "--precompute_reference")
    extra += ("--packing", "--model_max_length", "512", "--eval_data_path", pairs_file, "--eval_strategy", "steps")
    trainer = run_dpo(*flags(tiny_model, pairs_file, tmp_path / "full", *extra, "--eval_steps", "1"))
    assert first_step(trainer)["loss"] == pytest.approx(LN2, abs=1e-4)
    assert any("eval_rewards/margins" in entry for entry in trainer.state.log_history)
    dataset = trainer.train_dataset
    assert "sides" in dataset.column_names and len(dataset) < 12
    assert {"sides", "pair_ids"} <= set(trainer.eval_dataset.column_names)
    # The live reference of full fine-tuning, the starting model loaded afresh, on the same packed rows.
    reference = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    batch = trainer.data_collator([dataset[k] for k in range(3)])
    with torch.no_grad():
        live = sequence_logps(reference, batch, fused_loss_for(reference))[0]
    assert live.shape[0] == 2 * sum(len(dataset[k]["sides"]) // 2 for k in range(3))
    torch.testing.assert_close(trainer.reference.logps(None, batch, None), live, rtol=1e-5, atol=1e-4)


def test_a_hybrid_trains_packed_with_its_frozen_reference_copy_kept_apart_too(pairs_file, tmp_path, caplog):
    from scripts.tiny_families import build_family_model

    model = str(build_family_model("LFM2", tmp_path / "lfm2"))
    extra = ("--packing", "--model_max_length", "512", "--max_steps", "2")
    with caplog.at_level("INFO"):
        trainer = run_dpo(*flags(model, pairs_file, tmp_path / "out", *extra))
    # Full fine-tuning: the reference is a second model, scoring the same flat rows as the policy.
    assert trainer.data_collator.layout == "flat"
    assert "Reference model: a frozen copy" in caplog.text and "Packing check passed" in caplog.text
    assert first_step(trainer)["loss"] == pytest.approx(LN2, abs=1e-4)


def test_metrics_are_read_once_per_log_not_per_micro_batch(tiny_model, pairs_file, tmp_path):
    # The preference code's host reads (each one waits for a GPU's queue): none per micro-batch, only at log time.
    preference_code = tuple(str(REPO / "sft" / name) for name in ("preference.py", "preference_metrics.py"))
    reads = {}
    for accumulation in (1, 4):  # 2 optimizer steps (2 logs) of 1 or 4 micro-batches of one pair
        with HostReads(preference_code) as host_reads:
            output = tmp_path / f"accumulation-{accumulation}"
            batches = ("--per_device_train_batch_size", "1", "--gradient_accumulation_steps", str(accumulation))
            # The reference's log-probs precomputed (one pass at the start), then looked up per batch.
            cache = ("--precompute_reference", "--preprocessing_cache_dir", str(tmp_path / f"cache-{accumulation}"))
            run_dpo(*flags(tiny_model, pairs_file, output, "--use_lora", *batches, *cache))
        reads[accumulation] = host_reads.by_caller
    micro_batch_code = ("compute_loss", "_record", "add", "_remember", "logps")
    assert not [caller for caller in reads[1] + reads[4] if caller.split(":")[1] in micro_batch_code]
    assert reads[4] == reads[1]  # four times the micro-batches, not one read more
    assert reads[1]["preference_metrics.py:summary"] > 0  # the counter sees this code (one read set per log)
