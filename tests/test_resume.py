"""What a rerun does with its --output_dir: resume this run, refuse another, stop as finished, extend, start over."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch.distributed as dist
import torch.multiprocessing as mp

from sft.args import parse_arguments
from sft.errors import UserError
from sft.resume import decide_on_rank_zero, file_fingerprint, identity_differences, run_identity

EXAMPLES = "data/example_chatml.jsonl"


def checkpointed(common_args, model: str, output: Path, steps: int = 2) -> list[str]:
    """Flags of a short LoRA run that saves a checkpoint every 2 steps."""
    return [*common_args(model, output, steps=steps), "--use_lora", "--save_strategy", "steps", "--save_steps", "2"]


def folder_hashes(folder: Path) -> dict[str, tuple[str, int]]:
    """Every file under `folder`: its content hash and modification time."""
    return {
        str(path.relative_to(folder)): (hashlib.sha256(path.read_bytes()).hexdigest(), path.stat().st_mtime_ns)
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


@pytest.fixture(scope="module")
def finished_run(tiny_model, tmp_path_factory, common_args, run_finetune) -> tuple[Path, list[str]]:
    """A finished 2-step LoRA run with its checkpoint-2, and its flags."""
    output = tmp_path_factory.mktemp("resume") / "out"
    flags = checkpointed(common_args, tiny_model, output)
    run_finetune(*flags)
    return output, flags


@pytest.mark.parametrize(
    ("change", "field"),
    [
        (["--model_max_length", "200"], "model_max_length: 256 there, 200 now"),
        (["--lora_r", "4"], '"lora_r": 8'),
        (["--data_path", "{other_data}"], "data:"),
        (["--model_name_or_path", "{other_model}"], "base_model:"),
        (["--learning_rate", "1e-3"], "learning_rate: 0.005 there, 0.001 now"),
        (["--train_on", "all"], 'train_on: "assistant" there, "all" now'),
        (["--lora_target", "attention"], '"lora_target": "attention"'),
        (["--max_samples", "5"], '"max_samples": 5'),
        (["--val_size", "2"], '"val_size": 2.0'),
    ],
)
def test_a_rerun_of_another_run_is_refused_naming_the_field(finished_run, tmp_path, run_finetune, change, field):
    output, flags = finished_run
    other_data = tmp_path / "data.jsonl"
    other_data.write_text("".join(reversed(Path(EXAMPLES).read_text().splitlines(keepends=True))))
    other_model = tmp_path / "model"
    shutil.copytree(flags[flags.index("--model_name_or_path") + 1], other_model)
    change = [arg.format(other_data=other_data, other_model=other_model) for arg in change]
    before = folder_hashes(output)
    with pytest.raises(UserError) as refused:
        run_finetune(*flags, *change)
    message = str(refused.value)
    assert f"--output_dir {output} holds another run" in message and field in message
    assert "another --output_dir" in message and "--start_over" in message
    assert folder_hashes(output) == before


def test_a_finished_run_is_recognised_and_left_untouched(finished_run, run_finetune, caplog):
    output, flags = finished_run
    before = folder_hashes(output)
    caplog.set_level("WARNING")
    # Logging and saving cadence may differ: still the same run.
    assert run_finetune(*flags, "--logging_steps", "5", "--save_steps", "3") is None
    assert "already holds this run, finished: nothing to do" in caplog.text
    assert folder_hashes(output) == before


def test_raising_max_steps_continues_a_finished_run_and_records_the_whole_run(
    tiny_model, tmp_path, common_args, run_finetune, caplog
):
    output = tmp_path / "out"
    flags = checkpointed(common_args, tiny_model, output, steps=2)
    run_finetune(*flags)
    first = json.loads((output / "finetune_run.json").read_text())
    caplog.set_level("INFO", logger="finetune")
    trainer = run_finetune(*flags, "--max_steps", "4")
    assert f"Resuming from {output / 'checkpoint-2'}" in caplog.text
    assert trainer.state.global_step == 4

    record = json.loads((output / "finetune_run.json").read_text())
    assert record["global_step"] == 4
    # 2 steps of 4 samples are one pass over the 8 examples: 4 steps are two.
    assert (record["trained_tokens"], record["tokens"]) == (2 * first["trained_tokens"], 2 * first["tokens"])
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 4
    assert record["train_loss"] == pytest.approx(sum(losses) / 4, rel=1e-3)


def test_train_loss_and_tokens_cover_every_session(tiny_model, tmp_path, common_args, run_finetune):
    straight = tmp_path / "straight"
    run_finetune(*checkpointed(common_args, tiny_model, straight, steps=4))
    resumed = tmp_path / "resumed"
    run_finetune(*checkpointed(common_args, tiny_model, resumed, steps=4))
    # As if stopped after step 2: the final output and the last checkpoint gone.
    shutil.rmtree(resumed / "checkpoint-4")
    (resumed / "finetune_run.json").unlink()
    trainer = run_finetune(*checkpointed(common_args, tiny_model, resumed, steps=4))
    assert [entry["step"] for entry in trainer.state.log_history if "loss" in entry] == [1, 2, 3, 4]
    got = json.loads((resumed / "finetune_run.json").read_text())
    expected = json.loads((straight / "finetune_run.json").read_text())
    assert got["train_loss"] == pytest.approx(expected["train_loss"], rel=1e-4)
    assert (got["trained_tokens"], got["tokens"]) == (expected["trained_tokens"], expected["tokens"])


def test_resume_from_checkpoint_path_is_honoured_and_checked(finished_run, tmp_path, run_finetune, caplog):
    output, flags = finished_run
    elsewhere = tmp_path / "continued"
    new_flags = [*flags, "--output_dir", str(elsewhere), "--max_steps", "4"]
    with pytest.raises(UserError, match="learning_rate: 0.005 there, 0.001 now"):
        run_finetune(*new_flags, "--resume_from_checkpoint", str(output / "checkpoint-2"), "--learning_rate", "1e-3")
    caplog.set_level("INFO", logger="finetune")
    trainer = run_finetune(*new_flags, "--resume_from_checkpoint", str(output / "checkpoint-2"))
    assert f"Resuming from {output / 'checkpoint-2'}" in caplog.text
    assert trainer.state.global_step == 4
    assert sorted(path.name for path in elsewhere.glob("checkpoint-*")) == ["checkpoint-4"]  # 2 came from elsewhere


@pytest.mark.parametrize("flag", [["--start_over"], ["--resume_from_checkpoint", "false"]])
def test_start_over_moves_the_earlier_run_aside(tiny_model, tmp_path, common_args, run_finetune, caplog, flag):
    output = tmp_path / "out"
    flags = checkpointed(common_args, tiny_model, output)
    run_finetune(*flags)
    before = folder_hashes(output)
    caplog.set_level("INFO")
    # Another data set is no refusal when starting over.
    trainer = run_finetune(*flags, *flag, "--learning_rate", "1e-3")
    assert "Resuming" not in caplog.text
    assert [entry["step"] for entry in trainer.state.log_history if "loss" in entry] == [1, 2]
    (moved,) = tmp_path.glob("out.previous-*")
    assert f"was moved to {moved}" in caplog.text
    assert folder_hashes(moved) == before


def test_the_best_checkpoint_is_a_real_folder_and_survives_a_resume(tiny_model, tmp_path, common_args, run_finetune):
    output = tmp_path / "out"
    flags = [*checkpointed(common_args, tiny_model, output, steps=6), "--eval_data_path", EXAMPLES]
    flags += ["--eval_strategy", "steps", "--eval_steps", "2", "--load_best_model_at_end", "--save_total_limit", "1"]
    flags += ["--metric_for_best_model", "loss"]
    run_finetune(*flags, "--max_steps", "4")
    # Stopped after step 4: its last checkpoint stays, its final output never came.
    (output / "finetune_run.json").unlink()
    state = json.loads((output / "checkpoint-4" / "trainer_state.json").read_text())
    best = state["best_model_checkpoint"]
    assert ".staging" not in best and Path(best).parent == output and Path(best).is_dir()

    trainer = run_finetune(*flags)
    assert trainer.state.global_step == 6
    best = trainer.state.best_model_checkpoint
    assert best is not None and ".staging" not in best and Path(best).is_dir()  # kept by the rotation
    scores = {entry["step"]: entry["eval_loss"] for entry in trainer.state.log_history if "eval_loss" in entry}
    assert Path(best).name == f"checkpoint-{min(scores, key=scores.get)}"


def test_identity_compares_data_by_content_not_by_path(tmp_path):
    first, second = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    first.write_text('{"x": 1}\n')
    second.write_text('{"x": 1}\n')
    recorded, current = {"data": [file_fingerprint(first)]}, {"data": [file_fingerprint(second)]}
    assert identity_differences(recorded, current) == []
    second.write_text('{"x": 2}\n')
    assert [line.split(":")[0] for line in identity_differences(recorded, {"data": [file_fingerprint(second)]})] == [
        "data"
    ]
    # A field an older record lacks is not a difference.
    assert identity_differences({}, {"world_size": 2}) == []


def _decide_in_process(rank: int, store: str, results: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        calls = []
        chosen = decide_on_rank_zero(lambda: calls.append(rank) or f"decided by {rank}")
        try:
            decide_on_rank_zero(lambda: (_ for _ in ()).throw(UserError("refused on rank 0")))
            refused = None
        except UserError as error:
            refused = str(error)
        Path(results, str(rank)).write_text(json.dumps({"chosen": chosen, "calls": calls, "refused": refused}))
    finally:
        dist.destroy_process_group()


def test_rank_zero_decides_and_the_other_ranks_receive_it(tmp_path):
    mp.spawn(_decide_in_process, args=(str(tmp_path / "store"), str(tmp_path)), nprocs=2)
    outcomes = [json.loads((tmp_path / str(rank)).read_text()) for rank in (0, 1)]
    assert [outcome["chosen"] for outcome in outcomes] == ["decided by 0", "decided by 0"]
    assert [outcome["calls"] for outcome in outcomes] == [[0], []]  # only rank 0 looked at the folder
    assert [outcome["refused"] for outcome in outcomes] == ["refused on rank 0", "refused on rank 0"]


def _identity_of(tmp_path: Path, data_path: str) -> dict:
    model_args, data_args, training_args, lora_args = parse_arguments(
        ["--model_name_or_path", str(tmp_path), "--data_path", data_path, "--output_dir", str(tmp_path / "out")]
    )
    return run_identity("full", str(tmp_path), None, data_args, training_args, lora_args)


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("num_samples", 7),
        ("columns", {"dialogue": "messages"}),
        ("system_prompt", "Be brief."),
        ("split", "validation"),
        ("subset", "chat"),
    ],
)
def test_a_data_config_option_that_changes_rows_changes_the_identity(tmp_path, option, value):
    data = tmp_path / "data.jsonl"
    data.write_text(Path(EXAMPLES).read_text())
    config = tmp_path / "mix.yaml"
    config.write_text(json.dumps({"sources": [{"path": str(data)}]}))
    before = _identity_of(tmp_path, str(config))
    config.write_text(json.dumps({"sources": [{"path": str(data), option: value}]}))
    differences = identity_differences(before, _identity_of(tmp_path, str(config)))
    assert [line.split(":")[0] for line in differences] == ["data_selection"]
    assert json.dumps(value) in differences[0]


def test_a_hub_dataset_is_identified_by_its_resolved_revision(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    refs = tmp_path / "hub" / "datasets--someone--chats" / "refs"
    refs.mkdir(parents=True)
    (refs / "main").write_text("a" * 40)
    before = _identity_of(tmp_path, "someone/chats")
    assert before["data_selection"]["sources"][0]["revision"] == "a" * 40
    (refs / "main").write_text("b" * 40)
    differences = identity_differences(before, _identity_of(tmp_path, "someone/chats"))
    assert len(differences) == 1 and differences[0].startswith("data_selection:") and "b" * 40 in differences[0]
