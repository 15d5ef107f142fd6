"""merge_lora.py on adapters trained in-process by finetune.py: LoRA, LoRA with token rows, Q-LoRA."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

import merge_lora
from sft.data import load_conversations
from sft.errors import run_main
from sft.evaluation import max_abs_diff, sample_logits, tokenize_samples

EXAMPLES = "data/example_chatml.jsonl"
MODES = {
    "lora": ["--use_lora"],
    "tokens": ["--use_lora", "--train_special_tokens"],
    "qlora": ["--use_lora", "--q_lora"],
}


@pytest.fixture(scope="module")
def adapters(tiny_model: str, tmp_path_factory: pytest.TempPathFactory, run_finetune) -> dict[str, Path]:
    """One briefly trained adapter of each kind, shared by the tests of this module."""
    paths = {}
    for mode, extra in MODES.items():
        output = tmp_path_factory.mktemp("adapters") / mode
        argv = ["finetune.py", "--model_name_or_path", tiny_model, "--data_path", EXAMPLES, "--output_dir", str(output)]
        argv += ["--max_steps", "4", "--per_device_train_batch_size", "4", "--learning_rate", "1e-2"]
        argv += ["--save_strategy", "no", "--report_to", "none", "--lora_r", "8", "--lora_dropout", "0"]
        argv += ["--dataloader_pin_memory", "false", "--model_max_length", "256", *extra]
        run_finetune(*argv[1:])
        paths[mode] = output
    return paths


def run_merge(monkeypatch: pytest.MonkeyPatch, *args: str) -> None:
    """merge_lora.py in this process, user mistakes reported as the script reports them (SystemExit 2)."""
    monkeypatch.setattr(sys, "argv", ["merge_lora.py", *args])
    run_main(merge_lora.main)


@pytest.fixture(scope="module")
def samples(tokenizer):
    return tokenize_samples(tokenizer, load_conversations(EXAMPLES), 256, train_on="all")


@pytest.mark.parametrize("mode", list(MODES))
def test_merged_model_reloads_with_plain_transformers_and_matches_base_plus_adapter(
    adapters, tiny_model, samples, tmp_path, monkeypatch, capsys, mode
):
    output = tmp_path / "merged"
    output.mkdir()
    (output / "stale.safetensors").write_text("from an earlier run")  # --overwrite must not leave it behind
    run_merge(monkeypatch, "--adapter", str(adapters[mode]), "--output", str(output), "--dtype", "fp32", "--overwrite")
    printed = capsys.readouterr().out

    merged = AutoModelForCausalLM.from_pretrained(output)
    base = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    base_logits = sample_logits(base, samples)
    expected = sample_logits(PeftModel.from_pretrained(base, adapters[mode]), samples)
    got = sample_logits(merged, samples)
    difference = max_abs_diff(expected, got)
    print(f"{mode}: merged vs base + adapter, max |logit diff| = {difference:.3g}")
    assert difference <= 1e-4
    assert max_abs_diff(base_logits, got) > 1e-2  # the adapter did change the model
    assert "max |logit diff|" in printed

    assert not (output / "stale.safetensors").exists()
    assert not any(path.name.startswith(".") for path in tmp_path.iterdir())  # no staging folder left
    assert not any(isinstance(module, torch.nn.Module) and "lora" in name for name, module in merged.named_modules())
    tokenizer = AutoTokenizer.from_pretrained(output)
    assert tokenizer.chat_template == AutoTokenizer.from_pretrained(tiny_model).chat_template
    assert (
        GenerationConfig.from_pretrained(output).eos_token_id
        == GenerationConfig.from_pretrained(tiny_model).eos_token_id
    )
    info = json.loads((output / "merge_info.json").read_text())
    assert info["max_logit_diff_vs_base_plus_adapter"] <= 1e-4

    if mode == "tokens":
        # The trained rows of the chat tokens are in the merged embedding and output layer, and only those.
        ids = json.loads((adapters[mode] / "adapter_config.json").read_text())["trainable_token_indices"]
        rows = sorted(next(iter(ids.values())))
        original = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)  # `base` now holds the adapter
        for layer in ("get_input_embeddings", "get_output_embeddings"):
            before, after = getattr(original, layer)().weight, getattr(merged, layer)().weight
            changed = (before != after).any(dim=1).nonzero().flatten().tolist()
            assert changed and set(changed) <= set(rows)
    if mode == "qlora":
        as_trained = info["max_logit_diff_vs_quantized_base_plus_adapter"]
        print(f"qlora: merged (fp32 base) vs 4-bit base + adapter as trained, max |logit diff| = {as_trained:.3g}")
        assert "as trained" in printed


def test_merging_refuses_a_non_empty_output(adapters, tmp_path, monkeypatch, capsys):
    output = tmp_path / "merged"
    output.mkdir()
    (output / "keep.txt").write_text("mine")
    with pytest.raises(SystemExit) as stopped:
        run_merge(monkeypatch, "--adapter", str(adapters["lora"]), "--output", str(output))
    error = capsys.readouterr().err
    assert stopped.value.code == 2 and "is not empty" in error and "--overwrite" in error
    assert [path.name for path in output.iterdir()] == ["keep.txt"]


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("no_adapter_config", "no adapter_config.json, not a LoRA adapter folder (it holds a full model"),
        ("missing_base", "base model {tmp}/gone not found (no config.json there): pass --base_model"),
        ("bad_data", "line 1: invalid JSON"),
        ("missing_adapter", "no such adapter folder"),
    ],
)
def test_bad_input_stops_before_any_model_is_loaded(tiny_model, tmp_path, monkeypatch, capsys, case, message):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": str(tmp_path / "gone")}))
    args = ["--adapter", str(adapter), "--output", str(tmp_path / "out")]
    if case == "no_adapter_config":
        args[1] = tiny_model
    elif case == "bad_data":
        bad = tmp_path / "bad.jsonl"
        bad.write_text('{"messages": [}\n')
        args += ["--base_model", tiny_model, "--data_path", str(bad)]
    elif case == "missing_adapter":
        args[1] = str(tmp_path / "nowhere")
    with pytest.raises(SystemExit) as stopped:
        run_merge(monkeypatch, *args)
    error = capsys.readouterr().err
    assert stopped.value.code == 2 and error.startswith("error: ")
    assert message.format(tmp=tmp_path) in error
    assert not (tmp_path / "out").exists()


# As a user runs it: one `error:` line, exit code 2, no traceback.
def test_check_samples_the_chat_template_refuses_are_an_error_naming_file_and_line(
    refusing_model, tmp_path, user_error
):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": refusing_model}))
    data = tmp_path / "check.jsonl"
    lines = [[("user", "Hello"), ("assistant", "Hi")], [("user", "Say forbidden"), ("assistant", "No")]]
    data.write_text(
        "".join(json.dumps({"messages": [{"role": r, "content": c} for r, c in line]}) + "\n" for line in lines)
    )
    error = user_error(
        "merge_lora.py", "--adapter", str(adapter), "--output", str(tmp_path / "out"), "--data_path", str(data)
    )
    assert error == (
        f"error: {data}, line 2: the chat template refuses this conversation: the word forbidden is not allowed"
    )
    assert not (tmp_path / "out").exists()


def test_an_adapter_config_without_base_model_is_an_error(tmp_path, user_error):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 8}))
    error = user_error("merge_lora.py", "--adapter", str(adapter), "--output", str(tmp_path / "out"))
    assert error == (
        f"error: {adapter / 'adapter_config.json'} names no base model (base_model_name_or_path): set it to the base "
        "model's folder or hub id, or pass --base_model"
    )


# peft's LoRA variants, each from its finetune.py flags: what the adapter records about it.
VARIANTS = {
    "dora": (["--use_dora"], {"use_dora": True, "r": 8}),
    "rslora": (["--use_rslora"], {"use_rslora": True, "r": 8}),
    "gaussian": (["--init_lora_weights", "gaussian"], {"init_lora_weights": "gaussian", "r": 8}),
    # PiSSA/OLoRA changed the base while training: saved as a plain LoRA of twice the rank on the unchanged base.
    "pissa": (["--init_lora_weights", "pissa"], {"init_lora_weights": True, "r": 16}),
    "olora": (["--init_lora_weights", "olora"], {"init_lora_weights": True, "r": 16}),
    "loraplus": (["--loraplus_lr_ratio", "16"], {"r": 8}),
}


@pytest.fixture(scope="module")
def variant_runs(tiny_model, tmp_path_factory, run_finetune, samples) -> dict[str, tuple[Path, list, object]]:
    """Per variant: the adapter folder, the logits of the model as it finished training, and the Trainer."""
    runs = {}
    for variant, (flags, _) in VARIANTS.items():
        output = tmp_path_factory.mktemp("variants") / variant
        argv = ["--model_name_or_path", tiny_model, "--data_path", EXAMPLES, "--output_dir", str(output)]
        argv += ["--max_steps", "3", "--per_device_train_batch_size", "4", "--learning_rate", "1e-2", "--seed", "0"]
        argv += ["--save_strategy", "no", "--report_to", "none", "--lora_r", "8", "--lora_dropout", "0"]
        argv += ["--dataloader_pin_memory", "false", "--model_max_length", "256", "--use_lora", *flags]
        trainer = run_finetune(*argv)
        runs[variant] = (output, sample_logits(trainer.model, samples), trainer)
    return runs


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_lora_variant_is_saved_and_merges_into_the_model_as_trained(
    variant_runs, tiny_model, samples, tmp_path, monkeypatch, variant
):
    adapter, trained, _ = variant_runs[variant]
    config = json.loads((adapter / "adapter_config.json").read_text())
    for key, value in VARIANTS[variant][1].items():
        assert config[key] == value, key
    run_merge(monkeypatch, "--adapter", str(adapter), "--output", str(tmp_path / "merged"), "--dtype", "fp32")

    merged = sample_logits(AutoModelForCausalLM.from_pretrained(tmp_path / "merged"), samples)
    base = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    base_logits = sample_logits(base, samples)
    with_adapter = sample_logits(PeftModel.from_pretrained(base, adapter), samples)
    assert max_abs_diff(with_adapter, merged) <= 1e-4  # merged = unchanged base + adapter
    assert max_abs_diff(trained, merged) <= 1e-4  # = the model training ended with (PiSSA/OLoRA: after conversion)
    assert max_abs_diff(base_logits, merged) > 1e-2  # and training changed it


def test_loraplus_gives_the_b_matrices_ratio_times_the_learning_rate(variant_runs):
    trainer = variant_runs["loraplus"][2]
    names = {id(parameter): name for name, parameter in trainer.model.named_parameters()}
    rates = {}
    for group in trainer.optimizer.param_groups:
        for parameter in group["params"]:
            kind = "B" if "lora_B" in names[id(parameter)] else "A" if "lora_A" in names[id(parameter)] else "other"
            rates.setdefault(kind, set()).add(group["initial_lr"])
    assert rates["A"] == {1e-2} and [rate / 1e-2 for rate in rates["B"]] == [pytest.approx(16)]
    # Without the flag, one rate for all.
    rates = {group["initial_lr"] for group in variant_runs["dora"][2].optimizer.param_groups if group["params"]}
    assert rates == {1e-2}


def test_the_self_check_reads_the_recorded_sources_with_spaces(tmp_path):
    from merge_lora import FALLBACK_CHECK_CONVERSATIONS, MergeArguments, check_conversations

    spaced = tmp_path / "my data.jsonl"
    spaced.write_text(Path("data/example_chatml.jsonl").read_text())
    args = MergeArguments(adapter=str(tmp_path), output=str(tmp_path / "merged"), num_check_samples=2)
    conversations = check_conversations(args, {"data_path": [str(spaced)]})
    assert conversations != FALLBACK_CHECK_CONVERSATIONS[:2] and len(conversations) == 2
