"""Mixture-of-experts models under LoRA and Q-LoRA: what the adapters target (fused experts, router, shared
experts), what stays unquantised, and the router's auxiliary loss in the training loss.

transformers stores a MoE block's experts as fused 3-D parameters (experts x out x in), not as linear modules:
peft adapts them in place through `target_parameters` (lora.ParamWrapper), which takes no dropout, and
bitsandbytes cannot quantise them. The choices, made once per run and logged:

- experts: adapted (one LoRA per expert) with `--lora_target all`, the default; no dropout on them.
- router (the gate choosing each token's experts): never adapted. It is not a linear layer, and a LoRA on it would
  move the token-to-expert balance the model was trained with; its auxiliary loss is kept instead (below).
- shared experts (and dense MLP layers between MoE ones): adapted like every linear layer. Where peft would take
  their names for the experts' (its conversion of transformers-4 targets: gate_proj, up_proj, down_proj), their
  weights are adapted in place too, without dropout, so that each is adapted as itself and reloads the same.
- `--lora_target attention`: the attention (and linear-attention) projections only, on any model.
- modules peft refuses to adapt on the model (a Mamba layer's out_proj and conv1d, on Falcon-H1 and other Mamba
  hybrids), and linear modules whose weight the model's forward reads itself instead of calling them (Jamba's
  dt_proj: an adapter there would never run): left out of `all-linear`, said in one line; named in
  --lora_target_modules, refused.
"""

from __future__ import annotations

import functools
import inspect
import logging
import re
from dataclasses import dataclass, field

import torch
from transformers import PreTrainedModel

from sft.errors import ConfigurationError

logger = logging.getLogger(__name__)

LORA_TARGETS = ("all", "attention")

# A module whose qualified name has a part like these is attention: self_attn, linear_attn, attention, ...
_ATTENTION_PART = re.compile(r"(^|_)(attn|attention)($|_)")
_LAYER_PREFIX = re.compile(r"^(.*\.)?layers\.\d+\.")


@dataclass
class MoeLayout:
    """Where a model's mixture-of-experts parts are. Names are module (or parameter) names in `model`."""

    expert_parameters: list[str] = field(default_factory=list)  # the fused 3-D expert tensors
    routers: list[str] = field(default_factory=list)  # the gates choosing each token's experts
    shared_experts: list[str] = field(default_factory=list)  # experts every token goes through

    def __bool__(self) -> bool:
        return bool(self.expert_parameters)


def _is_linear(module: torch.nn.Module) -> bool:
    """nn.Linear and its bitsandbytes versions (Linear4bit, Linear8bitLt)."""
    return isinstance(module, torch.nn.Linear) or type(module).__name__.startswith("Linear")


def _layer_relative(name: str) -> str:
    """A name with its `...layers.N.` prefix removed: the same part in every layer."""
    return _LAYER_PREFIX.sub("", name)


def _leaves(names: list[str]) -> list[str]:
    return sorted({_layer_relative(name) for name in names})


def find_moe(model: torch.nn.Module) -> MoeLayout:
    """The model's fused experts, routers and shared experts; empty (false) for a dense model."""
    layout = MoeLayout()
    blocks = set()
    for module_name, module in model.named_modules():
        if "expert" not in f"{module_name.rpartition('.')[2]} {type(module).__name__}".lower():
            continue  # (a convolution's weights are 3-D too)
        for name, parameter in module.named_parameters(recurse=False):
            if parameter.dim() == 3:  # experts x out x in (biases of fused experts are 2-D)
                layout.expert_parameters.append(f"{module_name}.{name}")
                blocks.add(module_name.rpartition(".")[0])
    for block in sorted(blocks):
        for child_name, child in model.get_submodule(block).named_children():
            full = f"{block}.{child_name}"
            if "shared_expert" in child_name and not child_name.endswith("_gate"):
                layout.shared_experts.append(full)
            elif child_name in ("gate", "router") or child_name.endswith("_gate") or "Router" in type(child).__name__:
                layout.routers.append(full)
    return layout


