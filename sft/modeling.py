"""Loading tokenizers and models for training and inference: full precision, LoRA and Q-LoRA (bitsandbytes); and
the one dtype policy every script follows."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    BitsAndBytesConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from sft.data import CHATML_TEMPLATE
from sft.data.template_fit import TEMPLATE_PROBES
from sft.errors import ConfigurationError, UserError
from sft.moe import find_moe, lora_targets, prepare_quantized, set_linear_dropout

logger = logging.getLogger(__name__)

DTYPES = {
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "float32": torch.float32,
    "fp32": torch.float32,
}


class ModelPathError(UserError, FileNotFoundError):
    """A model or adapter path that holds no model (a typo, a folder of something else); names the path."""


def _unloadable(path: str, what: str, error: OSError) -> ModelPathError:
    """The error for a path transformers could not load `what` from: one line, naming the path."""
    reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    if Path(path).expanduser().exists():
        return ModelPathError(f"{path}: cannot load {what} from it ({reason})")
    if path.startswith((".", "/", "~")) or path.count("/") > 1:  # a path, not a hub id
        return ModelPathError(f"{path}: no such folder")
    return ModelPathError(f"{path}: no such folder, nor a hub model ({reason})")


# ----------------------------------------------------------------------------------------------------------
# The dtype policy. Described, not looked up: `cuda_bf16` is None where the model runs on the CPU, True or False
# on a GPU with or without native bfloat16, so that every branch can be tested on a CPU.
# ----------------------------------------------------------------------------------------------------------


def gpu_bf16(device: torch.device | str) -> bool | None:
    """This machine, as the policy wants it: None on the CPU, else whether the GPU computes in bfloat16 natively
    (emulated bfloat16 on an older GPU runs, but slower than float16)."""
    if torch.device(device).type != "cuda":
        return None
    return torch.cuda.is_bf16_supported(including_emulation=False)


def named_dtype(name: str) -> torch.dtype:
    """The dtype a command line names (bf16, bfloat16, fp16, float16, fp32, float32)."""
    if name not in DTYPES:
        raise ConfigurationError(f"unknown dtype {name!r}: choose one of {', '.join(DTYPES)}")
    return DTYPES[name]


def training_dtype(bf16: bool, fp16: bool) -> torch.dtype:
    """The compute dtype of a training run: the Trainer's mixed precision flags (--bf16, --fp16), else float32."""
    if bf16:
        return torch.bfloat16
    if fp16:
        return torch.float16
    return torch.float32


def training_weights_dtype(requested: str | None, bf16: bool, fp16: bool, lora: bool) -> torch.dtype:
    """The dtype the weights are loaded in for training: `requested` when given; else a LoRA run's frozen base in
    the compute dtype (it is only read), and a full fine-tune's in float32 (the optimizer updates them; mixed
    precision casts for the forward pass)."""
    if requested:
        return named_dtype(requested)
    return training_dtype(bf16, fp16) if lora else torch.float32


def inference_dtype(requested: str | None = "auto", cuda_bf16: bool | None = None, gptq: bool = False) -> torch.dtype:
    """The dtype to run a model in: `requested` unless "auto" or None; else float32 on the CPU (half precision is
    slow or unsupported there), float16 for GPTQ kernels and on GPUs without bfloat16, bfloat16 on the others."""
    if requested and requested != "auto":
        return named_dtype(requested)
    if cuda_bf16 is None:
        return torch.float32
    if gptq or not cuda_bf16:
        return torch.float16
    return torch.bfloat16


def merge_dtype(requested: str | None, saved: torch.dtype | str | None) -> torch.dtype:
    """The dtype of merged weights: `requested` unless "auto" or None; else the dtype the base model was saved in
    (`saved`, from its config), float32 where it records none, so merging neither loses nor invents precision."""
    if requested and requested != "auto":
        return named_dtype(requested)
    if saved is None:
        return torch.float32
    return DTYPES.get(str(saved).removeprefix("torch."), torch.float32)


BUILT_IN_CHAT_TEMPLATES = {"chatml": CHATML_TEMPLATE}


