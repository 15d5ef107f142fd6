"""Preference training's own pieces (dpo.py): its arguments, the reference model, and the Trainer that computes
the preference loss and logs rewards and answer lengths.

The reference answers one question, "the reference's summed log-prob of each row of this batch", in one of four
ways, chosen once by dpo.py and logged once:
- `AdapterReference`: LoRA; the same model with the trained adapter switched off (a fresh adapter: the starting
  model), or switched to a frozen copy of the SFT adapter the run continues (so the reference is the SFT model);
- `ModelReference`: full fine-tuning; a frozen second copy of the starting model in the compute dtype;
- `StartingModelReference`: full fine-tuning with precomputed log-probs; the policy before its first step;
- `PrecomputedReference` (`--precompute_reference`): one pass of one of the above as training starts, split across
  the processes, cached on disk under a key of the model, the tokenised data and the options, checked when read;
  batches then find their pairs' log-probs by `pair_ids`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sft.errors import ConfigurationError
from sft.loss import FusedLoss, check_fused_loss, fused_loss_for
from sft.preference_loss import LOSS_TYPES, needs_reference, preference_loss
from sft.preference_metrics import PreferenceMetrics
from sft.sequence_logps import MODEL_INPUTS, sequence_logps
from sft.training import FinetuneTrainer

logger = logging.getLogger(__name__)

REFERENCE_ADAPTER = "reference"
CORRELATION_WINDOW = 256  # pairs: the margin-length correlation is over each process's last this many trained pairs


@dataclass
class PreferenceArguments:
    loss_type: str = field(
        default="sigmoid",
        metadata={
            "help": "sigmoid (DPO), robust (DPO with --label_smoothing), hinge (SLiC), ipo, simpo or orpo (the "
            "last two need no reference model)."
        },
    )
    beta: float = field(default=0.1, metadata={"help": "Strength of the preference (IPO's tau, ORPO's lambda)."})
    label_smoothing: float = field(
        default=0.0, metadata={"help": "robust: the assumed fraction of flipped labels, in [0, 0.5)."}
    )
    simpo_gamma: float = field(default=0.5, metadata={"help": "simpo: the target reward margin gamma."})
    sft_weight: float = field(
        default=0.0, metadata={"help": "Adds this weight times the chosen answers' per-token NLL to the loss (RPO)."}
    )
    precompute_reference: bool = field(
        default=False,
        metadata={
            "help": "Compute the reference log-probs in one pass before training (train and eval data), cached on "
            "disk and reused by reruns; no reference model is kept during training."
        },
    )


def check_preference_arguments(args: PreferenceArguments) -> None:
    if args.loss_type not in LOSS_TYPES:
        raise ConfigurationError(f"--loss_type {args.loss_type!r}: expected one of {', '.join(LOSS_TYPES)}")
    if args.beta <= 0:
        raise ConfigurationError(f"--beta must be positive, got {args.beta}")
    if not 0 <= args.label_smoothing < 0.5:
        raise ConfigurationError(f"--label_smoothing must be in [0, 0.5), got {args.label_smoothing}")
    if args.label_smoothing and args.loss_type != "robust":
        raise ConfigurationError("--label_smoothing is used by --loss_type robust only")
    if args.sft_weight < 0:
        raise ConfigurationError(f"--sft_weight must not be negative, got {args.sft_weight}")
    if args.precompute_reference and not needs_reference(args.loss_type):
        raise ConfigurationError(f"--precompute_reference: --loss_type {args.loss_type} uses no reference model")


def reference_precomputed(args: PreferenceArguments, mode: str, sharding: str | None) -> bool:
    """Whether the reference's log-probs are precomputed: where asked, and implied where full fine-tuning shards the
    policy (`sharding`: "ZeRO-3", "FSDP" or None), as a whole second copy on every GPU would undo the sharding."""
    if not needs_reference(args.loss_type):
        return False
    if mode == "full" and sharding and not args.precompute_reference:
        logger.info("Full fine-tuning under %s keeps no second (reference) model: --precompute_reference implied",
                    sharding)  # fmt: skip
        return True
    return args.precompute_reference


def sft_adapter_of(model_path: str, lora_weight_path: str | None) -> tuple[str, str | None]:
    """(base model, SFT adapter folder or None): --model_name_or_path may be an adapter folder (an SFT output),
    whose adapter_config.json names its base; --lora_weight_path names the adapter directly."""
    config = Path(model_path, "adapter_config.json")
    if not config.is_file():
        return model_path, lora_weight_path
    if lora_weight_path:
        raise ConfigurationError(
            f"--model_name_or_path {model_path} is an adapter folder and --lora_weight_path names another: give one"
        )
    base = json.loads(config.read_text()).get("base_model_name_or_path")
    if not base:
        raise ConfigurationError(f"{config}: names no base model (base_model_name_or_path)")
    return base, model_path


def disable_dropout(model: nn.Module) -> int:
    """Sets every dropout's probability to 0 (policy and reference must score the same tokens alike); returns how
    many were active."""
    active = 0
    for module in model.modules():
        if isinstance(module, nn.Dropout) and module.p > 0:
            module.p, active = 0.0, active + 1
    return active


def _holds_adapter(module: nn.Module, name: str) -> bool:
    """Whether a peft layer or wrapper has weights of adapter `name` (LoRA matrices, token rows, saved modules)."""
    attributes = (*getattr(module, "adapter_layer_names", ()), "modules_to_save")
    return any(isinstance(getattr(module, a, None), (nn.ModuleDict, nn.ParameterDict, dict)) and name in getattr(
        module, a) for a in attributes)  # fmt: skip


@contextmanager
def active_adapter(model: nn.Module, name: str | None):
    """`model` (a peft model) answering with adapter `name`, or with no adapter when None. The switch sets which
    adapter each peft layer applies and nothing else: which parameters train is left as it is (peft's own
    set_adapter would also change that)."""
    if name is None:
        with model.disable_adapter():
            yield
        return
    switched = [m for m in model.modules() if hasattr(m, "_active_adapter") and _holds_adapter(m, name)]
    before = [module._active_adapter for module in switched]
    try:
        for module in switched:
            module._active_adapter = [name] if isinstance(module._active_adapter, list) else name
        yield
    finally:
        for module, active in zip(switched, before):
            module._active_adapter = active


class AdapterReference:
    """The policy's own model with its trained adapter off (None) or switched to a frozen adapter."""

    def __init__(self, unwrapped: nn.Module, adapter: str | None):
        self.unwrapped, self.adapter = unwrapped, adapter
        self.description = (
            "the starting model (the new adapter switched off)"
            if adapter is None
            else "base + the SFT adapter, kept frozen as a second adapter (the policy trains a copy of it)"
        )

    def logps(self, model: nn.Module, batch: dict, fused: FusedLoss | None) -> torch.Tensor:
        with torch.no_grad(), active_adapter(self.unwrapped, self.adapter):
            return sequence_logps(model, batch, fused)[0]


