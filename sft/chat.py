"""Talking to a trained model, for the demos and scripts/ask.py.

`load_for_chat(path)` loads whatever a training run or a post-processing script wrote: a LoRA adapter folder
(recognised by its `adapter_config.json`; its base model is loaded under it), a merged model, a full fine-tune
or a GPTQ-quantised folder, on the GPU when there is one. `stream_reply` renders the conversation with the same
chat template code as training (`sft.data.render`) and yields the reply's text as it is generated, stopping at
the template's end-of-turn token; closing the stream (or Ctrl-C while reading it) stops the generation.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import torch
from transformers import (
    GenerationConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    StoppingCriteria,
    StoppingCriteriaList,
    TextIteratorStreamer,
    set_seed,
)

from sft.data import Conversation, end_of_turn, render, with_tools
from sft.data.template_fit import grow_embeddings
from sft.errors import ConfigurationError, UserError
from sft.gptq import require_gptq
from sft.modeling import (
    ModelPathError,
    gpu_bf16,
    inference_device_map,
    inference_dtype,
    load_model,
    load_tokenizer,
    tokenizer_folder,
)
from sft.qwen1 import resolve_model_path


class ChatTemplateError(UserError):
    """The chat template refuses the conversation (a role, a system prompt or tools it does not support)."""


def chat_prompt(tokenizer: PreTrainedTokenizerBase, messages: Conversation) -> str:
    """The conversation rendered up to the assistant's turn; ChatTemplateError where the template refuses it."""
    try:
        return render(tokenizer, messages, add_generation_prompt=True)
    except Exception as error:  # a template raises whatever its author wrote (TemplateError, TypeError, ...)
        raise ChatTemplateError(
            f"the chat template refuses this conversation: {error or type(error).__name__}"
        ) from None


def pick_device(cpu_only: bool = False) -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() and not cpu_only else "cpu")


def pick_dtype(device: torch.device, gptq: bool = False) -> torch.dtype:
    """The policy of sft.modeling for this machine: bfloat16 on GPUs that have it (float16 on older ones and for
    GPTQ kernels), float32 on the CPU."""
    return inference_dtype("auto", gpu_bf16(device), gptq)


def _is_gptq(path: str) -> bool:
    config = Path(path) / "config.json"
    if not config.is_file():
        return False
    quantization = json.loads(config.read_text()).get("quantization_config") or {}
    return quantization.get("quant_method") == "gptq"


def check_model_folder(path: str) -> None:
    """A local folder must hold a model (config.json) or an adapter (adapter_config.json): a clear error early,
    rather than a library's about a missing tokenizer file. (A path that is not there fails at loading.)"""
    folder = Path(path).expanduser()
    if not folder.is_dir():
        return
    if not (folder / "config.json").is_file() and not (folder / "adapter_config.json").is_file():
        raise ModelPathError(
            f"{path}: not a model folder (no config.json) nor an adapter folder (no adapter_config.json)"
        )


