"""Talking to a trained model: load any output folder and generate replies with the training chat template."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from sft.data import Conversation, render
from sft.modeling import load_model, load_tokenizer


def load_for_chat(path: str, trust_remote_code: bool = False) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A base model, full fine-tune or merged model; or, for an adapter folder, its base model with the adapter."""
    adapter_config = Path(path) / "adapter_config.json"
    tokenizer = load_tokenizer(path, trust_remote_code)
    if adapter_config.is_file():
        from peft import PeftModel

        base_path = json.loads(adapter_config.read_text())["base_model_name_or_path"]
        model = PeftModel.from_pretrained(load_model(base_path, trust_remote_code=trust_remote_code), path)
    else:
        model = load_model(path, trust_remote_code=trust_remote_code)
    return model.eval(), tokenizer


@torch.no_grad()
def reply(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    messages: Conversation,
    max_new_tokens: int = 64,
    **generation: object,
) -> str:
    """The assistant's next message; greedy unless sampling settings are given."""
    prompt = render(tokenizer, messages, add_generation_prompt=True)
    inputs = tokenizer(prompt, add_special_tokens=False, return_tensors="pt").to(model.device)
    output = model.generate(**inputs, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id, **generation)
    return tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True).strip()
