"""What packing needs from a model beyond its attention: linear-attention layers restarted at every packed sample,
and masks built from `position_ids` where a model's own forward does not build them so.

Linear-attention layers (Gated DeltaNet in qwen3_5, qwen3_5_moe, qwen3_next; Mamba-2 in Granite 4 hybrids; LFM2's
short convolutions) carry state along the sequence: a recurrent state and, before it, a short causal convolution
over the last few tokens. In a packed row both run straight from one sample into the next. They are found by their
structure (`linear_mixers`: a module holding a depthwise causal `nn.Conv1d`), not by a list of model types. Packed
rows of such a model are batched as one flat row with the boundaries (`cu_seq_lens_q/k`, `seq_idx`): the varlen
kernels take boundaries for a single row only. One of two ways then restarts each layer per sample, chosen once
(`restart_linear_mixers`, logged once):

- "kernels": on CUDA with the kernel packages the layers call installed (flash-linear-attention for Gated DeltaNet,
  mamba-ssm for Mamba, causal-conv1d for every convolution), transformers hands `cu_seq_lens_q` to the recurrence
  and `seq_idx` to the convolution, which restart at each boundary in one kernel call. Nothing of ours runs.
- "segments": anywhere else (the CPU, a GPU without those packages). transformers' pure-torch fallbacks cannot take
  boundaries (given some, they raise), so each layer runs once per sample on that sample's slice of the row, with
  no boundary arguments, and the outputs are joined again (the layer's class becomes a subclass whose forward does
  that: `per_sample_class`). This is exact (each sample sees the layer as it would alone: an empty convolution
  window, a zero state) where zeroing the state at a boundary would need each family's recurrence internals, and
  the short convolution would still mix the last tokens of one sample into the first of the next. It costs one
  call per sample and layer, cheap next to the chunked torch recurrence itself; memory stays that of the row.

Some decoder layers do not pass the boundaries on to their linear-attention layer (Jamba's Mamba mixer gets the
hidden states, cache and mask only): `BoundaryHandoff` hands the model's own to it, for both ways.

Some models build their attention masks without `position_ids` (GPT-OSS, Granite 4 hybrids in transformers 5.25),
so transformers cannot see the packed samples and lets them attend to each other. For those, `PackedMasks` builds
the model's own mask mapping (the same transformers functions, read from its forward's `causal_mask_mapping`) with
`position_ids` added, before the forward runs, and hands it in as the ready-made mapping the forward accepts. This
keeps what the attention implementation does with the mask: GPT-OSS's eager attention still adds its sinks.
"""

from __future__ import annotations

import functools
import importlib.util
import inspect
import logging
import re
import sys
from collections.abc import Callable, Iterable
from typing import Literal

import torch
from torch import nn

logger = logging.getLogger(__name__)

RestartMode = Literal["kernels", "segments"]

# The varlen arguments of a flat packed batch (as transformers' DataCollatorWithFlattening names them).
BOUNDARY_KEYS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k", "seq_idx")
# The packages whose kernels take boundaries, by what the layer computes (matched in its class name): transformers
# calls them when installed and the tensors are on CUDA, else its torch fallback.
KERNEL_PACKAGES = {"deltanet": ("fla", "causal_conv1d"), "mamba": ("mamba_ssm", "causal_conv1d")}
CONVOLUTION_PACKAGES = ("causal_conv1d",)
_WRAPPED = "_sft_restarts_per_sample"


def _is_causal_depthwise_conv(module: nn.Module) -> bool:
    module = getattr(module, "base_layer", module)  # a convolution peft adapts
    return (
        isinstance(module, nn.Conv1d)
        and module.kernel_size[0] > 1
        and module.groups == module.in_channels == module.out_channels
        and module.padding == (module.kernel_size[0] - 1,)
    )


