"""Writing output folders and files whole or not at all: written under a temporary name next to where they go
(same file system), then renamed into place. Every script's outputs go through here: final models, checkpoints,
Qwen-1 conversions, pictures."""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from sft.disk import disk_full_is_a_user_error
from sft.errors import ConfigurationError, UserError

logger = logging.getLogger(__name__)

# What finetune.py writes next to its final model or adapter: mode, base model, data, steps, arguments.
RUN_INFO_FILE = "finetune_run.json"


def read_run_info(folder: str | os.PathLike) -> dict | None:
    """What finetune.py recorded in `folder` (a final output or a checkpoint), or None where it recorded nothing."""
    path = Path(folder, RUN_INFO_FILE)
    if not path.is_file():
        return None
    try:
        info = json.loads(path.read_text())
    except ValueError as error:  # a file edited by hand, or cut short by a full disk
        raise ConfigurationError(
            f"{path}: not a valid run record ({error}); restore or delete it, or choose another --output_dir"
        ) from None
    if not isinstance(info, dict):
        raise ConfigurationError(f"{path}: not a valid run record (a JSON object expected); delete it")
    return info


def write_run_info(folder: str | os.PathLike, run_info: dict) -> None:
    Path(folder, RUN_INFO_FILE).write_text(json.dumps(run_info, indent=2, default=str))


# Written last, so that whoever finds one of them finds the weights it points to already in place.
ENTRY_FILES = ("config.json", "adapter_config.json")


def publish(staging: str | os.PathLike, destination: str | os.PathLike) -> Path:
    """Moves a fully written staging folder's files into `destination`.

    A missing or empty destination is replaced by renaming the whole folder (atomic). Otherwise (a training
    output_dir that also holds checkpoints) each file is renamed into place, the entry files last, and a
    file already there is replaced; other files of the destination are kept.
    """
    staging, destination = Path(staging), Path(destination)
    if not destination.exists() or (destination.is_dir() and not any(destination.iterdir())):
        if destination.exists():
            destination.rmdir()
        destination.parent.mkdir(parents=True, exist_ok=True)
        os.replace(staging, destination)
        return destination
    names = sorted(os.listdir(staging), key=lambda name: name in ENTRY_FILES)
    for name in names:
        target = destination / name
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        os.replace(staging / name, target)
    staging.rmdir()
    return destination


class OutputFolderError(UserError, FileExistsError):
    """An output folder that is taken: a file, or a folder with files in it (and no --overwrite)."""


def check_new_output(
    destination: str | os.PathLike, overwrite: bool = False, inputs: tuple[str | os.PathLike, ...] = ()
) -> None:
    """Refuses a destination that is one of the run's `inputs`, a file, or a non-empty folder unless `overwrite`."""
    destination = Path(destination)
    for source in inputs:
        if Path(source).exists() and destination.resolve() == Path(source).resolve():
            raise ConfigurationError(f"{destination} is also an input of this run: write the output elsewhere")
    if destination.exists() and not destination.is_dir():
        raise OutputFolderError(f"{destination} exists and is not a folder")
    if destination.is_dir() and any(destination.iterdir()) and not overwrite:
        raise OutputFolderError(f"{destination} is not empty: choose another folder or pass --overwrite")


def staging_path(destination: str | os.PathLike) -> Path:
    """Where `destination` is written before it is renamed into place: next to it, hidden."""
    destination = Path(destination)
    return destination.parent / f".{destination.name}.tmp"


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def staging_folder(destination: str | os.PathLike) -> Path:
    """A fresh, empty folder next to `destination` (same file system, so moving it into place is a rename)."""
    staging = staging_path(destination)
    _remove(staging)  # what a killed run left behind
    staging.mkdir(parents=True)
    return staging


def replace_folder(staging: str | os.PathLike, destination: str | os.PathLike) -> Path:
    """Moves a fully written staging folder into `destination`; what was there before is deleted, not merged
    with (no stale shard of an earlier model is left next to the new one)."""
    destination = Path(destination)
    old = destination.parent / f".{destination.name}.old"
    if old.exists():
        shutil.rmtree(old)
    if destination.exists():
        os.replace(destination, old)
    publish(staging, destination)
    if old.exists():
        shutil.rmtree(old)
    return destination


@contextmanager
def written_whole(destination: str | os.PathLike, folder: bool = True) -> Iterator[Path]:
    """A temporary path to write `destination` into: a fresh empty folder (or, with folder=False, a file path not
    yet written). When the block ends it is renamed onto `destination`, replacing what was there; when the block
    raises, it is deleted and `destination` is left as it was."""
    destination = Path(destination)
    if folder:
        staging = staging_folder(destination)
    else:
        staging = staging_path(destination)
        _remove(staging)
        destination.parent.mkdir(parents=True, exist_ok=True)
    try:
        yield staging
        if folder:
            replace_folder(staging, destination)
        else:
            os.replace(staging, destination)
    finally:
        if staging.exists() or staging.is_symlink():
            _remove(staging)


def save_initial_adapter(model, folder: str, is_main_process: bool) -> str:
    """PiSSA/OLoRA: the adapter as initialised, before any step, saved to `folder` (the main process writes it).
    save_final converts the trained adapter against it."""
    if is_main_process:
        model.save_pretrained(folder)
    return folder


def save_final(trainer, tokenizer, output_dir: str, run_info: dict, initial_adapter: str | None = None) -> None:
    """Model (or adapter), tokenizer and chat template, written to a staging folder and moved into output_dir.

    `initial_adapter`: where a PiSSA/OLoRA adapter was saved before training (see save_initial_adapter); the final
    adapter is then converted by peft into a plain LoRA on the unchanged base model."""
    staging = staging_path(output_dir)
    if trainer.is_world_process_zero():
        staging_folder(output_dir)  # emptied of what a killed save left
    trainer.accelerator.wait_for_everyone()
    with disk_full_is_a_user_error(staging, "saving the final output"):
        trainer.save_model(str(staging))  # every rank takes part: ZeRO-3 gathers the weights here
        if initial_adapter and trainer.is_world_process_zero():
            # The adapter just saved is trained against base weights PiSSA/OLoRA changed: replaced by the
            # difference from the initial adapter, a LoRA of twice the rank on the original base (peft's conversion).
            peft_model = trainer.accelerator.unwrap_model(trainer.model)
            peft_model.save_pretrained(str(staging), path_initial_model_for_weight_conversion=initial_adapter)
            rank = peft_model.peft_config["default"].r
            logger.info(
                "Adapter converted to a plain LoRA of rank %d on the unchanged base model (PiSSA/OLoRA)", 2 * rank
            )
        if trainer.is_world_process_zero():
            tokenizer.save_pretrained(staging)
            write_run_info(staging, run_info)
    if trainer.is_world_process_zero():
        publish(staging, output_dir)
        logger.info("Saved the final %s to %s", "adapter" if run_info["mode"] != "full" else "model", output_dir)