def adapter_base_model(adapter: str, hint: str = "") -> str:
    """The base model an adapter folder records (peft writes it into adapter_config.json); `hint` ends the error
    where it records none (another way to name the base)."""
    config_file = Path(adapter) / "adapter_config.json"
    try:
        config = json.loads(config_file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ModelPathError(f"{config_file}: cannot read it ({error})") from None
    base = config.get("base_model_name_or_path") if isinstance(config, dict) else None
    if not base:
        raise ModelPathError(
            f"{config_file} names no base model (base_model_name_or_path): set it to the base model's folder or "
            f"hub id{hint}"
        )
    return base


def load_for_chat(
    path: str, trust_remote_code: bool = False, cpu_only: bool = False, dtype: torch.dtype | None = None
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A base model, full fine-tune, merged or GPTQ model; or, for an adapter folder, its base model with the adapter.

    The tokenizer comes from `path` (finetune.py saves it with every output), else from the adapter's base model.
    A path that holds no model is a ModelPathError.
    """
    check_model_folder(path)
    adapter_config = Path(path) / "adapter_config.json"
    base_path = adapter_base_model(path) if adapter_config.is_file() else path
    base_path = resolve_model_path(base_path)  # a Qwen-1 model: its native conversion (raises Qwen1Error)
    if not adapter_config.is_file():
        path = base_path
    gptq = _is_gptq(base_path)
    if gptq:
        require_gptq(f"{base_path} is a GPTQ model: loading it")
    device = pick_device(cpu_only)
    dtype = dtype or pick_dtype(device, gptq=gptq)
    tokenizer = load_tokenizer(tokenizer_folder(path, base_path), trust_remote_code)
    model = load_model(
        base_path, dtype=dtype, trust_remote_code=trust_remote_code, device_map=inference_device_map(device)
    )
    if adapter_config.is_file():
        from peft import PeftModel

        grow_embeddings(model, tokenizer)  # markers a --chat_template added with --train_special_tokens
        model = PeftModel.from_pretrained(model, path)
    return model.eval(), tokenizer


def stop_token_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """The model's end-of-sequence ids plus the chat template's end-of-turn token (e.g. <|im_end|>)."""
    ids: set[int] = set()
    configured = model.generation_config.eos_token_id
    ids.update(configured if isinstance(configured, list) else [configured] if configured is not None else [])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    turn_end_text = end_of_turn(tokenizer)
    turn_end = tokenizer.encode(turn_end_text, add_special_tokens=False) if turn_end_text else []
    if len(turn_end) == 1:
        ids.add(turn_end[0])
    return sorted(ids)


@dataclass(frozen=True)
class GenerationSettings:
    """What a demo lets the user change between replies. temperature 0 means greedy decoding."""

    max_new_tokens: int = 512
    temperature: float = 0.7
    top_p: float = 0.8
    top_k: int = 20
    repetition_penalty: float = 1.0
    min_new_tokens: int = 0

    @classmethod
    def from_model(cls, model: PreTrainedModel, **overrides: object) -> GenerationSettings:
        """The model's own generation_config values where it has them; `overrides` that are not None win."""
        config = model.generation_config
        values: dict[str, object] = {}
        for name in ("max_new_tokens", "top_p", "top_k", "repetition_penalty"):
            if getattr(config, name, None) is not None:
                values[name] = getattr(config, name)
        if config.do_sample is False:
            values["temperature"] = 0.0
        elif config.temperature is not None:
            values["temperature"] = config.temperature
        values.update({name: value for name, value in overrides.items() if value is not None})
        return cls(**values).checked()

    def checked(self) -> GenerationSettings:
        problems = []
        if self.max_new_tokens < 1:
            problems.append("max_new_tokens must be at least 1")
        if self.min_new_tokens < 0 or self.min_new_tokens > self.max_new_tokens:
            problems.append("min_new_tokens must be between 0 and max_new_tokens")
        if self.temperature < 0:
            problems.append("temperature must be 0 (greedy) or more")
        if not 0 < self.top_p <= 1:
            problems.append("top_p must be in (0, 1]")
        if self.top_k < 0:
            problems.append("top_k must be 0 (off) or more")
        if self.repetition_penalty <= 0:
            problems.append("repetition_penalty must be positive")
        if problems:
            raise ConfigurationError("; ".join(problems))
        return self

    def updated(self, assignments: list[str]) -> GenerationSettings:
        """A copy with `key=value` assignments applied, all or none; values are parsed by the field's type."""
        types = {field.name: field.type for field in fields(self)}
        values: dict[str, object] = {}
        for assignment in assignments:
            key, equals, text = assignment.partition("=")
            key = key.strip()
            if not equals or not text.strip():
                raise ConfigurationError(f"'{assignment}': expected key=value")
            if key not in types:
                raise ConfigurationError(f"unknown setting '{key}'; settings: {', '.join(types)}")
            try:
                values[key] = int(text) if types[key] == "int" else float(text)
            except ValueError:
                kind = "an integer" if types[key] == "int" else "a number"
                raise ConfigurationError(f"'{assignment}': {key} takes {kind}") from None
        return replace(self, **values).checked()

    def describe(self) -> str:
        return "  ".join(f"{key}={value}" for key, value in asdict(self).items()) + (
            "  (greedy)" if self.temperature == 0 else ""
        )

    def generation_config(self, stop_ids: list[int], pad_token_id: int | None) -> GenerationConfig:
        sampling = {"do_sample": True, "temperature": self.temperature, "top_p": self.top_p, "top_k": self.top_k}
        return GenerationConfig(
            max_new_tokens=self.max_new_tokens,
            min_new_tokens=self.min_new_tokens or None,
            repetition_penalty=self.repetition_penalty,
            eos_token_id=stop_ids,
            pad_token_id=pad_token_id if pad_token_id is not None else stop_ids[0],
            **(sampling if self.temperature > 0 else {"do_sample": False}),
        )


def conversation(
    history: Conversation, query: str, system: str | None = None, tools: list[dict] | None = None
) -> Conversation:
    """The messages for the next reply: an optional system prompt, the earlier turns, the new user message, and
    the tool schemas the model may call (rendered by the chat template, as in training)."""
    messages = (
        ([{"role": "system", "content": system}] if system else []) + history + [{"role": "user", "content": query}]
    )
    return with_tools(messages, tools)


class _StopWhenSet(StoppingCriteria):
    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


def stream_reply(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    messages: Conversation,
    settings: GenerationSettings | None = None,
    seed: int | None = None,
) -> Iterator[str]:
    """Yields the assistant's next message piece by piece as it is generated (special tokens left out).

    The conversation is rendered at once: a template refusal is a ChatTemplateError raised by this call, before
    anything is generated. `seed`, when given, is set right before generating, so the same conversation, settings
    and seed give the same reply. Generation runs in a thread; closing this iterator early (or an exception while
    it is being read, Ctrl-C included) stops it after the current token and waits for it.
    """
    settings = settings or GenerationSettings.from_model(model)
    return _stream(model, tokenizer, chat_prompt(tokenizer, messages), settings, seed)


def _stream(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompt: str,
    settings: GenerationSettings,
    seed: int | None,
) -> Iterator[str]:
    inputs = tokenizer(prompt, add_special_tokens=False, return_tensors="pt").to(model.device)
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    stop = threading.Event()
    failure: list[BaseException] = []

    def generate() -> None:
        try:
            model.generate(
                **inputs,
                generation_config=settings.generation_config(stop_token_ids(model, tokenizer), tokenizer.pad_token_id),
                streamer=streamer,
                stopping_criteria=StoppingCriteriaList([_StopWhenSet(stop)]),
            )
        except BaseException as error:  # reported in the reading thread; end() unblocks it
            failure.append(error)
            streamer.end()

    if seed is not None:
        set_seed(seed)
    thread = threading.Thread(target=generate, daemon=True)
    thread.start()
    try:
        for text in streamer:
            if text:
                yield text
    finally:
        stop.set()
        thread.join()
    if failure:
        raise failure[0]


@torch.no_grad()
def reply(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    messages: Conversation,
    max_new_tokens: int = 64,
    **generation: object,
) -> str:
    """The assistant's next message, whole; greedy unless sampling settings are given. Stops at end of turn."""
    prompt = chat_prompt(tokenizer, messages)
    inputs = tokenizer(prompt, add_special_tokens=False, return_tensors="pt").to(model.device)
    generation.setdefault("eos_token_id", stop_token_ids(model, tokenizer))
    output = model.generate(**inputs, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id, **generation)
    return tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True).strip()
