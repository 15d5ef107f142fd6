"""finetune.py end to end on the tiny model: every mode trains, saves a loadable output and resumes."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from sft.args import parse_arguments
from sft.errors import UserError

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = "data/example_chatml.jsonl"


def losses(trainer) -> list[float]:
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


def assert_loss_falls(trainer) -> None:
    values = losses(trainer)
    assert len(values) >= 4
    assert sum(values[-2:]) / 2 < 0.8 * sum(values[:2]) / 2, values


def assert_tokenizer_saved(output: Path, model_dir: str) -> None:
    saved = AutoTokenizer.from_pretrained(output)
    original = AutoTokenizer.from_pretrained(model_dir)
    assert saved.chat_template == original.chat_template
    assert saved.get_vocab() == original.get_vocab()


def test_full_fine_tune_saves_a_model_that_reloads(tiny_model, tmp_path, run_finetune, common_args):
    output = tmp_path / "full"
    trainer = run_finetune(*common_args(tiny_model, output))
    assert_loss_falls(trainer)
    reloaded = AutoModelForCausalLM.from_pretrained(output)
    trained = trainer.model.state_dict()
    for name, tensor in reloaded.state_dict().items():
        torch.testing.assert_close(tensor, trained[name])
    assert_tokenizer_saved(output, tiny_model)
    info = json.loads((output / "finetune_run.json").read_text())
    assert info["mode"] == "full" and info["global_step"] == 8
    assert not (output / ".final.tmp").exists()


def test_lora_saves_an_adapter_that_reloads_with_its_tokenizer(tiny_model, tmp_path, run_finetune, common_args):
    from peft import AutoPeftModelForCausalLM

    output = tmp_path / "lora"
    trainer = run_finetune(*common_args(tiny_model, output), "--use_lora")
    assert_loss_falls(trainer)
    assert not (output / "model.safetensors").exists()
    config = json.loads((output / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(Path(tiny_model).resolve())
    assert {name.rsplit(".", 1)[-1] for name in config["target_modules"]} == {
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    }
    reloaded = AutoPeftModelForCausalLM.from_pretrained(output).eval()
    trainer.model.eval()
    batch = AutoTokenizer.from_pretrained(output)("Hello world", return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**batch).logits, trainer.model(**batch).logits)
    assert_tokenizer_saved(output, tiny_model)


def test_lora_can_train_the_chat_tokens_rows(tiny_model, tmp_path, run_finetune, common_args):
    output = tmp_path / "lora-tokens"
    run_finetune(*common_args(tiny_model, output), "--use_lora", "--train_special_tokens")
    weights = load_file(output / "adapter_model.safetensors")
    deltas = {name: tensor for name, tensor in weights.items() if "trainable_tokens" in name}
    assert {name.split(".")[-2] if "lm_head" in name else "embed" for name in deltas} >= {"embed"}
    assert any("lm_head" in name for name in deltas)  # the tiny model, like Qwen2-7B, has an untied output layer
    assert all(tensor.abs().sum() > 0 for tensor in deltas.values())
    indices = json.loads((output / "adapter_config.json").read_text())["trainable_token_indices"]
    tokenizer = AutoTokenizer.from_pretrained(output)
    im_start, im_end = tokenizer.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
    assert all({im_start, im_end} <= set(ids) for ids in indices.values())


@pytest.mark.parametrize(("bits", "layer_class"), [(4, "Linear4bit"), (8, "Linear8bitLt")])
def test_qlora_trains_on_bitsandbytes_layers(tiny_model, tmp_path, run_finetune, common_args, bits, layer_class):
    import bitsandbytes as bnb

    output = tmp_path / f"qlora{bits}"
    trainer = run_finetune(*common_args(tiny_model, output), "--use_lora", "--q_lora", "--bits", str(bits))
    quantized = [module for module in trainer.model.modules() if isinstance(module, getattr(bnb.nn, layer_class))]
    assert len(quantized) == 2 * 7  # every linear layer of both decoder layers; lm_head stays unquantised
    assert_loss_falls(trainer)
    assert (output / "adapter_model.safetensors").is_file()
    assert json.loads((output / "finetune_run.json").read_text())["mode"] == f"qlora-{bits}bit"


@pytest.mark.parametrize("mode", ["full", "lora", "qlora"])
def test_rerun_resumes_from_the_last_checkpoint_onto_the_same_weights(
    tiny_model, tmp_path, run_finetune, common_args, mode, caplog
):
    extra = {"full": [], "lora": ["--use_lora"], "qlora": ["--use_lora", "--q_lora"]}[mode]
    weights_file = "model.safetensors" if mode == "full" else "adapter_model.safetensors"

    straight = tmp_path / "straight"
    run_finetune(*common_args(tiny_model, straight, steps=6), *extra)

    resumed = tmp_path / "resumed"
    args = common_args(tiny_model, resumed, steps=6) + ["--save_strategy", "steps", "--save_steps", "3"]
    # A run interrupted between step 3 and 6: what it leaves is its checkpoint at step 3.
    run_finetune(*args, *extra)
    shutil.rmtree(resumed / "checkpoint-6")
    (resumed / weights_file).unlink()
    (resumed / "finetune_run.json").unlink()  # written last: a run stopped before the end has none

    caplog.set_level("INFO", logger="finetune")
    second = run_finetune(*args, *extra)
    assert "Resuming from" in caplog.text and "checkpoint-3" in caplog.text
    assert second.state.global_step == 6
    assert [entry["step"] for entry in second.state.log_history if "loss" in entry] == [1, 2, 3, 4, 5, 6]

    expected, got = load_file(straight / weights_file), load_file(resumed / weights_file)
    assert expected.keys() == got.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-6)


def test_start_over_ignores_checkpoints(tiny_model, tmp_path, run_finetune, common_args, caplog):
    output = tmp_path / "out"
    args = common_args(tiny_model, output, steps=2) + ["--save_strategy", "steps", "--save_steps", "2", "--use_lora"]
    run_finetune(*args)
    caplog.set_level("INFO", logger="finetune")
    trainer = run_finetune(*args, "--max_steps", "3", "--start_over")
    assert "Resuming" not in caplog.text
    assert [entry["step"] for entry in trainer.state.log_history if "loss" in entry] == [1, 2, 3]


def test_config_file_gives_the_same_arguments(tiny_model, tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text(
        f"model_name_or_path: {tiny_model}\ndata_path: {EXAMPLES}\noutput_dir: {tmp_path / 'out'}\n"
        "use_lora: true\nmax_steps: 1\nreport_to: none\nsave_strategy: 'no'\nlora_r: 4\n"
    )
    _, data_args, training_args, lora_args = parse_arguments([str(config)])
    assert data_args.data_path == [EXAMPLES] and training_args.use_lora and lora_args.lora_r == 4
    # Flags after the file override it.
    _, _, training_args, lora_args = parse_arguments([str(config), "--lora_r", "16", "--max_steps", "3"])
    assert lora_args.lora_r == 16 and training_args.max_steps == 3 and training_args.use_lora


def test_eval_data_and_group_by_length(tiny_model, tmp_path, run_finetune, common_args):
    trainer = run_finetune(
        *common_args(tiny_model, tmp_path / "out", steps=2),
        "--use_lora",
        "--eval_data_path",
        "data/example_qwen.json",
        "--eval_strategy",
        "steps",
        "--eval_steps",
        "2",
        "--group_by_length",
    )
    assert trainer.args.train_sampling_strategy == "group_by_length"
    assert any("eval_loss" in entry for entry in trainer.state.log_history)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--data_path", "missing.jsonl"], "missing.jsonl: no such file"),
        (["--data_path", "{bad}"], "line 1: invalid JSON"),
        (["--data_path", "{alpaca}"], "field 'instruction': missing in an alpaca sample (found 'instrution'"),
        (["--eval_data_path", "{bad}"], "invalid JSON"),
        (["--q_lora"], "--q_lora trains LoRA adapters on a quantised model: add --use_lora"),
        (["--use_lora", "--q_lora", "--bits", "3"], "--bits must be 4 or 8"),
        (["--bf16", "--fp16"], "--bf16 and --fp16 exclude each other"),
    ],
)
def test_bad_input_stops_before_the_model_is_loaded(tmp_path, run_finetune, args, message):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [}\n')
    alpaca = tmp_path / "alpaca.json"
    alpaca.write_text('[{"instrution": "q", "output": "a"}]')
    args = [arg.format(bad=bad, alpaca=alpaca) for arg in args]
    # The model path does not exist: reaching the model load would fail with a different error.
    with pytest.raises(UserError) as stopped:
        run_finetune(
            "--model_name_or_path",
            str(tmp_path / "no-model"),
            "--data_path",
            EXAMPLES,
            "--output_dir",
            str(tmp_path / "out"),
            "--report_to",
            "none",
            *args,
        )
    assert message in str(stopped.value)
    assert not (tmp_path / "out").exists()


def run_script(*command: str) -> subprocess.CompletedProcess:
    """A script as a user runs it, offline: a hub id that does not exist fails at once instead of waiting."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, *command], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


