"""Qwen-1 folders run natively: the tokenizer against tiktoken, the converted model against Qwen-1's equations,
and every script on a tiny Qwen-1-format folder (the `qwen1_folder` fixture: real vocabulary, random weights,
Python files that raise if anything runs them)."""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import shutil
import subprocess
import sys
import unicodedata
from dataclasses import replace
from pathlib import Path

import pytest
import tiktoken
import torch
from peft import AutoPeftModelForCausalLM
from ports import free_port
from safetensors.torch import load_file, save_file
from tiktoken.load import load_tiktoken_bpe
from tokenizers import Tokenizer
from transformers import AutoModelForCausalLM, AutoTokenizer

import cli_demo
import merge_lora
import run_gptq
from sft.chat import GenerationSettings, conversation, load_for_chat, stream_reply
from sft.errors import run_main
from sft.modeling import load_model, load_tokenizer
from sft.outputs import RUN_INFO_FILE
from sft.qwen1 import local_qwen1_folder, native_folder, native_lora_targets, resolve_model_path
from sft.qwen1 import main as qwen1_main
from sft.qwen1_convert import QWEN1_PATTERN, QWEN1_SPECIAL_TOKENS, Qwen1Error, convert_qwen1

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = "data/example_chatml.jsonl"
TEXTS = [
    "你好，世界！今天北京的天气怎么样？我想去长城。",
    "The quick brown fox jumps over the lazy dog. It's 2023-09-25, isn't it? 1234567 apples",
    'def add(a: int, b: int) -> int:\n    """Sum."""\n    return a + b  # 加法\n\n\n\tif x:\r\n  pass',
    "emoji 😀👍🏽🇨🇳👨‍👩‍👧 and symbols ∑∫√ ©®™ ｆｕｌｌｗｉｄｔｈ ﬁ, composed \u00e9 and decomposed e\u0301 n\u0303",
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n你好<|im_end|>\n<|endoftext|>"
    "<|extra_0|><|extra_204|>",
    "   leading spaces, trailing spaces   \n\n\n  ",
]


@pytest.fixture(scope="module")
def native(qwen1_folder: str) -> str:
    return resolve_model_path(qwen1_folder)


def tiktoken_encoding(tiktoken_file: str | Path) -> tiktoken.Encoding:
    """Qwen-1's tokenizer as tiktoken itself runs it: the file's ranks, Qwen-1's pattern and special tokens."""
    special = {token: 151643 + index for index, token in enumerate(QWEN1_SPECIAL_TOKENS)}
    ranks = load_tiktoken_bpe(str(tiktoken_file))
    return tiktoken.Encoding("qwen", pat_str=QWEN1_PATTERN, mergeable_ranks=ranks, special_tokens=special)


