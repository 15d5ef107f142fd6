"""What an output folder holds, and what a run may do with it: resume, extend, stop as finished, or start over.

A run's identity is what makes its checkpoints mean something: the base model, the data (sources and content,
and which of their rows are selected: sample limits, validation cut, a data config's options, a hub dataset's
revision), the LoRA configuration, the options that change the rows trained on and the optimisation that the saved
optimizer state belongs to. finetune.py writes it into every checkpoint and its final output
(finetune_run.json, key "identity") and, before the model loads, refuses to continue a run whose identity
differs, naming each field with both values. Logging, saving and evaluation cadence and the number of epochs or
steps may differ: they do not change what the saved state means.

Rank 0 alone reads the folder, decides and cleans up (`decide_on_rank_zero`); the other ranks receive its
decision, so that on a shared file system no two processes move the same folder.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any, NamedTuple

import torch.distributed as dist

from sft.data import Source, parse_sources
from sft.data.files import file_fingerprint
from sft.data.sources import glob_files
from sft.errors import ConfigurationError, UserError
from sft.outputs import read_run_info
from sft.training import last_complete_checkpoint

logger = logging.getLogger(__name__)

# Training arguments that belong to the saved optimizer and data position: a resume with others is refused.
OPTIMISATION_FIELDS = (
    "learning_rate",
    "lr_scheduler_type",
    "warmup_steps",
    "weight_decay",
    "optim",
    "per_device_train_batch_size",
    "gradient_accumulation_steps",
    "seed",
)

# Spellings of --resume_from_checkpoint that mean "do not resume" / "resume from the last checkpoint".
NO_RESUME = ("false", "no", "0", "none")
LAST_CHECKPOINT = ("true", "yes", "1", "last")


def data_fingerprint(sources: list[str]) -> list[dict[str, Any]]:
    """Each data source's fingerprint: a local file's content, a folder's or a glob's files, or a name as given (a
    hub data set is recorded by name). A data config file's sources are fingerprinted, not the config."""
    fingerprints = []
    for source in sources:
        path = Path(source)
        if path.is_file():
            fingerprints.append(file_fingerprint(path))
        elif path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.is_file())
            fingerprints.append({"path": str(path.resolve()), "files": [file_fingerprint(p) for p in files]})
        elif (files := glob_files(source)) is not None:
            fingerprints.append({"glob": source, "files": [file_fingerprint(p) for p in files]})
        else:
            fingerprints.append({"name": source})
    return fingerprints


def hub_revision(kind: str, repo_id: str, ref: str = "main") -> str | None:
    """The commit the local hub cache resolves `repo_id`'s `ref` to (`kind`: "models" or "datasets"), which is
    what an offline load reads; None where the cache has no record of it."""
    try:
        from huggingface_hub import constants

        refs = Path(constants.HF_HUB_CACHE, f"{kind}--" + repo_id.replace("/", "--"), "refs", ref)
        return refs.read_text().strip() if refs.is_file() else None
    except (ImportError, OSError):
        return None


def model_identity(model: str) -> dict[str, Any]:
    """The base model as resolved: a local folder's absolute path and its config's hash, or a hub id and the
    revision the local hub cache resolves it to (None where it has no record)."""
    if os.path.isdir(model):
        config = Path(model, "config.json")
        return {"model": os.path.abspath(model), "config": file_fingerprint(config).get("sha256") if config.is_file()
                else None}  # fmt: skip
    return {"model": model, "revision": hub_revision("models", model)}


def data_selection(sources: list[Source], data_args: Any) -> dict[str, Any]:
    """Which rows of the data a run trains on, beyond the files' content: --max_samples, --val_size, each source's
    options from a data config (split, subset, columns, num_samples, system_prompt) and a hub dataset's revision
    as the local hub cache resolves it."""
    selected = []
    for source in sources:
        options = {name: value for name, value in asdict(source).items() if name != "path"}
        if not Path(source.path).exists() and glob_files(source.path) is None:  # a hub dataset id
            options["revision"] = hub_revision("datasets", source.path)
        selected.append(options)
    return {
        "max_samples": getattr(data_args, "max_samples", None),
        "val_size": getattr(data_args, "val_size", None),
        "sources": selected,
    }


# Data options that change the rows trained on.
ROW_OPTIONS = ("train_on", "packing", "system_prompt", "drop_long_samples", "fold_system_prompt")
# The LoRA options the saved adapter and its optimizer state belong to.
LORA_OPTIONS = (
    "lora_r",
    "lora_alpha",
    "lora_dropout",
    "lora_target_modules",
    "lora_bias",
    "train_special_tokens",
    "lora_weight_path",
)