def assert_user_error(done: subprocess.CompletedProcess, message: str) -> None:
    """One `error:` line saying `message`, exit code 2, no traceback."""
    assert done.returncode == 2, done.stderr[-3000:]
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    assert any(line.startswith("error: ") and message in line for line in done.stderr.splitlines()), done.stderr


@pytest.mark.parametrize("script", ["finetune.py", "sft/inspect.py"])
def test_a_typo_in_the_model_path_is_one_error_line(tmp_path, script):
    command = [script] if script.endswith("finetune.py") else ["-m", "sft.inspect"]
    for model in (str(tmp_path / "no-such-model"), "no-such-owner/no-such-model"):
        done = run_script(*command, "--model_name_or_path", model, "--data_path", EXAMPLES, "--output_dir",
                          str(tmp_path / "out"), "--report_to", "none")  # fmt: skip
        assert_user_error(done, f"--model_name_or_path {model}: cannot load a tokenizer from it")


def test_drop_long_samples_that_leaves_nothing_is_one_error_line(tiny_model, tmp_path):
    flags = ["--model_name_or_path", tiny_model, "--data_path", EXAMPLES, "--output_dir", str(tmp_path / "out")]
    done = run_script("finetune.py", *flags, "--report_to", "none", "--model_max_length", "40", "--drop_long_samples")
    assert_user_error(done, "no train sample is left to train on")