@dataclass
class LoraTargets:
    """What peft's LoraConfig gets: module names (peft's lora.Linear, with dropout) and parameter names adapted in
    place (lora.ParamWrapper, without)."""

    target_modules: list[str] | str
    target_parameters: list[str] = field(default_factory=list)
    peft_moves_modules: bool = False  # peft turns some of target_modules into expert parameters

    @property
    def in_place(self) -> bool:
        """Whether peft adapts parameters in place (then no dropout there)."""
        return bool(self.target_parameters) or self.peft_moves_modules


def attention_modules(model: torch.nn.Module) -> list[str]:
    """The linear modules inside attention (self_attn, linear_attn, attention, ...), by name."""
    return [
        name
        for name, module in model.named_modules()
        if _is_linear(module) and any(_ATTENTION_PART.search(part) for part in name.split(".")[:-1])
    ]


def _names_for_peft(chosen: list[str], model: torch.nn.Module) -> list[str]:
    """Leaf names where a leaf name picks exactly the chosen modules; full names for the others."""
    linear_names = [name for name, module in model.named_modules() if _is_linear(module)]
    chosen_set = set(chosen)
    names = set()
    for name in chosen:
        leaf = name.rsplit(".", 1)[-1]
        same_leaf = [other for other in linear_names if other.rsplit(".", 1)[-1] == leaf]
        names.add(leaf if all(other in chosen_set for other in same_leaf) else name)
    return sorted(names)


def _renamed_by_peft(model: PreTrainedModel, names: list[str], r: int) -> set[str]:
    """Which of these target module names peft would turn into expert targets (its conversion of the MoE targets
    of transformers-4 checkpoints: gate_proj/up_proj/down_proj become the fused experts, gate the router)."""
    from peft import LoraConfig

    try:
        from peft.utils.transformers_weight_conversion import (
            convert_peft_config_for_transformers,
            get_model_conversion_mapping,
        )
    except ImportError:  # a peft without that conversion renames nothing
        return set()

    probe = LoraConfig(r=r, target_modules=list(names))
    convert_peft_config_for_transformers(probe, model, get_model_conversion_mapping(model))
    return set(names) - set(probe.target_modules or [])


def lora_targets(model: PreTrainedModel, scope: str, target_modules: list[str] | str, r: int) -> LoraTargets:
    """The targets of `--lora_target scope` (with `--lora_target_modules target_modules`) on this model, logged.

    Dense models with `all` keep `target_modules` as given (less what peft refuses on Mamba layers). On a MoE model
    `all-linear` means every linear layer but the output layer and the routers, and the fused experts; module names
    the user lists go to peft as they are (peft itself reads gate_proj/up_proj/down_proj as the experts' on some
    families: then without dropout)."""
    layout = find_moe(model)
    output = model.get_output_embeddings()
    peft_refuses = _refused_by_peft(model, target_modules)
    read_directly = _read_directly(model, target_modules)
    refused = sorted(set(peft_refuses) | set(read_directly))
    if scope == "attention":
        chosen = [name for name in attention_modules(model) if name.rsplit(".", 1)[-1] not in refused]
        if not chosen:
            raise ConfigurationError(
                "--lora_target attention: this model has no linear module inside an attention block "
                "(a module named *attn* or *attention*): use --lora_target all"
            )
        logger.info("LoRA targets: attention only (%s)", ", ".join(_leaves(chosen)))
        if layout:
            logger.info(
                "LoRA on a mixture of experts: experts, router and shared experts not adapted (--lora_target attention)"
            )
        return LoraTargets(_names_for_peft(chosen, model))
    why = []
    if peft_refuses:
        why.append(f"peft cannot adapt {', '.join(peft_refuses)} on a {model.config.model_type} model's Mamba layers")
    if read_directly:
        why.append(f"the model's forward reads the weights of {', '.join(read_directly)} itself, bypassing an adapter")
    if refused and target_modules != "all-linear":
        raise ConfigurationError(
            f"--lora_target_modules {' '.join(target_modules)}: {'; '.join(why)}; drop {' and '.join(refused)} "
            "(the default all-linear leaves them out)"
        )
    if refused:
        logger.info("LoRA targets: every linear layer but %s (%s)", ", ".join(refused), "; ".join(why))
    if not layout:
        if not refused:
            return LoraTargets(target_modules)
        linear = [
            name
            for name, module in model.named_modules()
            if _is_linear(module) and module is not output and name.rsplit(".", 1)[-1] not in refused
        ]
        return LoraTargets(_names_for_peft(linear, model))
    if target_modules != "all-linear":
        moved = _renamed_by_peft(model, target_modules, r) if isinstance(target_modules, list) else set()
        if moved:
            logger.info("LoRA on a mixture of experts: peft adapts %s as the fused experts", ", ".join(sorted(moved)))
        return LoraTargets(target_modules, peft_moves_modules=bool(moved))

    routers = set(layout.routers)
    linear = [
        name
        for name, module in model.named_modules()
        if _is_linear(module)
        and module is not output
        and name.rsplit(".", 1)[-1] not in refused
        and not any(name == router or name.startswith(f"{router}.") for router in routers)
    ]
    modules = _names_for_peft(linear, model)
    renamed = _renamed_by_peft(model, modules, r)
    in_place = sorted({_layer_relative(f"{name}.weight") for name in linear if _matches(name, renamed)})
    experts = _leaves(layout.expert_parameters)
    targets = LoraTargets([name for name in modules if name not in renamed], experts + in_place)
    shared = ": none in this model"
    if layout.shared_experts:
        how = "in place, without dropout (peft reads their names as the experts')" if in_place else "as linear modules"
        shared = f" ({', '.join(_leaves(layout.shared_experts))}) adapted {how}"
    # One rank-r LoRA per expert: r x (in + out) for each expert of each fused tensor.
    expert_lora = sum(r * shape[0] * (shape[1] + shape[2]) for shape in _shapes(model, layout.expert_parameters))
    logger.info(
        "LoRA on a mixture of experts: experts adapted (%s, one rank-%d LoRA per expert: %s parameters); router not "
        "adapted (%s: keeps the model's expert balance); shared experts%s",
        ", ".join(experts), r, f"{expert_lora:,}", ", ".join(_leaves(layout.routers)) or "none found", shared,
    )  # fmt: skip
    return targets