def _plain(value: Any) -> Any:
    """A value as it reads back from JSON (enums by their value), so that a record compares with a new run."""
    return json.loads(json.dumps(value, default=lambda item: getattr(item, "value", str(item))))


def run_identity(
    mode: str, model: str, chat_template: str | None, data_args: Any, training_args: Any, lora_args: Any
) -> dict[str, Any]:
    """The identity recorded with a run's checkpoints and output (see the module docstring). `model` is the base
    model as given (a Qwen-1 folder rather than its conversion), with the path of a local folder made absolute."""
    template_hash = hashlib.sha256(chat_template.encode()).hexdigest()[:16] if chat_template else None
    sources = parse_sources(data_args.data_path)
    identity = {
        "mode": mode,
        "base_model": model_identity(model),
        "data": data_fingerprint([source.path for source in sources]),
        # A field of its own, so that a record written before it existed is not compared on it.
        "data_selection": data_selection(sources, data_args),
        "lora": {name: getattr(lora_args, name) for name in LORA_OPTIONS} if training_args.use_lora else None,
        "model_max_length": training_args.model_max_length,
        **{name: getattr(data_args, name) for name in ROW_OPTIONS},
        "chat_template": template_hash,
        **{name: getattr(training_args, name) for name in OPTIMISATION_FIELDS},
        "world_size": training_args.world_size,
    }
    if identity["lora"] is not None and getattr(lora_args, "lora_target", "all") != "all":
        identity["lora"]["lora_target"] = lora_args.lora_target  # recorded when not the default: older runs match
    return _plain(identity)


def _comparable(field: str, value: Any) -> Any:
    """What of a recorded value must match: data by content (a moved file is the same data)."""
    if field == "data" and isinstance(value, list):
        return [{key: item for key, item in entry.items() if key != "path"} for entry in value]
    return value