def test_a_corrupt_run_record_in_the_output_dir_is_one_error_line(tiny_model, tmp_path):
    output = tmp_path / "out"
    output.mkdir()
    (output / "finetune_run.json").write_text('{"mode": "lo')
    done = run_script("finetune.py", "--model_name_or_path", tiny_model, "--data_path", EXAMPLES, "--output_dir",
                      str(output), "--report_to", "none")  # fmt: skip
    assert_user_error(done, f"{output / 'finetune_run.json'}: not a valid run record")


@pytest.mark.parametrize("missing", ["--model_name_or_path", "--data_path"])
def test_a_missing_model_or_data_is_an_error_not_a_stand_in(tmp_path, user_error, missing):
    flags = {"--model_name_or_path": str(tmp_path / "no-model"), "--data_path": EXAMPLES}
    del flags[missing]
    args = [item for pair in flags.items() for item in pair]
    line = user_error("finetune.py", *args, "--output_dir", str(tmp_path / "out"), "--report_to", "none")
    assert line.startswith(f"error: {missing} is required")


def test_lora_weight_path_continues_training_the_given_adapter(chat_adapter, tiny_model, tmp_path, run_finetune,
                                                               common_args):  # fmt: skip
    output = tmp_path / "continued"
    # A learning rate of 0: what is saved is what training started from.
    run_finetune(*common_args(tiny_model, output, steps=1), "--use_lora", "--lora_weight_path", chat_adapter,
                 "--learning_rate", "0", "--lora_r", "4")  # fmt: skip
    given, saved = (
        load_file(Path(chat_adapter, "adapter_model.safetensors")),
        load_file(output / "adapter_model.safetensors"),
    )
    assert given.keys() == saved.keys()
    for name in given:
        torch.testing.assert_close(saved[name], given[name], rtol=0, atol=0)
    assert json.loads((output / "adapter_config.json").read_text())["r"] == 8  # the adapter's, not --lora_r's


def test_lora_weight_path_without_an_adapter_is_refused(tiny_model, tmp_path, run_finetune, common_args):
    with pytest.raises(UserError, match="--lora_weight_path .*: no LoRA adapter there"):
        run_finetune(*common_args(tiny_model, tmp_path / "out"), "--use_lora", "--lora_weight_path", str(tmp_path))


def test_the_saved_tokenizer_keeps_its_own_model_max_length(tiny_model, tmp_path, run_finetune, common_args):
    output = tmp_path / "out"
    run_finetune(*common_args(tiny_model, output, steps=1), "--use_lora", "--model_max_length", "200")
    own = AutoTokenizer.from_pretrained(tiny_model).model_max_length
    assert own != 200
    assert AutoTokenizer.from_pretrained(output).model_max_length == own


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--use_dora"], "--use_dora is a LoRA option: add --use_lora"),
        (["--use_lora", "--init_lora_weights", "eva"], "--init_lora_weights eva: expected one of true, gaussian,"),
        (["--use_lora", "--q_lora", "--init_lora_weights", "pissa"], "changes the base weights: not with --q_lora"),
        (["--use_lora", "--use_dora", "--init_lora_weights", "olora"], "peft cannot convert it to a plain adapter"),
        (["--use_lora", "--loraplus_lr_ratio", "0"], "--loraplus_lr_ratio must be above 0, got 0.0"),
    ],
)
def test_lora_variant_mistakes_stop_before_the_model_load(tmp_path, run_finetune, flags, message):
    argv = ["--model_name_or_path", str(tmp_path / "no-model"), "--data_path", "data/example_chatml.jsonl"]
    with pytest.raises(UserError) as stopped:
        run_finetune(*argv, "--output_dir", str(tmp_path / "out"), "--report_to", "none", *flags)
    assert message in str(stopped.value)


