"""run_gptq.py on a briefly fine-tuned tiny model: 4- and 8-bit GPTQ outputs that load with plain transformers."""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

import run_gptq
from scripts.make_tiny_model import ENGLISH_OBJECTS, ENGLISH_SUBJECTS, ENGLISH_VERBS
from sft.chat import GenerationSettings, load_for_chat, reply, stream_reply
from sft.data import load_conversations
from sft.errors import run_main
from sft.evaluation import perplexity, tokenize_samples

pytestmark = pytest.mark.usefixtures("eager_gptq_kernels")


def write_data(folder: Path) -> tuple[Path, Path]:
    """A learnable pattern (question about a subject -> a sentence about it): 48 training and 8 held-out samples."""
    rng = random.Random(0)
    rows = []
    for _ in range(56):
        subject, verb, thing = rng.choice(ENGLISH_SUBJECTS), rng.choice(ENGLISH_VERBS), rng.choice(ENGLISH_OBJECTS)
        messages = [
            {"role": "user", "content": f"What does {subject} do?"},
            {"role": "assistant", "content": f"{subject.capitalize()} {verb} {thing}."},
        ]
        rows.append(json.dumps({"messages": messages}))
    train, held_out = folder / "train.jsonl", folder / "held_out.jsonl"
    train.write_text("\n".join(rows[:48]) + "\n")
    held_out.write_text("\n".join(rows[48:]) + "\n")
    return train, held_out


@pytest.fixture(scope="module")
def fine_tuned(tiny_model: str, tmp_path_factory: pytest.TempPathFactory, run_finetune) -> dict[str, Path]:
    """A full fine-tune of the tiny model on the pattern (briefly), and its data."""
    folder = tmp_path_factory.mktemp("gptq")
    train, held_out = write_data(folder)
    argv = ["finetune.py", "--model_name_or_path", tiny_model, "--data_path", str(train)]
    argv += ["--output_dir", str(folder / "model"), "--max_steps", "24", "--per_device_train_batch_size", "8"]
    argv += ["--learning_rate", "3e-3", "--save_strategy", "no", "--report_to", "none", "--seed", "0"]
    argv += ["--dataloader_pin_memory", "false", "--model_max_length", "128"]
    run_finetune(*argv[1:])
    return {"model": folder / "model", "train": train, "held_out": held_out, "folder": folder}


def run(monkeypatch: pytest.MonkeyPatch, *args: str) -> None:
    """run_gptq.py in this process, user mistakes reported as the script reports them (SystemExit 2)."""
    monkeypatch.setattr(sys, "argv", ["run_gptq.py", *args])
    run_main(run_gptq.main)


@pytest.fixture(scope="module")
def quantized(fine_tuned) -> dict[int, Path]:
    paths = {}
    for bits in (4, 8):
        paths[bits] = fine_tuned["folder"] / f"gptq-int{bits}"
        args = ["--model_name_or_path", str(fine_tuned["model"]), "--data_path", str(fine_tuned["train"])]
        args += ["--eval_data_path", str(fine_tuned["held_out"]), "--out_path", str(paths[bits])]
        args += ["--bits", str(bits), "--group_size", "32", "--num_samples", "32", "--max_len", "128"]
        with pytest.MonkeyPatch.context() as patch:
            run(patch, *args)
    return paths