# `self.dt_proj.weight @ time_step` in a forward (Jamba's Mamba mixer): the module's weight used without its call.
_WEIGHT_READ = re.compile(r"self\.(\w+)\.weight\b")


@functools.cache
def _weights_read_in_forward(module_class: type) -> frozenset[str]:
    """The attributes whose `.weight` the class's forward reads itself (`self.dt_proj.weight`)."""
    try:
        return frozenset(_WEIGHT_READ.findall(inspect.getsource(module_class.forward)))
    except (OSError, TypeError):
        return frozenset()


def _read_directly(model: torch.nn.Module, target_modules: list[str] | str) -> list[str]:
    """The linear modules (last name parts) among the targets whose weight their parent's forward reads itself
    instead of calling them: a LoRA adapter on one would never run (untrained, and changing the model at merge)."""
    if not isinstance(target_modules, list) and target_modules != "all-linear":
        return []  # a regular expression: left to peft
    output = model.get_output_embeddings()
    read = set()
    for module in model.modules():
        for name in _weights_read_in_forward(type(module)):
            child = getattr(module, name, None)
            if isinstance(child, torch.nn.Module) and _is_linear(child) and child is not output:
                read.add(name)
    if isinstance(target_modules, list):
        read &= {name.rsplit(".", 1)[-1] for name in target_modules}
    return sorted(read)


def _refused_by_peft(model: torch.nn.Module, target_modules: list[str] | str) -> list[str]:
    """The module names (last parts) among the targets that peft refuses to adapt on this model: on Mamba-based
    models (Falcon-H1, ...) their out_proj and conv1d. peft's own rule is asked, for each name; `all-linear`
    means every linear module but the output layer."""
    try:
        from peft import LoraConfig
        from peft.tuners.tuners_utils import _check_lora_target_modules_mamba as check
    except ImportError:  # a peft without that rule refuses nothing
        return []
    if target_modules == "all-linear":
        output = model.get_output_embeddings()
        names = {name for name, module in model.named_modules() if _is_linear(module) and module is not output}
    elif isinstance(target_modules, list):
        names = set(target_modules)
    else:  # a regular expression: peft matches it, and says what it refuses
        return []
    probe = LoraConfig(r=1, target_modules=["probe"])
    refused = set()
    for leaf in {name.rsplit(".", 1)[-1] for name in names}:
        try:
            check(probe, model, leaf)
        except ValueError:
            refused.add(leaf)
    return sorted(refused)


