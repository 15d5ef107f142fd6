"""One tiny model for the whole test session, built from scratch (nothing is downloaded)."""

from __future__ import annotations

import os

# The tiny models run as fast on one thread as on two, and far faster when the cores are shared (OpenMP threads
# spin-wait): one thread for the tests and every process they start.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from scripts.make_tiny_model import build_tiny_model  # noqa: E402
from sft.modeling import load_tokenizer  # noqa: E402

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
# SFT_TEST_DETERMINISTIC=1: the in-process tests run with torch's deterministic algorithms only (a check that no test
# leans on a non-deterministic kernel; the scripts the tests start as subprocesses are not affected).
if os.environ.get("SFT_TEST_DETERMINISTIC") == "1":
    torch.use_deterministic_algorithms(True)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Path of a tiny Qwen2 chat model (ChatML template, briefly pre-trained)."""
    return str(build_tiny_model(tmp_path_factory.mktemp("models") / "tiny-qwen2", hidden_size=64))


@pytest.fixture(scope="session")
def tokenizer(tiny_model: str):
    return load_tokenizer(tiny_model)


@pytest.fixture(scope="session")
def chat_adapter(tiny_model: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    """A LoRA adapter folder of the tiny model, written by finetune.py (a few steps on the example data)."""
    import sys

    import finetune

    output = tmp_path_factory.mktemp("chat") / "lora"
    args = ["--model_name_or_path", tiny_model, "--data_path", "data/example_chatml.jsonl"]
    args += ["--output_dir", str(output), "--use_lora", "--lora_r", "8", "--lora_alpha", "16", "--max_steps", "6"]
    args += ["--per_device_train_batch_size", "4", "--learning_rate", "5e-3", "--save_strategy", "no"]
    args += ["--report_to", "none", "--seed", "0", "--model_max_length", "128", "--dataloader_pin_memory", "false"]
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sys, "argv", ["finetune.py", *args])
        finetune.train()
    return str(output)


@pytest.fixture(scope="session")
def chat_merged(chat_adapter: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    """The same adapter merged into its base model and saved as a plain model folder, with the tokenizer."""
    from peft import AutoPeftModelForCausalLM

    output = tmp_path_factory.mktemp("chat") / "merged"
    AutoPeftModelForCausalLM.from_pretrained(chat_adapter).merge_and_unload().save_pretrained(output)
    load_tokenizer(chat_adapter).save_pretrained(output)
    return str(output)


@pytest.fixture(scope="session")
def assert_streamed():
    """A check that a reply was handed over piece by piece, not whole.

    The streamer hands text over up to its last space, so a reply of one "word" (which a tiny model may happen to
    give) comes whole: only a reply with a space inside must have come in pieces.
    """

    def check(pieces: list[str]) -> None:
        assert len(pieces) > 1 or " " not in "".join(pieces).strip(), pieces

    return check