class ModelReference:
    """A frozen copy of the starting model (its own fused loss, checked on the first batch it scores)."""

    def __init__(self, model: nn.Module, description: str):
        self.model = model.eval().requires_grad_(False)
        self.fused = fused_loss_for(model)
        self.checked = False
        self.description = description

    def logps(self, model: nn.Module, batch: dict, fused: FusedLoss | None) -> torch.Tensor:
        device = next(self.model.parameters()).device
        batch = {key: value.to(device) if isinstance(value, torch.Tensor) else value for key, value in batch.items()}
        if not self.checked and self.fused is not None:
            self.fused = check_fused_loss(self.fused, self.model, model_inputs(batch))
        self.checked = True
        with torch.no_grad():
            return sequence_logps(self.model, batch, self.fused)[0]


class StartingModelReference:
    """Full fine-tuning with precomputed log-probs: the policy itself, before its first step, is the reference."""

    description = "the starting model itself, before training"
    follows_policy = True  # its log-probs are only right before the first optimizer step

    def logps(self, model: nn.Module, batch: dict, fused: FusedLoss | None) -> torch.Tensor:
        with torch.no_grad():
            return sequence_logps(model, batch, fused)[0]


PRECOMPUTE_FORMAT = 2


def model_inputs(batch: dict) -> dict:
    """What the model's own forward takes of a pair batch (with its labels), for the fused loss's check."""
    return {key: value for key, value in batch.items() if key in (*MODEL_INPUTS, "labels")}