def _shapes(model: torch.nn.Module, parameter_names: list[str]) -> list[tuple[int, ...]]:
    # Under ZeRO-3 a parameter's shape is empty and its real one is ds_shape.
    return [tuple(getattr(p, "ds_shape", p.shape)) for p in map(model.get_parameter, parameter_names)]


def _matches(module_name: str, peft_names: set[str]) -> bool:
    return any(module_name == name or module_name.endswith(f".{name}") for name in peft_names)


def set_linear_dropout(model: torch.nn.Module, dropout: float, targets: LoraTargets) -> None:
    """Dropout on the LoRA input of the linear modules, none on the parameters adapted in place: peft's
    ParamWrapper refuses any (the input of a weight adapted in place cannot be dropped for the adapter alone), so
    the adapter is made with none and the linear modules get theirs here. Logged in one line."""
    from peft.tuners.lora import LoraLayer, ParamWrapper

    linear = [
        module for module in model.modules() if isinstance(module, LoraLayer) and not isinstance(module, ParamWrapper)
    ]
    in_place = [module for module in model.modules() if isinstance(module, ParamWrapper)]
    for module in linear:
        for adapter in module.lora_dropout:
            module.lora_dropout[adapter] = torch.nn.Dropout(p=dropout) if dropout > 0 else torch.nn.Identity()
    logger.info(
        "LoRA dropout: %s on the %d linear modules, none on the %d parameters adapted in place (%s: peft applies no "
        "dropout there)",
        dropout, len(linear), len(in_place), ", ".join(targets.target_parameters) or "the experts",
    )  # fmt: skip


def prepare_quantized(model: PreTrainedModel, layout: MoeLayout, gradient_checkpointing: bool) -> PreTrainedModel:
    """peft's k-bit preparation, but the fused experts stay in their dtype: peft casts every unquantised weight to
    float32, which for a MoE model is nearly all of it (bitsandbytes quantises linear layers only)."""
    experts = set(layout.expert_parameters)
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(False)
        half = parameter.dtype in (torch.float16, torch.bfloat16)
        if half and name not in experts and type(parameter).__name__ != "Params4bit":
            parameter.data = parameter.data.to(torch.float32)  # norms, embeddings, routers: small, kept exact
    if gradient_checkpointing:
        model.enable_input_require_grads()
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    log_quantization(model, layout)
    return model


def log_quantization(model: PreTrainedModel, layout: MoeLayout) -> None:
    """One line: which kinds of weights bitsandbytes quantised, and which stay unquantised in which dtype."""
    quantized, plain = [], []
    for name, module in model.named_modules():
        if _is_linear(module):
            (plain if type(module) is torch.nn.Linear else quantized).append(name)
    experts = [model.get_parameter(name) for name in layout.expert_parameters]
    dtypes = ", ".join(sorted({str(parameter.dtype).removeprefix("torch.") for parameter in experts}))
    logger.info(
        "Q-LoRA on a mixture of experts: %d linear modules quantised (%s); not quantised: %d fused expert tensors "
        "(%s, in %s: bitsandbytes quantises linear layers only), %d routers, %d linear modules (%s)",
        len(quantized), ", ".join(_leaves(quantized)), len(experts), ", ".join(_leaves(layout.expert_parameters)),
        dtypes, len(layout.routers), len(plain), ", ".join(_leaves(plain)) or "none",
    )  # fmt: skip


def keep_router_aux_loss(model: PreTrainedModel) -> None:
    """The router's auxiliary (load-balancing) loss in the training loss, as the model's config intends: models
    that compute it do so only with `output_router_logits`, which their configs leave off; it is turned on here.
    Logged once, and said when a mixture of experts computes none."""
    config = model.config.get_text_config()
    coefficient = getattr(config, "router_aux_loss_coef", None)
    if coefficient and hasattr(config, "output_router_logits"):
        for each in {id(model.config): model.config, id(config): config}.values():
            each.output_router_logits = True
        logger.info(
            "MoE: the router's auxiliary loss (x %s, router_aux_loss_coef) is added to the model's training loss "
            "(output_router_logits on)",
            coefficient,
        )
    elif find_moe(model):
        logger.info("MoE: %s declares no router auxiliary loss; the loss is the language-model loss", config.model_type)