def identity_differences(recorded: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """`field: recorded -> current` for each field that differs (a field only one side has is not compared:
    an older record, or a newer option)."""
    differences = []
    for field, value in current.items():
        if field in recorded and _comparable(field, recorded[field]) != _comparable(field, value):
            differences.append(f"{field}: {json.dumps(recorded[field])} there, {json.dumps(value)} now")
    return differences


def check_same_run(recorded: dict[str, Any] | None, identity: dict[str, Any], where: str) -> None:
    """Refuses to continue the run recorded in `where` when its identity differs from this run's."""
    if not recorded or "identity" not in recorded:
        return
    differences = identity_differences(recorded["identity"], identity)
    if differences:
        raise ConfigurationError(
            f"{where} holds another run: " + "; ".join(differences) + ". Choose another --output_dir, or pass "
            "--start_over to move that run aside and train from scratch"
        )


class ResumePlan(NamedTuple):
    """What the run does: resume from `checkpoint` (None: from scratch), or nothing when `finished`."""

    checkpoint: str | None
    finished: bool = False
    moved_to: str | None = None


def move_aside(output_dir: str) -> str | None:
    """Renames a folder holding an earlier run to `<output_dir>.previous-<UTC time>` (kept, never deleted) and
    returns the new name; None when there was nothing to move."""
    folder = Path(output_dir)
    if not folder.is_dir() or not any(folder.iterdir()):
        return None
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    target = folder.parent / f"{folder.name}.previous-{stamp}"
    number = 1
    while target.exists():
        number += 1
        target = folder.parent / f"{folder.name}.previous-{stamp}-{number}"
    os.replace(folder, target)
    folder.mkdir()
    return str(target)


def extends(recorded: dict[str, Any], max_steps: int, num_train_epochs: float) -> bool:
    """Whether a run asking for `max_steps` (or, when ≤ 0, `num_train_epochs`) goes past the recorded one."""
    if max_steps > 0:
        return max_steps > int(recorded.get("global_step", 0))
    return num_train_epochs > float(recorded.get("epoch", 0.0)) + 1e-6


def plan_resume(
    output_dir: str,
    identity: dict[str, Any],
    *,
    resume_from_checkpoint: str | None,
    start_over: bool,
    max_steps: int,
    num_train_epochs: float,
) -> ResumePlan:
    """Decides what this run does with `output_dir`: only rank 0 calls it (it may move folders aside)."""
    choice = (resume_from_checkpoint or "").strip()
    explicit = bool(choice) and choice.lower() not in LAST_CHECKPOINT + NO_RESUME  # a checkpoint's path
    if start_over or choice.lower() in NO_RESUME:
        moved_to = move_aside(output_dir)
        if moved_to:
            logger.warning("--start_over: the earlier run in %s was moved to %s", output_dir, moved_to)
        return ResumePlan(None, moved_to=moved_to)

    finished = read_run_info(output_dir)
    check_same_run(finished, identity, f"--output_dir {output_dir}")
    if finished is not None and "identity" not in finished and finished.get("mode") != identity["mode"]:
        raise ConfigurationError(
            f"--output_dir {output_dir} holds a finished {finished.get('mode')} run; this run is "
            f"{identity['mode']}: choose another --output_dir, or pass --start_over"
        )

    if explicit:
        checkpoint = choice
        if not Path(checkpoint, "trainer_state.json").is_file():
            raise ConfigurationError(
                f"--resume_from_checkpoint {checkpoint}: not a complete checkpoint (no trainer_state.json in it)"
            )
    else:
        checkpoint = last_complete_checkpoint(output_dir)

    if checkpoint:
        check_same_run(read_run_info(checkpoint), identity, checkpoint)
        check_checkpoint_mode(checkpoint, identity["mode"])

    if finished is not None and "global_step" in finished and not explicit:
        if not extends(finished, max_steps, num_train_epochs):
            return ResumePlan(None, finished=True)
        step = _checkpoint_step(checkpoint)
        if step != int(finished["global_step"]):
            raise ConfigurationError(
                f"--output_dir {output_dir} holds a finished run of {finished['global_step']} steps and no "
                "checkpoint of its last step to continue it from (it was run with --save_strategy no?): "
                "choose another --output_dir, or pass --start_over"
            )
    return ResumePlan(checkpoint)


def check_checkpoint_mode(checkpoint: str, mode: str) -> None:
    """Refuses a checkpoint of another mode (full, LoRA, Q-LoRA), told by its record or, where it has none
    (another tool's), by its files."""
    recorded = read_run_info(checkpoint)
    if recorded is not None:
        checkpoint_mode = recorded.get("mode")
        same_mode = checkpoint_mode == mode
    else:
        holds_adapter = Path(checkpoint, "adapter_config.json").is_file()
        checkpoint_mode = "LoRA" if holds_adapter else "full"
        same_mode = holds_adapter == (mode != "full")
    if not same_mode:
        raise ConfigurationError(
            f"{checkpoint} is from a {checkpoint_mode} run; this run is {mode}: choose another --output_dir, "
            "or pass --start_over to train from scratch there"
        )


def decide_resume(training_args: Any, identity: dict[str, Any]) -> ResumePlan:
    """finetune.py's decision (made on rank 0, received by every rank): `plan_resume` on its arguments."""
    plan = decide_on_rank_zero(
        lambda: plan_resume(
            training_args.output_dir,
            identity,
            resume_from_checkpoint=training_args.resume_from_checkpoint,
            start_over=training_args.start_over,
            max_steps=training_args.max_steps,
            num_train_epochs=training_args.num_train_epochs,
        )
    )
    if plan.finished:
        logger.warning(
            "%s already holds this run, finished: nothing to do. To train it further raise --max_steps or "
            "--num_train_epochs; to train it again pass --start_over",
            training_args.output_dir,
        )
    return plan


def _checkpoint_step(checkpoint: str | None) -> int | None:
    if not checkpoint:
        return None
    try:
        return int(json.loads(Path(checkpoint, "trainer_state.json").read_text())["global_step"])
    except (OSError, ValueError, KeyError):
        return None


def decide_on_rank_zero(decide: Callable[[], Any]) -> Any:
    """Runs `decide()` on rank 0 only and hands its result to every rank (torch.distributed, when started).
    A UserError raised on rank 0 is raised on every rank, so that none waits for the others forever."""
    distributed = dist.is_available() and dist.is_initialized()
    if not distributed or dist.get_rank() == 0:
        try:
            outcome: tuple[Any, str | None] = (decide(), None)
        except UserError as error:
            if not distributed:
                raise
            outcome = (None, str(error))
    else:
        outcome = (None, None)
    if distributed:
        box = [outcome]
        dist.broadcast_object_list(box, src=0)
        outcome = box[0]
    result, error = outcome
    if error is not None:
        raise ConfigurationError(error)
    return result
