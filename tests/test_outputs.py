"""sft.outputs: output folders written whole, never over what the user has unless asked."""

from __future__ import annotations

import pytest

from sft.outputs import check_new_output, publish, replace_folder, staging_folder


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