def read_chat_template(value: str) -> str:
    """--chat_template: a built-in template's name (chatml) or a Jinja file's text. ConfigurationError for a file
    that is missing, unreadable or not valid Jinja (with its line), before any model is loaded."""
    if value.strip().lower() in BUILT_IN_CHAT_TEMPLATES:
        return BUILT_IN_CHAT_TEMPLATES[value.strip().lower()]
    path = Path(value).expanduser()
    if not path.is_file():
        names = ", ".join(BUILT_IN_CHAT_TEMPLATES)
        raise ConfigurationError(f"--chat_template {value}: no such file, nor a built-in template ({names})")
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigurationError(f"--chat_template {path}: cannot read it ({error})") from None
    import jinja2
    from transformers.utils.chat_template_utils import _compile_jinja_template

    try:
        _compile_jinja_template(text)  # the compiler apply_chat_template uses, with its extensions
    except jinja2.TemplateSyntaxError as error:
        raise ConfigurationError(
            f"--chat_template {path}, line {error.lineno}: not a valid Jinja template ({error.message})"
        ) from None
    return text


def load_tokenizer(
    path: str, trust_remote_code: bool = False, model_max_length: int | None = None, chat_template: str | None = None
) -> PreTrainedTokenizerBase:
    """The model's tokenizer, right-padded, with a pad token and a chat template: `chat_template` (a template's text)
    when given, else its own, else ChatML.

    `path` is already resolved: a Qwen-1 model's native conversion (sft.qwen1.resolve_model_path), as in load_model.
    """
    kwargs = {"model_max_length": model_max_length} if model_max_length else {}
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            path, trust_remote_code=trust_remote_code, padding_side="right", **kwargs
        )
    except OSError as error:  # no such folder or hub model, or one without a tokenizer
        raise _unloadable(path, "a tokenizer", error) from None
    if tokenizer.pad_token_id is None:
        if "<|endoftext|>" in tokenizer.get_vocab():
            tokenizer.pad_token = "<|endoftext|>"
        else:
            tokenizer.pad_token = tokenizer.eos_token
    if chat_template:
        # Replaces the model's own: saved with the outputs (chat_template.jinja), which the demos then use.
        tokenizer.chat_template = chat_template
    if not tokenizer.chat_template:
        vocabulary = tokenizer.get_vocab()
        missing = [token for token in ("<|im_start|>", "<|im_end|>") if token not in vocabulary]
        if missing:
            # ChatML's markers would then be learned as several ordinary tokens, and generation never stops on one.
            raise ConfigurationError(
                f"{path}: the tokenizer has no chat template, and ChatML (the fallback) needs the tokens "
                f"{', '.join(missing)} it does not have: add a chat template to the model folder "
                "(chat_template.jinja), or use the model's chat (instruct) version"
            )
        # Saved with the outputs, so what was trained on ChatML is served with ChatML.
        tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer


def load_config(path: str, trust_remote_code: bool = False):
    """The model's config (the text model's for a multimodal one is `.get_text_config()`)."""
    try:
        return AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except OSError as error:  # no such folder or hub model, or no config.json in it
        raise _unloadable(path, "its config", error) from None


def tokenizer_folder(folder: str, base_model: str) -> str:
    """`folder` when it holds a tokenizer (finetune.py saves one with every adapter: the one trained on), else
    the base model's."""
    return folder if (Path(folder) / "tokenizer_config.json").is_file() else base_model


