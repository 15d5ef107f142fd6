"""Disk space: the check before training, and a save that runs out of space."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sft.disk import CHECKPOINT_OVERHEAD_BYTES, DiskFull, check_room, checkpoint_bytes, disk_full_is_a_user_error


class TwoLayers(torch.nn.Module):
    """A frozen bf16 layer of 1000 weights and a trainable fp32 one of 100."""

    def __init__(self):
        super().__init__()
        self.frozen = torch.nn.Linear(100, 10, bias=False, dtype=torch.bfloat16).requires_grad_(False)
        self.trained = torch.nn.Linear(10, 10, bias=False)


def test_a_checkpoint_is_estimated_from_the_parameters_dtypes_and_the_optimizer():
    model = TwoLayers()
    adapter = 100 * 4 + 100 * 8  # the trainable weights in fp32, and Adam's two fp32 moments
    assert checkpoint_bytes(model, full=False) == adapter + CHECKPOINT_OVERHEAD_BYTES
    assert checkpoint_bytes(model, full=True) == 1000 * 2 + adapter + CHECKPOINT_OVERHEAD_BYTES
    assert checkpoint_bytes(model, full=False, with_optimizer=False) == 100 * 4 + CHECKPOINT_OVERHEAD_BYTES


def test_too_little_free_space_is_refused_naming_folder_need_and_free(tmp_path):
    check_room(tmp_path / "out", needed=10 * 2**20, free=11 * 2**20)
    with pytest.raises(DiskFull) as refused:
        check_room(tmp_path / "out", needed=10 * 2**20, free=3 * 2**20)
    assert str(refused.value).startswith(f"--output_dir {tmp_path / 'out'}: one checkpoint needs about 10.0 MiB")
    assert "3.0 MiB free" in str(refused.value)


@pytest.mark.parametrize(
    "error",
    [OSError(28, "No space left on device"), RuntimeError("[enforce fail at inline_container.cc:664] unexpected pos")],
)
def test_running_out_of_space_removes_the_partial_folder(tmp_path, error):
    partial = tmp_path / ".staging"
    partial.mkdir()
    (partial / "half.bin").write_bytes(b"x")
    with pytest.raises(DiskFull, match="no space left while saving checkpoint-4"):
        with disk_full_is_a_user_error(partial, "saving checkpoint-4"):
            raise error
    assert not partial.exists()


def test_other_errors_pass_through(tmp_path):
    with pytest.raises(RuntimeError, match="something else"):
        with disk_full_is_a_user_error(tmp_path / "partial", "saving"):
            raise RuntimeError("something else")


@pytest.fixture
def small_filesystem(tmp_path):
    """A 1.5 MiB tmpfs: room for the estimate of one tiny LoRA checkpoint, not for all of a run's (root only)."""
    folder = tmp_path / "small"
    folder.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1536k", "tmpfs", str(folder)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], check=True)


def test_a_save_onto_a_full_disk_is_one_error_and_keeps_the_last_checkpoint(
    tiny_model, small_filesystem, common_args, run_finetune
):
    output = small_filesystem / "out"
    flags = [*common_args(tiny_model, output, steps=20), "--use_lora", "--save_strategy", "steps", "--save_steps", "2"]
    with pytest.raises(DiskFull, match=r"no space left while saving checkpoint-\d+"):
        run_finetune(*flags)
    checkpoints = sorted(output.glob("checkpoint-*"), key=lambda path: int(path.name.split("-")[1]))
    assert checkpoints, "the first checkpoint fits"
    assert not (output / ".staging").exists()
    last = checkpoints[-1]
    assert json.loads((last / "trainer_state.json").read_text())["global_step"] == int(last.name.split("-")[1])
    assert load_file(last / "adapter_model.safetensors")
    assert Path(last, "optimizer.pt").is_file()
