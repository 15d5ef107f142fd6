"""sft/args.py's checks of GPU set-ups (FSDP, DeepSpeed, bf16), with the machine described to them: no GPU needed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import finetune_arguments

from sft.args import DEFAULT_OPTIM, check_arguments, check_bf16, check_deepspeed_optimizer, check_parallelism
from sft.errors import ConfigurationError

REPO = Path(__file__).resolve().parent.parent
BASE = ["--output_dir", "out", "--report_to", "none"]


def test_the_fsdp_launchers_set_up_passes_on_gpus():
    # finetune_fsdp.sh's flags: transformers writes no state_dict_type into fsdp_config; it saves a full state dict.
    _, _, training, lora = finetune_arguments(*BASE, "--fsdp", "--fsdp_config", str(REPO / "ds_configs/fsdp.json"))
    check_parallelism(training, lora, device_type="cuda", zero3=False)
    assert training.fsdp_config["version"] == 2  # FSDP2
    _, _, training, lora = finetune_arguments(*BASE, "--fsdp", "--use_lora")
    assert "state_dict_type" not in training.fsdp_config
    check_parallelism(training, lora, device_type="cuda", zero3=False)  # the old check refused this


def test_fsdp_refusals(tmp_path):
    sharded = tmp_path / "sharded.json"
    sharded.write_text(json.dumps({"state_dict_type": "SHARDED_STATE_DICT"}))
    _, _, training, lora = finetune_arguments(*BASE, "--fsdp", "--fsdp_config", str(sharded))
    with pytest.raises(ConfigurationError, match="state_dict_type SHARDED_STATE_DICT"):
        check_parallelism(training, lora, device_type="cuda", zero3=False)
    _, _, training, lora = finetune_arguments(*BASE, "--fsdp")
    with pytest.raises(ConfigurationError, match="--fsdp needs GPUs"):
        check_parallelism(training, lora, device_type="cpu", zero3=False)


def test_eight_bit_qlora_is_refused_under_zero3():
    _, _, training, lora = finetune_arguments(*BASE, "--use_lora", "--q_lora", "--bits", "8")
    with pytest.raises(ConfigurationError, match="--bits 8 does not run under DeepSpeed ZeRO-3"):
        check_parallelism(training, lora, device_type="cuda", zero3=True)
    check_parallelism(training, lora, device_type="cuda", zero3=False)  # ZeRO-2 or one process: fine


def test_optim_is_honoured_or_refused_under_deepspeed():
    # The shipped ZeRO-2/3 configs leave the optimizer to the Trainer, so --optim is what trains.
    for name in ("zero2", "zero3"):
        config = json.loads((REPO / f"ds_configs/{name}.json").read_text())
        assert "optimizer" not in config, name
        check_deepspeed_optimizer(config, "adamw_bnb_8bit")
    # A config with its own optimizer block would silently replace --optim: refused unless --optim is the default.
    offload = json.loads((REPO / "ds_configs/zero3_offload.json").read_text())
    check_deepspeed_optimizer(offload, DEFAULT_OPTIM)
    with pytest.raises(ConfigurationError, match="--optim adamw_bnb_8bit: zero3_offload.json has an optimizer block"):
        check_deepspeed_optimizer(offload, "adamw_bnb_8bit", "zero3_offload.json")


@pytest.mark.parametrize(
    ("cuda_bf16", "accelerator", "refusal"),
    [
        (True, True, None),  # A100/H100
        (False, True, "has no native bf16; use --fp16"),  # V100/T4: bf16 only emulated
        (None, False, "--bf16: no GPU found"),
        (None, True, None),  # another accelerator (MPS, XPU): the Trainer decides
    ],
)
def test_bf16_needs_native_support(cuda_bf16, accelerator, refusal):
    if refusal is None:
        check_bf16(cuda_bf16, accelerator, "Tesla V100")
    else:
        with pytest.raises(ConfigurationError, match=refusal):
            check_bf16(cuda_bf16, accelerator, "Tesla V100")


def test_data_path_takes_one_argument_per_source_spaces_kept(tmp_path):
    folder = tmp_path / "my data"
    folder.mkdir()
    (folder / "a b.jsonl").write_text((REPO / "data/example_chatml.jsonl").read_text())
    spaced = str(folder / "a b.jsonl")
    _, data, _, _ = finetune_arguments(*BASE, "--data_path", spaced, "data/example_chatml.jsonl", "--val_size", "2")
    assert data.data_path == [spaced, "data/example_chatml.jsonl"]
    _, data, _, _ = finetune_arguments(*BASE, "--data_path", "x.jsonl", "--eval_data_path", spaced, "y.jsonl")
    assert data.eval_data_path == [spaced, "y.jsonl"]
    # A config file's string: one existing path, or the older space-separated names.
    for value, expected in [(spaced, [spaced]), ("a.jsonl b.jsonl", ["a.jsonl", "b.jsonl"])]:
        config = tmp_path / "run.yaml"
        config.write_text(json.dumps({"data_path": value, "output_dir": "out"}))
        assert finetune_arguments(str(config)).data.data_path == expected


def test_sources_with_spaces_are_read_whole(tmp_path):
    from sft.data import load_train_eval

    folder = tmp_path / "my data"
    folder.mkdir()
    (folder / "a b.jsonl").write_text((REPO / "data/example_chatml.jsonl").read_text())
    examples = str(REPO / "data/example_chatml.jsonl")
    _, data, _, _ = finetune_arguments(*BASE, "--data_path", str(folder / "a b.jsonl"), examples)
    data.preprocessing_cache_dir = str(tmp_path / "cache")
    train, _ = load_train_eval(data, seed=0)
    assert sorted(set(train["file"])) == sorted([str(folder / "a b.jsonl"), examples])


def test_pad_to_multiple_of_must_be_positive():
    _, _, training, lora = finetune_arguments(*BASE, "--pad_to_multiple_of", "0")
    with pytest.raises(ConfigurationError, match="--pad_to_multiple_of must be 1 .no rounding. or more, got 0"):
        check_arguments(training, lora)
    _, _, training, lora = finetune_arguments(*BASE)
    assert training.pad_to_multiple_of is None  # decided by the device when training starts (sft.data.pad_multiple)
