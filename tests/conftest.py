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


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Path of a tiny Qwen2 chat model (ChatML template, briefly pre-trained)."""
    return str(build_tiny_model(tmp_path_factory.mktemp("models") / "tiny-qwen2", hidden_size=64))


@pytest.fixture(scope="session")
def tokenizer(tiny_model: str):
    return load_tokenizer(tiny_model)