def linear_mixers(model: nn.Module) -> dict[str, nn.Module]:
    """The model's token mixers that carry state along the sequence, by name: modules holding a depthwise causal
    convolution (Gated DeltaNet, Mamba, short convolutions all open with one)."""
    return {
        name: module
        for name, module in model.named_modules()
        if any(_is_causal_depthwise_conv(child) for child in module.children())
    }


def kernel_packages(mixers: Iterable[nn.Module]) -> set[str]:
    """The packages whose kernels restart these layers at boundaries in one call."""
    needed = set(CONVOLUTION_PACKAGES)
    for mixer in mixers:
        kind = type(mixer).__name__.lower()
        for word, packages in KERNEL_PACKAGES.items():
            if word in kind:
                needed.update(packages)
    return needed


def installed_packages(names: Iterable[str]) -> set[str]:
    return {name for name in names if importlib.util.find_spec(name) is not None}


def restart_mode(mixers: Iterable[nn.Module], device_type: str, installed: set[str] | None = None) -> RestartMode:
    """ "kernels" where the layers' kernels run (CUDA, every package they call installed), else "segments"."""
    mixers = list(mixers)
    needed = kernel_packages(mixers)
    installed = installed_packages(needed) if installed is None else installed
    return "kernels" if device_type == "cuda" and needed <= installed else "segments"


def _run_per_sample(forward: Callable, *args, **kwargs) -> torch.Tensor:
    """`forward` run once per packed sample (the slices between `cu_seq_lens_q`), outputs joined along the row."""
    boundaries = kwargs.get("cu_seq_lens_q")
    for key in BOUNDARY_KEYS:  # the torch fallbacks raise when given boundaries
        kwargs.pop(key, None)
    if "hidden_states" in kwargs:
        hidden_states = kwargs.pop("hidden_states")
    else:
        hidden_states, *args = args
    if boundaries is None or hidden_states.shape[0] != 1 or kwargs.get("cache") is not None:
        return forward(hidden_states, *args, **kwargs)
    mask = kwargs.pop("attention_mask", None)
    outputs = []
    for start, end in zip(boundaries[:-1].tolist(), boundaries[1:].tolist()):
        sample_mask = mask[:, start:end] if mask is not None and mask.dim() == 2 else mask
        outputs.append(forward(hidden_states[:, start:end], *args, attention_mask=sample_mask, **kwargs))
    return torch.cat(outputs, dim=1)


@functools.cache
def per_sample_class(layer_class: type[nn.Module]) -> type[nn.Module]:
    """A subclass of `layer_class` whose forward runs per packed sample. A subclass, not an instance's `forward`:
    transformers re-applies hub kernels (`kernelize`) whenever a model switches between train and eval, and that
    drops a `forward` set on an instance; a class's own forward it keeps. Same name, parameters and state dict."""

    def forward(self, *args, **kwargs):
        return _run_per_sample(super(subclass, self).forward, *args, **kwargs)

    subclass = type(layer_class.__name__, (layer_class,), {"forward": forward, _WRAPPED: True})
    return subclass