def test_report_to_tensorboard_writes_the_logged_losses_as_event_files(tiny_model, tmp_path, run_finetune, common_args):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    output = tmp_path / "out"
    trainer = run_finetune(*common_args(tiny_model, output, steps=3), "--use_lora", "--report_to", "tensorboard")
    event_files = sorted((output / "runs").glob("*/events.out.tfevents.*"))
    assert len(event_files) == 1, sorted(output.rglob("*"))
    events = EventAccumulator(str(event_files[0].parent))
    events.Reload()
    logged = [(entry["step"], entry["loss"]) for entry in trainer.state.log_history if "loss" in entry]
    written = [(event.step, event.value) for event in events.Scalars("train/loss")]
    assert [step for step, _ in written] == [1, 2, 3] == [step for step, _ in logged]
    assert [value for _, value in written] == pytest.approx([value for _, value in logged], rel=1e-6)


def test_neftune_noise_reaches_the_embeddings_under_lora(tiny_model, tmp_path, run_finetune, common_args):
    def first_loss(*flags: str) -> tuple:
        trainer = run_finetune(*common_args(tiny_model, tmp_path / str(len(flags)), steps=1), "--use_lora", *flags)
        return trainer, next(entry["loss"] for entry in trainer.state.log_history if "loss" in entry)

    _, plain = first_loss()
    trainer, noisy = first_loss("--neftune_noise_alpha", "50")
    # Same seed, data and weights: only noise on the input embeddings (through the LoRA wrapper) changes the loss.
    assert trainer.args.neftune_noise_alpha == 50
    assert abs(noisy - plain) > 1e-3
    # After training the Trainer took its hook off again: the saved model is not noisy.
    embeddings = trainer.model.get_input_embeddings()
    assert not hasattr(embeddings, "neftune_noise_alpha") and not embeddings._forward_hooks


@pytest.mark.parametrize("template", ["RESPONSE_TEMPLATE", "GENERATION_TEMPLATE"])
def test_chat_template_file_is_trained_on_saved_and_labelled_as_a_models_own(
    tiny_model, tmp_path, run_finetune, common_args, template
):
    import chat_templates

    from sft.chat import load_for_chat
    from sft.data import load_conversations, tokenize_conversations
    from sft.modeling import load_tokenizer

    text = getattr(chat_templates, template)
    template_file = tmp_path / "template.jinja"
    template_file.write_text(text)
    output = tmp_path / "out"
    trainer = run_finetune(
        *common_args(tiny_model, output, steps=1), "--use_lora", "--chat_template", str(template_file)
    )

    # The same samples and labels as for a model whose own template this is.
    own = load_tokenizer(tiny_model, model_max_length=256)
    own.chat_template = text
    expected, _ = tokenize_conversations(load_conversations("data/example_chatml.jsonl"), own, 256)
    assert trainer.train_dataset["input_ids"] == expected["input_ids"]
    assert trainer.train_dataset["labels"] == expected["labels"]
    # Saved with the adapter, and what the demos load.
    assert (output / "chat_template.jinja").read_text() == text
    _, tokenizer = load_for_chat(str(output))
    assert tokenizer.chat_template == text


def test_chat_template_chatml_and_its_mistakes(tiny_model, tmp_path, run_finetune, common_args):
    from sft.data import CHATML_TEMPLATE
    from sft.modeling import read_chat_template

    assert read_chat_template("chatml") == CHATML_TEMPLATE
    broken = tmp_path / "broken.jinja"
    broken.write_text("{% for m in messages %}\n{{ m.content }\n{% endfor %}")
    for value, message in [
        (str(tmp_path / "nowhere.jinja"), "no such file, nor a built-in template (chatml)"),
        (str(broken), f"--chat_template {broken}, line 2: not a valid Jinja template"),
    ]:
        with pytest.raises(UserError) as stopped:
            run_finetune(*common_args(str(tmp_path / "no-model"), tmp_path / "out"), "--chat_template", value)
        assert message in str(stopped.value)
        assert not (tmp_path / "out").exists()