def chat_special_token_ids(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Ids of the special (added) tokens the tokenizer's own chat template writes around turns: its headers and
    end-of-turn marker (ChatML's <|im_start|>/<|im_end|>, Gemma's <start_of_turn>/<end_of_turn>, Mistral's
    [INST]/[/INST] and </s>, ...), found by rendering probe conversations. Logged by name."""
    from sft.data.templates import try_render_many

    special = set(tokenizer.added_tokens_decoder)
    texts, _ = try_render_many(tokenizer, [list(probe) for probe in TEMPLATE_PROBES])
    generation, _ = try_render_many(tokenizer, [list(TEMPLATE_PROBES[1])], add_generation_prompt=True)
    ids: set[int] = set()
    for text in [*texts, *generation]:
        if text is not None:
            ids.update(index for index in tokenizer(text, add_special_tokens=False)["input_ids"] if index in special)
    if not ids:
        raise ConfigurationError(
            "--train_special_tokens: the chat template writes no special token (its markers are ordinary text): "
            "there are no rows to train; drop the flag"
        )
    logger.info(
        "--train_special_tokens: training the rows of %s", ", ".join(tokenizer.convert_ids_to_tokens(sorted(ids)))
    )
    return sorted(ids)


def quantization_config(
    bits: int,
    compute_dtype: torch.dtype,
    quant_type: str = "nf4",
    double_quant: bool = True,
    sharded: bool = False,
) -> BitsAndBytesConfig:
    """bitsandbytes quantisation for Q-LoRA. `sharded`: the weights will be split across processes (DeepSpeed
    ZeRO-3, FSDP), which flatten and shard a model's tensors of one dtype: the 4-bit weights are then stored in
    the compute dtype (bnb_4bit_quant_storage) like every other weight, instead of uint8."""
    if bits == 4:
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=quant_type,
            bnb_4bit_use_double_quant=double_quant,
            bnb_4bit_compute_dtype=compute_dtype,
            bnb_4bit_quant_storage=compute_dtype if sharded else torch.uint8,
        )
    if bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    raise ValueError(f"bits must be 4 or 8, got {bits}")


def training_device_map(quantized: bool, cuda: bool, zero3: bool, local_rank: int = 0) -> dict | None:
    """Where from_pretrained puts a model for training: a quantised model on this process's GPU (bitsandbytes
    quantises as it loads, on the GPU); nothing otherwise (the Trainer moves it), and never under ZeRO-3, which
    shards the weights as they load (transformers refuses a device_map there)."""
    if quantized and cuda and not zero3:
        return {"": local_rank}
    return None


def inference_device_map(device: torch.device | str) -> dict | str:
    """Where from_pretrained puts a model to run it: on a GPU machine "auto" (accelerate spreads the layers over
    every visible GPU, then CPU memory, so a model larger than one GPU still loads); else the one device."""
    if torch.device(device).type == "cuda":
        return "auto"
    return {"": torch.device(device)}


def load_model(
    path: str,
    dtype: torch.dtype = torch.float32,
    quantization: BitsAndBytesConfig | None = None,
    trust_remote_code: bool = False,
    attn_implementation: str | None = None,
    device_map: dict | str | None = None,
) -> PreTrainedModel:
    """A causal LM; a quantised one goes on this process's GPU when there is one (bitsandbytes needs that),
    unless DeepSpeed ZeRO-3 shards it."""
    if device_map is None:
        from transformers.integrations import is_deepspeed_zero3_enabled

        device_map = training_device_map(
            quantization is not None,
            torch.cuda.is_available(),
            is_deepspeed_zero3_enabled(),
            int(os.environ.get("LOCAL_RANK", 0)),
        )
    logger.info("Loading %s (%s%s)", path, dtype, f", {quantization.quant_method} quantised" if quantization else "")
    # Passed only when asked for: an explicit None would drop the quantisation of a pre-quantised (GPTQ) model.
    extra = {"quantization_config": quantization} if quantization is not None else {}
    try:
        model = AutoModelForCausalLM.from_pretrained(
            path,
            dtype=dtype,
            device_map=device_map,
            trust_remote_code=trust_remote_code,
            attn_implementation=attn_implementation,
            **extra,
        )
    except OSError as error:  # no such folder or hub model, or one without weights
        raise _unloadable(path, "a model", error) from None
    _say_what_a_multimodal_folder_became(path, model)
    return model


def _say_what_a_multimodal_folder_became(path: str, model: PreTrainedModel) -> None:
    """A multimodal checkpoint (Qwen3.5, Gemma 3/4) trains on text as transformers loads it for causal LM: some
    whole (Gemma's ForConditionalGeneration), some as their text model alone (Qwen3.5): say which."""
    declared = getattr(model.config, "architectures", None) or []
    folder_config = Path(path, "config.json")
    if folder_config.is_file():
        declared = json.loads(folder_config.read_text()).get("architectures") or declared
    if not declared or type(model).__name__ in declared or not hasattr(model.config, "get_text_config"):
        return
    if model.config.get_text_config() is model.config and any("ConditionalGeneration" in a for a in declared):
        logger.info(
            "%s is a %s checkpoint: loaded as %s, its language model alone, for text; what training saves is "
            "that text model (the vision parts are not loaded)",
            path, declared[0], type(model).__name__,
        )  # fmt: skip


def add_lora(
    model: PreTrainedModel,
    r: int,
    alpha: int,
    dropout: float,
    target_modules: list[str] | str,
    bias: str = "none",
    trainable_token_ids: list[int] | None = None,
    quantized: bool = False,
    gradient_checkpointing: bool = False,
    use_dora: bool = False,
    use_rslora: bool = False,
    init_lora_weights: bool | str = True,
    scope: str = "all",
):
    """Wraps the model with LoRA adapters (and, optionally, trainable rows of the embedding and output layer).
    `use_dora`, `use_rslora` and `init_lora_weights` are peft's LoraConfig variants, passed as they are. `scope`:
    --lora_target (sft.moe.lora_targets: the experts of a MoE model, or attention only)."""
    from peft import LoraConfig, get_peft_model

    model = prepare_for_lora(model, quantized, gradient_checkpointing)
    if isinstance(target_modules, list) and target_modules in (["all-linear"], ["all_linear"]):
        target_modules = "all-linear"
    targets = lora_targets(model, scope, target_modules, r)
    variant = "--use_dora" if use_dora else f"--init_lora_weights {init_lora_weights}"
    if targets.in_place and (use_dora or str(init_lora_weights).startswith(("pissa", "olora", "orthogonal"))):
        raise ConfigurationError(
            f"{variant}: peft's LoRA of the fused expert parameters does not take it; use --lora_target attention"
        )
    trainable_token_indices = None
    if trainable_token_ids:
        trainable_token_indices = {_embedding_module_name(model): trainable_token_ids}
        if not model.config.get_text_config().tie_word_embeddings:
            trainable_token_indices[_output_module_name(model)] = trainable_token_ids
    config = LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=0.0 if targets.in_place else dropout,  # set on the linear modules below
        target_modules=targets.target_modules,
        target_parameters=targets.target_parameters or None,
        bias=bias,
        task_type="CAUSAL_LM",
        trainable_token_indices=trainable_token_indices,
        use_dora=use_dora,
        use_rslora=use_rslora,
        init_lora_weights=init_lora_weights,
    )
    try:
        model = get_peft_model(model, config)
    except ValueError as error:
        if "not found in the base model" not in str(error):
            raise
        linear = sorted(
            {
                name.rsplit(".", 1)[-1]
                for name, module in model.named_modules()
                if isinstance(module, torch.nn.Linear) or "Linear" in type(module).__name__
            }
        )
        raise ValueError(
            f"--lora_target_modules {target_modules} match no module of this model; its linear modules are: "
            f"{', '.join(linear)} (or use all-linear)"
        ) from None
    if targets.in_place:
        set_linear_dropout(model, dropout, targets)
    trainable, total = model.get_nb_trainable_parameters()
    logger.info("LoRA: %s of %s parameters trainable (%.2f%%)", f"{trainable:,}", f"{total:,}", 100 * trainable / total)
    return model