class BoundaryHandoff:
    """Hands a flat packed batch's boundaries to linear-attention layers whose decoder layer does not pass them on
    (Jamba's calls its Mamba mixer with the hidden states, cache and mask only: the mixer would run across samples).
    A pre-hook on the model keeps the boundaries of each forward (none for an unpacked batch); one on each layer
    adds those it was not given, for a row of their length. Kept until the next forward, so that gradient
    checkpointing's recomputation in backward sees the same ones."""

    def __init__(self) -> None:
        self.boundaries: dict = {}

    def remember(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self.boundaries = {key: kwargs[key] for key in BOUNDARY_KEYS if kwargs.get(key) is not None}

    def hand_over(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        starts = self.boundaries.get("cu_seq_lens_q")
        if starts is None or hidden is None or hidden.shape[0] != 1 or hidden.shape[1] != int(starts[-1]):
            return None
        missing = {key: value for key, value in self.boundaries.items() if key not in kwargs}
        return (args, {**kwargs, **missing}) if missing else None


def hand_boundaries_over(model: nn.Module, mixers: Iterable[nn.Module]) -> BoundaryHandoff:
    """Installs a `BoundaryHandoff` between `model`'s forward and its linear-attention layers (once)."""
    handoff = getattr(model, "_sft_boundary_handoff", None)
    if handoff is None:
        handoff = BoundaryHandoff()
        model.register_forward_pre_hook(handoff.remember, with_kwargs=True)
        model._sft_boundary_handoff = handoff
    for mixer in mixers:
        if getattr(mixer, "_sft_boundary_handoff", None) is None:
            mixer.register_forward_pre_hook(handoff.hand_over, with_kwargs=True)
            mixer._sft_boundary_handoff = handoff
    return handoff


def restart_linear_mixers(model: nn.Module, device_type: str, installed: set[str] | None = None) -> RestartMode | None:
    """Makes every linear-attention layer of `model` restart at each packed sample; the way chosen (None: the model
    has none). Chosen once, for the device that trains; wrapping twice is a no-op."""
    mixers = linear_mixers(model)
    if not mixers:
        return None
    mode = restart_mode(mixers.values(), device_type, installed)
    hand_boundaries_over(model, mixers.values())
    kinds = sorted({type(m).__name__ for m in mixers.values()})
    if mode == "segments":
        for mixer in mixers.values():
            if not getattr(mixer, _WRAPPED, False):
                mixer.__class__ = per_sample_class(type(mixer))
        logger.info(
            "Packing: %d linear-attention layers (%s) run once per packed sample (their kernels with boundaries, "
            "%s, are not in use on %s)",
            len(mixers),
            ", ".join(kinds),
            " + ".join(sorted(kernel_packages(mixers.values()))),
            device_type,
        )
    else:
        logger.info(
            "Packing: %d linear-attention layers (%s) restart at each packed sample in their kernels "
            "(cu_seq_lens_q, seq_idx)",
            len(mixers),
            ", ".join(kinds),
        )
    return mode


# A forward's own mask mapping: `"full_attention": create_causal_mask(**mask_kwargs)` and the like.
_MASK_ENTRY = re.compile(r"[\"'](\w+)[\"']\s*:\s*(create_\w+)\(\*\*mask_kwargs\)")
_MASK_KWARGS = re.compile(r"mask_kwargs\s*=\s*\{(.*?)\}", re.S)
# ...and its acceptance of a ready-made one: `if not isinstance(causal_mask_mapping := attention_mask, dict):`.
_TAKES_MAPPING = re.compile(r"isinstance\((?:\w+\s*:=\s*)?attention_mask,\s*dict\)")


@functools.cache
def _masks_without_positions(model_class: type) -> tuple[tuple[str, str], ...]:
    """The (layer type, mask function) pairs of a forward that builds its masks without `position_ids`."""
    try:
        source = inspect.getsource(model_class.forward)
    except (OSError, TypeError):
        return ()
    arguments = _MASK_KWARGS.search(source)
    if arguments is None or "position_ids" in arguments.group(1) or not _TAKES_MAPPING.search(source):
        return ()
    return tuple(_MASK_ENTRY.findall(source))


class PackedMasks:
    """A forward pre-hook that builds the model's mask mapping with `position_ids` (so packed samples get one
    block each) for a forward that builds it without them."""

    def __init__(self, module: nn.Module, entries: tuple[tuple[str, str], ...]):
        namespace = sys.modules[type(module).__module__]
        self.functions = {layer_type: getattr(namespace, name) for layer_type, name in entries}
        self.config = module.config

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        position_ids = kwargs.get("position_ids")
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        embeds = kwargs.get("inputs_embeds")
        if kwargs.get("attention_mask") is not None or position_ids is None or position_ids.dim() != 2:
            return None
        if kwargs.get("cache") is not None or kwargs.get("past_key_values") is not None:
            return None
        if embeds is None:  # only the shape, dtype and device are read
            weight = module.get_input_embeddings().weight
            embeds = torch.empty(*input_ids.shape, 0, dtype=weight.dtype, device=input_ids.device)
        mask_kwargs = {
            "config": self.config,
            "inputs_embeds": embeds,
            "attention_mask": None,
            "cache": None,
            "position_ids": position_ids,
        }
        kwargs["attention_mask"] = {kind: build(**mask_kwargs) for kind, build in self.functions.items()}
        return args, kwargs


def build_masks_from_positions(model: nn.Module) -> list[str]:
    """Hooks `PackedMasks` onto each module of `model` whose forward builds its masks without `position_ids`; the
    class names hooked (none for most models, which pass them)."""
    hooked = []
    for module in model.modules():
        entries = _masks_without_positions(type(module))
        if entries and not getattr(module, "_sft_packed_masks", False):
            module.register_forward_pre_hook(PackedMasks(module, entries), with_kwargs=True)
            module._sft_packed_masks = True
            hooked.append(type(module).__name__)
    if hooked:
        logger.info(
            "Packing: %s builds its attention masks without position_ids; they are built with them, so each "
            "packed sample attends only to itself",
            ", ".join(hooked),
        )
    return hooked


@torch.no_grad()
def mixer_leaks(model: nn.Module, tolerance: float) -> list[str]:
    """The linear-attention layer types of `model` that let one packed sample into the next, each with what was
    seen. One layer of each type runs on random hidden states of two samples (7 and 9 tokens) with the flat
    boundaries, alone on the second, and on both with no boundaries (carrying the first into the second): with the
    boundaries the second must be within `tolerance` of alone, relative to what carrying changes. Layer by layer,
    as a short convolution's leak into a sample's first tokens is too small to see in a whole model's logits."""
    found = {}
    for mixer in linear_mixers(model).values():
        found.setdefault(type(mixer).__name__, mixer)
    leaks = []
    hidden_size = model.config.get_text_config().hidden_size
    for kind, mixer in found.items():
        handoff = getattr(mixer, "_sft_boundary_handoff", None)
        if handoff is not None:  # these calls run the layer alone: no model forward's boundaries
            handoff.boundaries = {}
        weight = next(mixer.parameters())
        generator = torch.Generator().manual_seed(0)
        hidden = torch.randn(1, 16, hidden_size, generator=generator).to(weight.device, weight.dtype)
        positions = torch.tensor([*range(7), *range(9)], device=weight.device)
        starts = torch.tensor([0, 7, 16], dtype=torch.int32, device=weight.device)
        boundaries = {
            "cu_seq_lens_q": starts,
            "cu_seq_lens_k": starts,
            "max_length_q": 9,
            "max_length_k": 9,
            "seq_idx": (torch.cumsum(positions == 0, 0) - 1).to(torch.int32)[None],
        }
        try:
            packed = mixer(hidden_states=hidden, cache=None, attention_mask=None, **boundaries)[0, 7:].float()
        except (ValueError, RuntimeError, AssertionError, TypeError) as refused:
            # transformers' torch fallbacks refuse boundaries; a kernel may refuse the layout it is given
            leaks.append(f"{kind} ({type(refused).__name__}: {refused})")
            continue
        alone = mixer(hidden_states=hidden[:, 7:], cache=None, attention_mask=None)[0].float()
        carried = mixer(hidden_states=hidden, cache=None, attention_mask=None)[0, 7:].float()
        error, leak = (packed - alone).abs().max().item(), (carried - alone).abs().max().item()
        if not error <= tolerance * leak:
            leaks.append(f"{kind} (a sample's output changes by {error:.3g} when packed after another, {leak:.3g} "
                         "carried across)")  # fmt: skip
    return leaks