def reference_key(parts: dict[str, Any]) -> str:
    """The cache key of precomputed reference log-probs: the model, the tokenised data and the options."""
    text = json.dumps({"format": PRECOMPUTE_FORMAT, **parts}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:24]


class PrecomputedReference:
    """Another reference's log-probs of every pair (train and eval data, numbered by their `pair_id` column), read
    from `cache_file` when it holds `key`, else computed in one pass when training starts: by then DeepSpeed or
    FSDP has set the model up, so its sharded parameters are gathered as for a training step (before, a ZeRO-3
    model's weights are empty shards). The pass is split across processes and gathered; batches then find their
    pairs' log-probs by `pair_ids`."""

    def __init__(self, source, datasets: list, collator, batch_size: int, cache_file: Path, key: str):
        self.source, self.datasets, self.collator = source, datasets, collator
        self.batch_size, self.cache_file, self.key = batch_size, cache_file, key
        self.pairs = sum(len(dataset) for dataset in datasets)
        self.description = source.description
        self.chosen = self.rejected = None
        self.settled = False
        if cache_file.is_file():
            saved = torch.load(cache_file, weights_only=True)
            if saved.get("key") == key and len(saved["chosen"]) == self.pairs:
                self.chosen, self.rejected = saved["chosen"], saved["rejected"]
                logger.info("Reference log-probs: precomputed before, read from %s", cache_file)
            else:
                logger.info("Reference log-probs: %s holds other ones (key or size differ): computed anew", cache_file)

    @property
    def ready(self) -> bool:
        return self.chosen is not None

    def settle(self, model: nn.Module, fused: FusedLoss | None, policy_trained: bool, write: bool) -> None:
        """Once, as training starts: the log-probs ready on every process, read or computed. The processes agree
        first: one whose machine has the cache file while another's has not would skip the pass the others wait
        in."""
        world, _ = _world()
        missing = not self.ready
        if world > 1:
            flag = torch.tensor([float(missing)], device=next(model.parameters()).device)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
            missing = bool(flag.item())
        if missing:
            self.fill(model, fused, policy_trained, write)
        self.settled = True

    def logps(self, model: nn.Module, batch: dict, fused: FusedLoss | None) -> torch.Tensor:
        ids = batch["pair_ids"]
        if self.chosen.device != ids.device:  # once: looked up where the batch is, no host read per batch
            self.chosen, self.rejected = self.chosen.to(ids.device), self.rejected.to(ids.device)
        return torch.cat([self.chosen[ids], self.rejected[ids]])

    def fill(self, model: nn.Module, fused: FusedLoss | None, policy_trained: bool, write: bool) -> None:
        """Computes every pair's log-probs with the source reference, this process taking every world-th batch
        (all take the same number of passes: ZeRO-3 gathers weights collectively), and gathers them. `write`:
        this process writes the cache file."""
        if policy_trained and getattr(self.source, "follows_policy", False):
            raise ConfigurationError(
                f"the precomputed reference log-probs ({self.cache_file}) are gone and the policy has trained since: "
                "they would be computed from a trained model. Restore the file, or pass --start_over"
            )
        world, rank = _world()
        batches = math.ceil(self.pairs / self.batch_size)
        passes = math.ceil(batches / world)
        device = next(model.parameters()).device
        found = torch.full((passes * self.batch_size, 3), -1.0, dtype=torch.float64, device=device)
        was_training = model.training
        model.eval()
        for step in range(passes):
            number = rank + step * world
            ids = list(range(number * self.batch_size, min((number + 1) * self.batch_size, self.pairs)))
            batch = self.collator([self._pair(k) for k in (ids or range(min(self.batch_size, self.pairs)))])
            logps = self.source.logps(model, {name: value.to(device) for name, value in batch.items()}, fused)
            if ids:  # a process out of batches repeats the first one, for the same number of passes
                half = logps.shape[0] // 2
                rows = slice(step * self.batch_size, step * self.batch_size + len(ids))
                found[rows] = torch.stack([torch.tensor(ids, device=device), logps[:half], logps[half:]], 1).double()
        model.train(was_training)
        if world > 1:
            gathered = [torch.empty_like(found) for _ in range(world)]
            torch.distributed.all_gather(gathered, found)
            found = torch.cat(gathered)
        found = found[found[:, 0] >= 0].cpu()
        self.chosen = torch.zeros(self.pairs, dtype=torch.float32)
        self.rejected = torch.zeros(self.pairs, dtype=torch.float32)
        self.chosen[found[:, 0].long()] = found[:, 1].float()
        self.rejected[found[:, 0].long()] = found[:, 2].float()
        if write:
            self.cache_file.parent.mkdir(parents=True, exist_ok=True)
            partial = self.cache_file.with_name(f"{self.cache_file.name}.{os.getpid()}.partial")
            torch.save({"key": self.key, "chosen": self.chosen, "rejected": self.rejected}, partial)
            os.replace(partial, self.cache_file)  # whole or not at all
        where = f", cached in {self.cache_file}" if write else ""
        over = f", over {world} processes" if world > 1 else ""
        logger.info("Reference log-probs: computed for %d pairs as training starts%s%s", self.pairs, over, where)
        self.source = None  # nothing but the log-probs is needed from now on

    def _pair(self, pair_id: int) -> dict:
        for dataset in self.datasets:
            if pair_id < len(dataset):
                return dataset[pair_id]
            pair_id -= len(dataset)
        raise IndexError(pair_id)