@pytest.mark.parametrize("bits", [4, 8])
def test_gptq_output_reloads_with_plain_transformers_and_generates(quantized, fine_tuned, bits, assert_streamed):
    from gptqmodel.nn_modules.qlinear import BaseQuantLinear

    model = AutoModelForCausalLM.from_pretrained(quantized[bits])
    tokenizer = AutoTokenizer.from_pretrained(quantized[bits])
    assert model.config.quantization_config.bits == bits
    layers = model.model.layers
    targets = [module for layer in layers for module in layer.modules() if module is not layer]
    gptq_layers = [module for module in targets if isinstance(module, BaseQuantLinear)]
    assert len(gptq_layers) == 7 * len(layers)  # q, k, v, o, gate, up, down of every decoder layer
    assert all(layer.bits == bits and layer.group_size == 32 for layer in gptq_layers)
    assert not [module for module in targets if type(module) is torch.nn.Linear]  # nothing left unquantised
    assert type(model.lm_head) is torch.nn.Linear

    original_tokenizer = AutoTokenizer.from_pretrained(fine_tuned["model"])
    assert tokenizer.chat_template == original_tokenizer.chat_template
    assert GenerationConfig.from_pretrained(quantized[bits]).to_dict() == (
        GenerationConfig.from_pretrained(fine_tuned["model"]).to_dict()
    )
    question = [{"role": "user", "content": "What does the cat do?"}]
    # It generates: 12 new tokens when the end of turn is held off (whether a tiny quantised model's greedy answer
    # happens to be empty is no concern of ours).
    inputs = tokenizer.apply_chat_template(question, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    generated = model.generate(**inputs, min_new_tokens=12, max_new_tokens=12, do_sample=False)
    assert generated.shape[1] == inputs["input_ids"].shape[1] + 12
    answer = reply(model, tokenizer, question, max_new_tokens=12)
    print(f"{bits}-bit answer: {answer!r}")

    # What scripts/ask.py and the chat demo use loads it quantised too, and answers the same.
    chat_model, chat_tokenizer = load_for_chat(str(quantized[bits]))
    assert isinstance(chat_model.model.layers[0].self_attn.q_proj, BaseQuantLinear)
    assert reply(chat_model, chat_tokenizer, question, max_new_tokens=12) == answer
    # The demos stream from it (generation in a thread, text handed over piece by piece): same answer.
    greedy = GenerationSettings(max_new_tokens=12, temperature=0)
    pieces = list(stream_reply(chat_model, chat_tokenizer, question, greedy))
    assert_streamed(pieces)
    assert "".join(pieces).strip() == answer


def test_4bit_perplexity_on_held_out_data_stays_close_to_the_original(quantized, fine_tuned):
    tokenizer = AutoTokenizer.from_pretrained(fine_tuned["model"])
    held_out = tokenize_samples(tokenizer, load_conversations(fine_tuned["held_out"]), 128)
    original = perplexity(AutoModelForCausalLM.from_pretrained(fine_tuned["model"]), held_out)
    gptq = perplexity(AutoModelForCausalLM.from_pretrained(quantized[4]), held_out)
    print(f"held-out perplexity: original {original:.4f}, GPTQ 4-bit {gptq:.4f} (x{gptq / original:.4f})")
    assert original < 20  # the fine-tune did learn the pattern: the comparison means something
    assert gptq <= 1.10 * original
    report = json.loads((quantized[4] / "gptq_run.json").read_text())
    assert report["perplexity_original"] == pytest.approx(original, rel=1e-4)
    assert report["perplexity_quantized"] == pytest.approx(gptq, rel=1e-4)
    assert report["weights_bytes_quantized"] < report["weights_bytes_original"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--bits", "3"], "--bits must be 4 or 8, got 3"),
        (
            ["--group_size", "48"],
            "--group_size 48 does not divide the 64 in-features of model.layers.0.self_attn.q_proj",
        ),
        (["--data_path", "{empty}"], "empty.jsonl: the file is empty"),
        (["--data_path", "{bad}"], "bad.jsonl, line 1: invalid JSON"),
        (["--out_path", "{full}"], "is not empty: choose another folder or pass --overwrite"),
        (["--model_name_or_path", "{adapter}"], "no config.json, not a model folder (an adapter: merge it first"),
        (["--out_path", "{model}", "--overwrite"], "is also an input of this run: write the output elsewhere"),
    ],
)
def test_bad_input_stops_before_the_model_is_loaded(tiny_model, tmp_path, monkeypatch, capsys, args, message):
    (tmp_path / "empty.jsonl").write_text("\n")
    (tmp_path / "bad.jsonl").write_text('{"messages": [}\n')
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "adapter_config.json").write_text("{}")
    places = {name: str(tmp_path / name) for name in ("full", "adapter")}
    places |= {"empty": str(tmp_path / "empty.jsonl"), "bad": str(tmp_path / "bad.jsonl"), "model": tiny_model}
    defaults = ["--model_name_or_path", tiny_model, "--data_path", "data/example_chatml.jsonl"]
    defaults += ["--out_path", str(tmp_path / "out"), "--group_size", "32"]
    with pytest.raises(SystemExit) as stopped:
        run(monkeypatch, *defaults, *[arg.format(**places) for arg in args])
    error = capsys.readouterr().err
    assert stopped.value.code == 2 and error.startswith("error: ")
    assert message in error
    assert not (tmp_path / "out").exists()
    assert (tmp_path / "full" / "keep.txt").read_text() == "mine"


# As a user runs it: one `error:` line, exit code 2, no traceback.
def test_held_out_samples_the_chat_template_refuses_are_an_error_naming_file_and_line(
    refusing_model, tmp_path, user_error
):
    data, held_out = tmp_path / "train.jsonl", tmp_path / "held_out.jsonl"
    sample = {"messages": [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hi"}]}
    refused = {"messages": [{"role": "user", "content": "Say forbidden"}, {"role": "assistant", "content": "No"}]}
    data.write_text(json.dumps(sample) + "\n" + json.dumps(sample) + "\n")
    held_out.write_text(json.dumps(sample) + "\n" + json.dumps(refused) + "\n")
    args = ["--model_name_or_path", refusing_model, "--data_path", str(data), "--eval_data_path", str(held_out)]
    error = user_error("run_gptq.py", *args, "--out_path", str(tmp_path / "out"), "--group_size", "32")
    assert error == (
        f"error: {held_out}, line 2: the chat template refuses this conversation: the word forbidden is not allowed"
    )
    assert not (tmp_path / "out").exists()