def prepare_for_lora(model: PreTrainedModel, quantized: bool, gradient_checkpointing: bool) -> PreTrainedModel:
    """What a base model needs before adapters train on it: k-bit preparation, inputs that carry gradients for
    gradient checkpointing."""
    from peft import prepare_model_for_kbit_training

    layout = find_moe(model) if quantized else None
    if layout:  # the fused experts stay in their dtype
        return prepare_quantized(model, layout, gradient_checkpointing)
    if quantized:
        return prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
    if gradient_checkpointing:
        model.enable_input_require_grads()
    return model


def load_lora(model: PreTrainedModel, path: str, quantized: bool = False, gradient_checkpointing: bool = False):
    """The adapter saved in `path` on `model`, trainable: training continues from its weights, with its own LoRA
    configuration (rank, alpha, targets, trainable token rows)."""
    from peft import PeftModel

    model = prepare_for_lora(model, quantized, gradient_checkpointing)
    model = PeftModel.from_pretrained(model, path, is_trainable=True)
    config = model.peft_config["default"]
    logger.info(
        "LoRA: continuing the adapter in %s (r=%s, alpha=%s, targets %s)",
        path, config.r, config.lora_alpha, sorted(config.target_modules or []) + sorted(config.target_parameters or []),
    )  # fmt: skip
    return model


def _module_name(model: PreTrainedModel, module: torch.nn.Module) -> str:
    return next(name for name, candidate in model.named_modules() if candidate is module).rsplit(".", 1)[-1]


def _embedding_module_name(model: PreTrainedModel) -> str:
    return _module_name(model, model.get_input_embeddings())


def _output_module_name(model: PreTrainedModel) -> str:
    return _module_name(model, model.get_output_embeddings())
