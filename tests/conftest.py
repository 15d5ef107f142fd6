"""One tiny model for the whole test session, built from scratch (nothing is downloaded)."""

from __future__ import annotations

import pytest

from scripts.make_tiny_model import build_tiny_model
from sft.modeling import load_tokenizer


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Path of a tiny Qwen2 chat model (ChatML template, briefly pre-trained)."""
    return str(build_tiny_model(tmp_path_factory.mktemp("models") / "tiny-qwen2", hidden_size=64))


@pytest.fixture(scope="session")
def tokenizer(tiny_model: str):
    return load_tokenizer(tiny_model)
