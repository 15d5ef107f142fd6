"""sft.outputs: output folders written whole, never over what the user has unless asked."""

from __future__ import annotations

import pytest

from sft.errors import UserError
from sft.outputs import (
    check_new_output,
    publish,
    read_run_info,
    replace_folder,
    staging_folder,
    write_run_info,
    written_whole,
)


def test_check_new_output(tmp_path):
    check_new_output(tmp_path / "new")
    (tmp_path / "empty").mkdir()
    check_new_output(tmp_path / "empty")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "a").write_text("a")
    with pytest.raises(FileExistsError, match="full is not empty: choose another folder or pass --overwrite"):
        check_new_output(tmp_path / "full")
    check_new_output(tmp_path / "full", overwrite=True)
    (tmp_path / "file").write_text("x")
    with pytest.raises(FileExistsError, match="not a folder"):
        check_new_output(tmp_path / "file", overwrite=True)
    with pytest.raises(ValueError, match="full is also an input of this run"):
        check_new_output(tmp_path / "full", overwrite=True, inputs=(tmp_path / "model", tmp_path / "." / "full"))


def test_staging_folder_is_fresh_and_next_to_the_destination(tmp_path):
    staging = staging_folder(tmp_path / "out")
    (staging / "leftover").write_text("x")
    again = staging_folder(tmp_path / "out")
    assert again == staging and again.parent == tmp_path and not any(again.iterdir())


def test_replace_folder_leaves_only_the_new_files(tmp_path):
    destination = tmp_path / "out"
    destination.mkdir()
    (destination / "model-00002-of-00002.safetensors").write_text("old")
    (destination / "config.json").write_text("old")
    staging = staging_folder(destination)
    (staging / "config.json").write_text("new")
    (staging / "model.safetensors").write_text("new")
    replace_folder(staging, destination)
    assert sorted(p.name for p in destination.iterdir()) == ["config.json", "model.safetensors"]
    assert (destination / "config.json").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_publish_into_a_new_folder(tmp_path):
    staging = staging_folder(tmp_path / "out")
    (staging / "a").write_text("a")
    publish(staging, tmp_path / "out")
    assert (tmp_path / "out" / "a").read_text() == "a" and not staging.exists()


def test_written_whole_replaces_a_folder_or_a_file_only_when_the_block_succeeds(tmp_path):
    folder, picture = tmp_path / "model", tmp_path / "curves.png"
    with written_whole(folder) as staging:
        (staging / "config.json").write_text("new")
    with written_whole(picture, folder=False) as temporary:
        temporary.write_text("new")
    with pytest.raises(RuntimeError):
        with written_whole(folder) as staging:
            (staging / "config.json").write_text("half")
            raise RuntimeError("killed while writing")
    with pytest.raises(RuntimeError):
        with written_whole(picture, folder=False) as temporary:
            temporary.write_text("half")
            raise RuntimeError("killed while writing")
    assert (folder / "config.json").read_text() == "new" and picture.read_text() == "new"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["curves.png", "model"]  # no staging left


def test_a_corrupt_run_record_is_a_user_error(tmp_path):
    assert read_run_info(tmp_path) is None
    write_run_info(tmp_path, {"mode": "lora"})
    assert read_run_info(tmp_path) == {"mode": "lora"}
    (tmp_path / "finetune_run.json").write_text('{"mode": "lo')
    with pytest.raises(UserError, match="finetune_run.json: not a valid run record"):
        read_run_info(tmp_path)