def test_tokenizer_ids_equal_tiktoken(qwen1_folder, native):
    encoding = tiktoken_encoding(Path(qwen1_folder) / "qwen.tiktoken")
    # The converted tokenizer.json itself: the same ids on any text.
    backend = Tokenizer.from_file(str(Path(native) / "tokenizer.json"))
    for text in TEXTS:
        assert backend.encode(text, add_special_tokens=False).ids == encoding.encode(text, allowed_special="all")
    # As transformers loads it: its Qwen2Tokenizer adds Qwen2's NFC normalisation, so text is compared in NFC.
    tokenizer = load_tokenizer(native, trust_remote_code=True)  # the folder's own tokenizer code never runs
    for text in map(functools.partial(unicodedata.normalize, "NFC"), TEXTS):
        ids = tokenizer.encode(text, add_special_tokens=False)
        assert ids == encoding.encode(text, allowed_special="all"), text
        assert tokenizer.decode(ids) == text
    assert len(tokenizer) == 151851
    assert tokenizer.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>"]) == [151643, 151644, 151645]
    assert tokenizer.convert_tokens_to_ids(["<|extra_0|>", "<|extra_204|>"]) == [151646, 151850]
    assert (tokenizer.eos_token, tokenizer.pad_token) == ("<|im_end|>", "<|endoftext|>")
    # A conversation gets the ids Qwen-1 builds turn by turn: <|im_start|>, role, "\n", content, <|im_end|>, "\n".
    turns = [("user", " 你好, what is 1+1?\n"), ("assistant", "2\n\n"), ("user", "def f():\n  pass")]
    messages = [{"role": role, "content": content} for role, content in turns]
    qwen1_ids = []
    for role, content in [("system", "You are a helpful assistant."), *turns, ("assistant", None)]:
        qwen1_ids += [151644] + encoding.encode(role) + encoding.encode("\n")
        if content is not None:
            qwen1_ids += encoding.encode(content) + [151645] + encoding.encode("\n")
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert tokenizer.encode(rendered, add_special_tokens=False) == qwen1_ids
    # Qwen-1's chat format: ChatML with its default system prompt.
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "你好"}], tokenize=False, add_generation_prompt=True
    )
    assert prompt == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n你好<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def qwen1_reference_logits(weights: dict[str, torch.Tensor], config: dict, input_ids: list[int]) -> torch.Tensor:
    """Qwen-1's forward pass written from its equations, on its own fused weights (fp32, one sequence)."""
    w = {name: tensor.float() for name, tensor in weights.items()}
    hidden, heads, head_dim = config["hidden_size"], config["num_attention_heads"], config["kv_channels"]
    length = len(input_ids)

    def rms_norm(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + config["layer_norm_epsilon"]) * weight

    inv_freq = 1.0 / config["rotary_emb_base"] ** (torch.arange(0, head_dim, 2).float() / head_dim)
    angles = torch.outer(torch.arange(length).float(), inv_freq)
    cos, sin = torch.cat([angles, angles], -1).cos(), torch.cat([angles, angles], -1).sin()

    def rotary(x: torch.Tensor) -> torch.Tensor:  # x: (length, heads, head_dim); rotate_half over the two halves
        first, second = x[..., : head_dim // 2], x[..., head_dim // 2 :]
        return x * cos[:, None] + torch.cat([-second, first], -1) * sin[:, None]

    causal = torch.full((length, length), float("-inf")).triu(1)
    x = w["transformer.wte.weight"][input_ids]
    for layer in range(config["num_hidden_layers"]):
        p = f"transformer.h.{layer}."
        h = rms_norm(x, w[p + "ln_1.weight"])
        qkv = h @ w[p + "attn.c_attn.weight"].T + w[p + "attn.c_attn.bias"]
        q, k, v = (part.reshape(length, heads, head_dim) for part in qkv.split(hidden, -1))
        q, k = rotary(q), rotary(k)
        scores = torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(head_dim) + causal
        attended = torch.einsum("hqk,khd->qhd", scores.softmax(-1), v).reshape(length, hidden)
        x = x + attended @ w[p + "attn.c_proj.weight"].T
        h = rms_norm(x, w[p + "ln_2.weight"])
        a1, a2 = h @ w[p + "mlp.w1.weight"].T, h @ w[p + "mlp.w2.weight"].T
        x = x + (a1 * torch.nn.functional.silu(a2)) @ w[p + "mlp.c_proj.weight"].T
    return rms_norm(x, w["transformer.ln_f.weight"]) @ w["lm_head.weight"].T


def test_converted_model_logits_equal_qwen1_equations(qwen1_folder, native):
    folder = Path(qwen1_folder)
    config = json.loads((folder / "config.json").read_text())
    weights = {}
    for shard in sorted(folder.glob("model-*.safetensors")):
        weights.update(load_file(shard))
    tokenizer = load_tokenizer(resolve_model_path(qwen1_folder))
    messages = [{"role": "user", "content": TEXTS[0]}, {"role": "assistant", "content": TEXTS[1]}]
    input_ids = tokenizer.encode(tokenizer.apply_chat_template(messages, tokenize=False), add_special_tokens=False)
    assert len(input_ids) > 40
    expected = qwen1_reference_logits(weights, config, input_ids)
    # The check can fail: with up and gate swapped (a plausible mapping error) the logits are far off.
    swapped = {**weights}
    for layer in range(config["num_hidden_layers"]):
        up, gate = f"transformer.h.{layer}.mlp.w1.weight", f"transformer.h.{layer}.mlp.w2.weight"
        swapped[up], swapped[gate] = weights[gate], weights[up]
    assert (qwen1_reference_logits(swapped, config, input_ids) - expected).abs().max().item() > 1e-2

    model = load_model(resolve_model_path(qwen1_folder), torch.float32, trust_remote_code=True)
    assert type(model).__name__ == "Qwen2ForCausalLM"
    with torch.no_grad():
        logits = model(torch.tensor([input_ids])).logits[0]
    difference = (logits - expected).abs().max().item()
    print(f"max |logit diff| converted vs Qwen-1 equations: {difference:.3g}")
    assert difference <= 1e-5


def test_native_folder_is_a_plain_qwen2_folder_converted_once(qwen1_folder, native, caplog):
    folder = Path(native)
    assert not list(folder.glob("*.py"))
    config = json.loads((folder / "config.json").read_text())
    assert (config["model_type"], config["architectures"], config["intermediate_size"]) == (
        "qwen2",
        ["Qwen2ForCausalLM"],
        96,  # Qwen-1's intermediate_size 192 counts w1 and w2 together
    )
    assert config["rope_parameters"]["rope_theta"] == 10000 and config["max_position_embeddings"] == 2048
    index = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    assert sorted(set(index.values())) == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    assert index["model.layers.0.self_attn.k_proj.bias"] == "model-00001-of-00002.safetensors"  # shard by shard
    assert len(index) == 3 + 2 * 12
    generation = json.loads((folder / "generation_config.json").read_text())
    assert generation["eos_token_id"] == [151645, 151643] and generation["top_p"] == 0.8
    assert json.loads((folder / "tokenizer_config.json").read_text())["model_max_length"] == 2048
    with caplog.at_level(logging.INFO, logger="sft.qwen1"):
        assert resolve_model_path(qwen1_folder) == native  # the cache: no second conversion
    assert [record.getMessage() for record in caplog.records] == [
        f"Qwen-1 model {qwen1_folder}: using its native Qwen2 conversion {native}"
    ]
    assert Path(native).parent.parent == Path(os.environ["LLM_FINETUNING_CACHE"])


def test_qwen1_lora_target_names_map_to_native_modules():
    assert native_lora_targets(["c_attn", "c_proj", "w1", "w2"]) == [
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "down_proj",
        "up_proj",
        "gate_proj",
    ]
    assert native_lora_targets(["all-linear"]) == ["all-linear"]
    assert native_lora_targets(["c_attn", "q_proj"]) == ["q_proj", "k_proj", "v_proj"]


def broken_copy(qwen1_folder: str, destination: Path, config_changes: dict | None = None) -> Path:
    """A copy of the tiny Qwen-1 folder (weights linked) with config.json changed."""
    shutil.copytree(qwen1_folder, destination, symlinks=True, copy_function=os.symlink)
    config = json.loads((destination / "config.json").read_text())
    (destination / "config.json").unlink()
    (destination / "config.json").write_text(json.dumps({**config, **(config_changes or {})}))
    return destination


@pytest.mark.parametrize(
    "change, message",
    [
        ("no_tiktoken", "no qwen.tiktoken, Qwen-1's vocabulary"),
        ("short_tiktoken", "qwen.tiktoken has 100 BPE ranks, Qwen-1's qwen.tiktoken has 151643"),
        ({"rotary_pct": 0.5}, "rotary_pct 0.5"),
        ({"intermediate_size": 128}, "intermediate_size 128, but the MLP weights are 96 wide"),
        ({"num_hidden_layers": 3}, "the weights have no transformer.h.2.ln_1.weight"),
        ({"quantization_config": {"bits": 4}}, "a quantised Qwen-1 release (Int4/Int8) cannot be converted"),
        ("extra_tensor", "its weights have tensors Qwen-1 has not, e.g. transformer.h.0.attn.extra.weight"),
        ("truncated_shard", "model-00002-of-00002.safetensors: cannot read its weights"),
    ],
)
def test_unconvertible_folders_stop_finetune_with_a_clear_message(
    qwen1_folder, tmp_path, run_finetune, change, message
):
    folder = broken_copy(qwen1_folder, tmp_path / "Qwen-broken", change if isinstance(change, dict) else None)
    if change == "no_tiktoken":
        (folder / "qwen.tiktoken").unlink()
    if change == "truncated_shard":
        shard = folder / "model-00002-of-00002.safetensors"
        content = shard.read_bytes()
        shard.unlink()
        shard.write_bytes(content[: len(content) // 2])
    if change == "short_tiktoken":
        lines = (folder / "qwen.tiktoken").read_text().splitlines()[:100]
        (folder / "qwen.tiktoken").unlink()
        (folder / "qwen.tiktoken").write_text("\n".join(lines) + "\n")
    if change == "extra_tensor":
        save_file({"transformer.h.0.attn.extra.weight": torch.zeros(2)}, folder / "extra.safetensors")
        index = json.loads((folder / "model.safetensors.index.json").read_text())
        index["weight_map"]["transformer.h.0.attn.extra.weight"] = "extra.safetensors"
        (folder / "model.safetensors.index.json").unlink()
        (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    argv = ["--model_name_or_path", str(folder), "--data_path", EXAMPLES, "--use_lora"]
    argv += ["--output_dir", str(tmp_path / "out"), "--report_to", "none", "--trust_remote_code", "True"]
    with pytest.raises(Qwen1Error) as exit_info:
        run_finetune(*argv)
    assert message in str(exit_info.value)
    assert not (tmp_path / "out").exists()
    assert not list(Path(os.environ["LLM_FINETUNING_CACHE"], "qwen1-native").glob("Qwen-broken*/*"))


def test_convert_command_refuses_an_existing_output(qwen1_folder, tmp_path, monkeypatch, capsys):
    (tmp_path / "taken").mkdir()
    monkeypatch.setattr(sys, "argv", ["python -m sft.qwen1", qwen1_folder, str(tmp_path / "taken")])
    with pytest.raises(SystemExit) as exit_info:
        run_main(qwen1_main)
    assert exit_info.value.code == 2
    error = f"error: {tmp_path / 'taken'} exists: choose a new folder for the converted model\n"
    assert capsys.readouterr().err == error
    assert not list((tmp_path / "taken").iterdir())


def test_convert_qwen1_writes_single_file_weights_from_a_pytorch_bin(qwen1_folder, native, tmp_path):
    """Older Qwen-1 releases ship pytorch_model.bin: converted too, to the same tensors."""
    source = tmp_path / "Qwen-bin"
    source.mkdir()
    for name in ("config.json", "generation_config.json", "qwen.tiktoken"):
        os.symlink(Path(qwen1_folder) / name, source / name)
    weights = {}
    for shard in sorted(Path(qwen1_folder).glob("model-*.safetensors")):
        weights.update(load_file(shard))
    torch.save(weights, source / "pytorch_model.bin")
    output = convert_qwen1(source, tmp_path / "native")
    converted = load_file(output / "model.safetensors")
    expected = {}
    for shard in sorted(Path(native).glob("model-*.safetensors")):
        expected.update(load_file(shard))
    assert converted.keys() == expected.keys()
    assert all(torch.equal(converted[name], expected[name]) for name in expected)


LORA_ARGS = ["--max_steps", "2", "--per_device_train_batch_size", "2", "--model_max_length", "96", "--seed", "0"]
LORA_ARGS += ["--save_strategy", "no", "--report_to", "none", "--lora_r", "4", "--lora_alpha", "8"]


@pytest.fixture(scope="module")
def qwen1_adapter(qwen1_folder, tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """A LoRA adapter trained on the Qwen-1 folder through a launcher, with Qwen's own target module names."""
    output = tmp_path_factory.mktemp("qwen1") / "lora"
    env = {**os.environ, "GPUS_PER_NODE": "1", "CUDA_VISIBLE_DEVICES": "", "MASTER_PORT": str(free_port())}
    command = ["bash", "finetune/finetune_lora_single_gpu.sh", "-m", qwen1_folder, "-d", EXAMPLES, "-o", str(output)]
    command += [*LORA_ARGS, "--trust_remote_code", "True", "--lora_target_modules", "c_attn", "c_proj", "w1", "w2"]
    run = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-6000:]
    return output, run


def test_lora_through_a_launcher_names_the_native_base(qwen1_adapter, qwen1_folder, native):
    adapter, run = qwen1_adapter
    assert "--lora_target_modules c_attn c_proj w1 w2 are Qwen-1 names: q_proj k_proj v_proj o_proj down_proj" in (
        run.stderr + run.stdout
    )
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == native
    assert set(config["target_modules"]) == {
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "up_proj",
        "gate_proj",
        "down_proj",
    }
    run_info = json.loads((adapter / RUN_INFO_FILE).read_text())
    assert (run_info["base_model"], run_info["qwen1_source"]) == (native, qwen1_folder)
    model = AutoPeftModelForCausalLM.from_pretrained(adapter)  # plain peft, no remote code
    assert type(model.get_base_model()).__name__ == "Qwen2ForCausalLM"


def test_full_fine_tuning_saves_a_plain_qwen2_model(qwen1_folder, tmp_path, run_finetune):
    output = tmp_path / "full"
    argv = ["--model_name_or_path", qwen1_folder, "--data_path", EXAMPLES, "--output_dir", str(output)]
    argv += ["--max_steps", "1", "--per_device_train_batch_size", "2", "--model_max_length", "96"]
    argv += ["--save_strategy", "no", "--report_to", "none", "--dataloader_pin_memory", "false"]
    run_finetune(*argv)
    model = AutoModelForCausalLM.from_pretrained(output)
    assert type(model).__name__ == "Qwen2ForCausalLM"
    assert AutoTokenizer.from_pretrained(output).convert_tokens_to_ids("<|im_end|>") == 151645


def test_merge_onto_the_original_qwen1_folder(qwen1_adapter, qwen1_folder, tmp_path, monkeypatch, capsys):
    adapter, _ = qwen1_adapter
    output = tmp_path / "merged"
    argv = ["merge_lora.py", "--adapter", str(adapter), "--output", str(output), "--base_model", qwen1_folder]
    monkeypatch.setattr(sys, "argv", [*argv, "--num_check_samples", "2"])
    merge_lora.main()
    assert "max |logit diff|" in capsys.readouterr().out
    assert type(AutoModelForCausalLM.from_pretrained(output)).__name__ == "Qwen2ForCausalLM"
    assert json.loads((output / "config.json").read_text())["model_type"] == "qwen2"


@pytest.mark.usefixtures("eager_gptq_kernels")
def test_gptq_quantises_the_qwen1_folder(qwen1_folder, tmp_path, monkeypatch):
    output = tmp_path / "gptq"
    args = ["--model_name_or_path", qwen1_folder, "--data_path", EXAMPLES, "--out_path", str(output)]
    args += ["--bits", "4", "--group_size", "32", "--num_samples", "4", "--num_eval_samples", "2", "--max_len", "64"]
    monkeypatch.setattr(sys, "argv", ["run_gptq.py", *args])
    run_gptq.main()
    config = json.loads((output / "config.json").read_text())
    assert config["model_type"] == "qwen2" and config["quantization_config"]["bits"] == 4


def test_cli_demo_query_answers_as_sft_chat_does(qwen1_folder, monkeypatch, capsys):
    model, tokenizer = load_for_chat(qwen1_folder)
    settings = replace(GenerationSettings.from_model(model), max_new_tokens=6, temperature=0).checked()
    expected = "".join(stream_reply(model, tokenizer, conversation([], "你好", None), settings, 1234)).strip()
    argv = ["cli_demo.py", "-c", qwen1_folder, "--trust_remote_code", "--query", "你好"]
    monkeypatch.setattr(sys, "argv", [*argv, "--max_new_tokens", "6", "--temperature", "0"])
    cli_demo.main()
    assert capsys.readouterr().out.strip().endswith(expected)


def test_a_hub_id_is_read_through_the_hub_cache(qwen1_folder, tmp_path, monkeypatch):
    """A hub id of a Qwen-1 model resolves to its downloaded snapshot (here: offline, from a prepared cache)."""
    import huggingface_hub.constants

    repo = tmp_path / "hub" / "models--Qwen--Qwen-tiny-Chat"
    snapshot = repo / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    for file in Path(qwen1_folder).iterdir():
        os.symlink(file, snapshot / file.name)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    assert local_qwen1_folder("Qwen/Qwen-tiny-Chat") == snapshot
    assert native_folder(snapshot).name.startswith("Qwen-tiny-Chat-")  # named after the repository
    assert local_qwen1_folder("Qwen/Qwen2-not-cached") is None  # left to transformers, which reports it