def numbered_pairs(datasets: list) -> list:
    """The datasets with a `pair_id` column numbering their pairs one after another (the precomputed reference's
    index)."""
    numbered, start = [], 0
    for dataset in datasets:
        numbered.append(dataset.add_column("pair_id", list(range(start, start + len(dataset)))))
        start += len(dataset)
    return numbered


def _world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size(), torch.distributed.get_rank()
    return 1, 0


class PreferenceTrainer(FinetuneTrainer):
    """FinetuneTrainer (checkpoints, NaN guard, signals, token counts) whose loss is a preference loss over the
    batch's pairs (rows: the chosen sides, then the rejected sides)."""

    def __init__(self, *args, preference: PreferenceArguments, reference=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.preference = preference
        self.reference = reference
        self.model_accepts_loss_kwargs = False  # our loss is a mean per pair: the Trainer scales accumulation
        # On the device until a log reads them, summed over the processes: sft.preference_metrics.
        self._metrics = {mode: PreferenceMetrics(CORRELATION_WINDOW) for mode in ("train", "eval")}

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        self.settle_fused_loss(model, model_inputs(inputs))
        if isinstance(self.reference, PrecomputedReference) and not self.reference.settled:
            trained = self.state.global_step > 0
            self.reference.settle(model, self.fused_loss, trained, write=self.args.local_process_index == 0)
        ref = None
        if needs_reference(self.preference.loss_type):
            ref = self.reference.logps(model, inputs, self.fused_loss)
        logps, lengths = sequence_logps(model, inputs, self.fused_loss)
        pairs = logps.shape[0] // 2
        ref = None if ref is None else ref.to(logps.device)
        p = self.preference
        result = preference_loss(
            p.loss_type,
            logps[:pairs],
            logps[pairs:],
            lengths[:pairs],
            lengths[pairs:],
            None if ref is None else ref[:pairs],
            None if ref is None else ref[pairs:],
            beta=p.beta,
            label_smoothing=p.label_smoothing,
            simpo_gamma=p.simpo_gamma,
            sft_weight=p.sft_weight,
        )
        self._record(result, logps.detach(), lengths, pairs)
        return (result.loss, {}) if return_outputs else result.loss

    def _record(self, result, logps: torch.Tensor, lengths: torch.Tensor, pairs: int) -> None:
        training = self.model.training
        self._metrics["train" if training else "eval"].add(
            result.chosen_rewards,
            result.rejected_rewards,
            logps[:pairs],
            logps[pairs:],
            lengths[:pairs],
            lengths[pairs:],
            keep_recent=training,
        )

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        mode = "train" if "loss" in logs else "eval" if "eval_loss" in logs else None
        if mode is not None:  # every process logs here: the summary's collectives meet
            prefix = "eval_" if mode == "eval" else ""
            summary = self._metrics[mode].summary(self.accelerator, self.args.device, correlation=mode == "train")
            for name, value in summary.items():
                logs[name if name == "length/margin_correlation" else prefix + name] = round(value, 4)
        super().log(logs, start_time)
