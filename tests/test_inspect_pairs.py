"""sft.inspect on preference pairs: it shows the pairs dpo.py trains on, and its report counts what dpo.py decides."""

from __future__ import annotations

import json
import re
import shutil
from collections import Counter
from pathlib import Path

import pytest

import dpo
from sft.data import IGNORE_INDEX, load_train_eval
from sft.data.pairs import pair_sample, tokenize_pair, tokenize_pairs
from sft.errors import UserError
from sft.inspect import Inspection, parse_arguments, run_inspection
from sft.inspect_pairs import PairInspection, inspect_pairs, render_pair, shared_prompt_length
from sft.modeling import load_tokenizer

MAX_LENGTH = 96


def write_pairs(path: Path) -> Path:
    """Pairs in every form, some of which truncation shortens (turns dropped, answers cut) or drops."""
    long_turns = []
    for turn in range(4):
        long_turns += [{"from": "human", "value": f"Turn {turn}: " + "tell me more " * 4},
                       {"from": "gpt", "value": "Here is more. " * 4}]  # fmt: skip
    records = [
        {"conversations": [{"from": "human", "value": "Hi"}], "chosen": {"from": "gpt", "value": "Hello, friend."},
         "rejected": {"from": "gpt", "value": "Go away."}},
        {"conversations": [*long_turns, {"from": "human", "value": "And now?"}],
         "chosen": {"from": "gpt", "value": "Now we rest."}, "rejected": {"from": "gpt", "value": "No."}},
        {"prompt": "Name a colour.", "chosen": "Blue.", "rejected": "Blue."},  # equal answers
        {"instruction": "Add 2 and 2.", "input": "", "chosen": "4, since 2 + 2 = 4.", "rejected": "5"},
        {"prompt": [{"role": "user", "content": "Count."}], "chosen": "one two three " * 30, "rejected": "one"},
        {"chosen": [{"role": "user", "content": "Why?"}, {"role": "assistant", "content": "Because."}],
         "rejected": [{"role": "user", "content": "Why?"}, {"role": "assistant", "content": "No idea."}]},
        {"prompt": "word " * 200, "chosen": "Yes.", "rejected": "No."},  # the final user turn alone is too long
    ]  # fmt: skip
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return path


def dpo_flags(model: str, data: Path, output: Path, *extra: str) -> list[str]:
    """A dpo.py command line, preference flags included."""
    return [
        *("--model_name_or_path", model, "--data_path", str(data), "--output_dir", str(output), "--use_lora"),
        *("--model_max_length", str(MAX_LENGTH), "--per_device_train_batch_size", "2", "--report_to", "none"),
        *("--loss_type", "ipo", "--beta", "0.2", "--sft_weight", "0.1", "--precompute_reference"),
        *extra,
    ]


def inspected(model: str, data: Path, output: Path, *extra: str) -> PairInspection:
    model_args, data_args, training_args, inspect_args = parse_arguments(dpo_flags(model, data, output, *extra))
    return inspect_pairs(model_args, data_args, training_args, inspect_args.preference, show=10,
                         lora_weight_path=inspect_args.lora_weight_path)  # fmt: skip


def dpo_preprocessing(model: str, data: Path):
    """What dpo.py itself makes of the data: its tokenised pairs and their fates."""
    _, data_args, training_args, *_ = dpo.parse_arguments(dpo_flags(model, data, "unused"))
    train, _ = load_train_eval(data_args, training_args.seed, parse=pair_sample)
    return train, *tokenize_pairs(train, load_tokenizer(model), MAX_LENGTH)


def trained_runs(ids: list[int], labels: list[int], start: int) -> list[list[int]]:
    runs, current = [], []
    for token, label in zip(ids[start:], labels[start:]):
        if label != IGNORE_INDEX:
            current.append(token)
        elif current:
            runs, current = [*runs, current], []
    return runs + ([current] if current else [])


def as_text(shown: str) -> str:
    """A rendered text as the text it shows (newlines are shown as ↵ and a line break; the last one as ↵)."""
    return shown.replace("↵\n", "\n").replace("↵", "\n").rstrip("\n")


def test_shown_pairs_mark_exactly_the_answer_tokens_dpo_trains(tiny_model, tokenizer, tmp_path):
    data = write_pairs(tmp_path / "pairs.jsonl")
    inspection = inspected(tiny_model, data, tmp_path / "out")
    _, dataset, _ = dpo_preprocessing(tiny_model, data)
    assert inspection.dataset[:] == dataset[:]  # the very rows dpo.py trains on
    decode = lambda ids: tokenizer.decode(ids, skip_special_tokens=False)  # noqa: E731
    for where, row in zip(inspection.where, dataset):
        shown = render_pair(tokenizer, row, where, color=False)
        header, rest = shown.split("\n--- prompt ---\n")
        prompt, rest = rest.split("\n--- chosen ---\n")
        chosen, rejected = rest.split("\n--- rejected ---\n")
        shared = shared_prompt_length(row)
        assert header.startswith(f"===== {where}: prompt {shared} tokens")
        assert "[[" not in prompt and as_text(prompt) == decode(row["chosen_input_ids"][:shared]).rstrip("\n")
        for side, text in (("chosen", chosen), ("rejected", rejected)):
            ids, labels = row[f"{side}_input_ids"], row[f"{side}_labels"]
            assert all(label == IGNORE_INDEX for label in labels[:shared])  # nothing of the prompt is trained
            plain = as_text(text)
            assert plain.replace("[[", "").replace("]]", "") == decode(ids[shared:]).rstrip("\n")
            # Each bracketed run is one run of tokens dpo.py trains, in order: the whole answer, nothing else.
            runs = trained_runs(ids, labels, shared)
            assert runs and re.findall(r"\[\[(.*?)\]\]", plain, flags=re.S) == [decode(run) for run in runs]


def test_report_counts_what_tokenize_pairs_decided(tiny_model, tokenizer, tmp_path, capsys):
    data = write_pairs(tmp_path / "pairs.jsonl")
    output = tmp_path / "out"
    inspection = run_inspection(dpo_flags(tiny_model, data, output, "--stage", "dpo", "--show", "2"))
    train, dataset, counts = dpo_preprocessing(tiny_model, data)
    report = inspection.report
    assert {fate: n for fate, n in report["fates"].items() if n} == dict(+counts)
    # The data was made so that every fate happens.
    assert all(report["fates"][fate] for fate in ("ok", "truncated", "dropped_equal", "dropped_no_label"))
    assert report["kept_pairs"] == report["training_pairs"] == len(dataset)
    pairs = [json.loads(text) for text in train["messages"]]
    assert report["prompt_turns_dropped"] == sum(tokenize_pair(tokenizer, p, MAX_LENGTH).dropped_turns for p in pairs)
    assert report["prompt_turns_dropped"] > 0
    chosen = [sum(label != IGNORE_INDEX for label in row["chosen_labels"][1:]) for row in dataset]
    rejected = [sum(label != IGNORE_INDEX for label in row["rejected_labels"][1:]) for row in dataset]
    assert report["chosen_trained_mean"] == pytest.approx(sum(chosen) / len(chosen))
    assert report["rejected_trained_mean"] == pytest.approx(sum(rejected) / len(rejected))
    assert report["chosen_longer_share"] == pytest.approx(sum(c > r for c, r in zip(chosen, rejected)) / len(chosen))
    assert report["formats"] == dict(Counter(train["format"]))
    assert report["steps_per_epoch"] == -(-len(dataset) // 2)
    out = capsys.readouterr().out
    assert out.count("--- chosen ---") == 2 and f"{report['fates']['dropped_equal']} dropped: chosen and" in out
    assert json.loads((output / "data_report.json").read_text()) == json.loads(json.dumps(report))
    assert (output / "data_report.txt").read_text().startswith(f"Pairs: {data} (7 pairs)")


def test_dpo_command_line_and_config_file_work_unchanged(tiny_model, tmp_path):
    data = write_pairs(tmp_path / "pairs.jsonl")
    argv = dpo_flags(tiny_model, data, tmp_path / "out")
    dpo.parse_arguments(argv)  # dpo.py's own command line ...
    assert isinstance(run_inspection([*argv, "--show", "0"]), PairInspection)  # ... is a pair inspection as it is
    config = tmp_path / "dpo.yaml"
    config.write_text(
        f"model_name_or_path: {tiny_model}\ndata_path: {data}\noutput_dir: {tmp_path / 'out2'}\nuse_lora: true\n"
        f"loss_type: simpo\nsimpo_gamma: 1.0\nmodel_max_length: {MAX_LENGTH}\nreport_to: none\n"
    )
    inspection = run_inspection([str(config), "--show", "0"])
    assert isinstance(inspection, PairInspection) and inspection.report["preference"]["loss_type"] == "simpo"
    # SFT data stays an SFT inspection, preference flags or not; --stage chooses.
    sft_data = ["--data_path", "data/example_chatml.jsonl", "--report_dir", str(tmp_path / "sft")]
    assert isinstance(run_inspection([*argv, *sft_data, "--show", "0"]), Inspection)
    with pytest.raises(UserError, match="line 1, field 'chosen': missing: a preference pair needs"):
        run_inspection([*argv, *sft_data, "--stage", "dpo", "--overwrite_report"])
    with pytest.raises(UserError, match="pairs.jsonl, line 1"):
        run_inspection([*argv, "--stage", "sft", "--report_dir", str(tmp_path / "sft-of-pairs")])
    with pytest.raises(UserError, match="--loss_type 'kto'"):  # dpo.py's checks of its flags
        run_inspection([*argv, "--loss_type", "kto", "--report_dir", str(tmp_path / "kto")])


def test_bad_pair_data_is_one_error_line_naming_the_sample(tiny_model, tmp_path, user_error):
    bad = tmp_path / "bad.jsonl"
    good = {"prompt": "Hi", "chosen": "Hello.", "rejected": "Go."}
    bad.write_text("".join(json.dumps(r) + "\n" for r in (good, good, {"prompt": "Hi", "chosen": "Hello.",
                                                                       "rejected": ["not", "a message"]})))  # fmt: skip
    line = user_error("-m", "sft.inspect", *dpo_flags(tiny_model, bad, tmp_path / "out"))
    assert line.startswith(f"error: {bad}, line 3, field 'rejected[0]': expected an object")
    # A prompt ending with the assistant's turn answers nothing: named too, whether --stage says dpo or not.
    bad.write_text(json.dumps({"prompt": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}],
                               "chosen": "Hello.", "rejected": "Go."}) + "\n")  # fmt: skip
    for stage in ([], ["--stage", "dpo"]):
        with pytest.raises(UserError) as stopped:
            run_inspection([*dpo_flags(tiny_model, bad, tmp_path / "out"), *stage])
        assert str(stopped.value).startswith(f"{bad}, line 1, field 'prompt'")


def test_from_an_sft_adapter_the_adapters_tokenizer_is_used(tiny_model, tmp_path):
    # dpo.py reads an SFT adapter output's own tokenizer (its chat template): so does the inspection. No weights.
    adapter = tmp_path / "sft-lora"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": tiny_model}))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(Path(tiny_model, name), adapter / name)
    template = Path(tiny_model, "chat_template.jinja").read_text()
    default_system = template.replace("You are a helpful assistant.", "You are the SFT model.")
    assert default_system != template
    (adapter / "chat_template.jinja").write_text(default_system)
    data = write_pairs(tmp_path / "pairs.jsonl")
    for model, extra in ((str(adapter), ()), (tiny_model, ("--lora_weight_path", str(adapter)))):
        inspection = inspected(model, data, tmp_path / "out", *extra)
        assert "You are the SFT model." in inspection.tokenizer.decode(inspection.dataset[0]["chosen_input_ids"])


def test_no_pair_left_is_reported_then_an_error(tiny_model, tmp_path):
    data = tmp_path / "long.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"{i} " + "word " * 200, "chosen": "Yes.", "rejected": "No."}) + "\n"
                            for i in range(3)))  # fmt: skip
    with pytest.raises(UserError, match="no pair is left to train on"):
        run_inspection(dpo_flags(tiny_model, data, tmp_path / "out", "--show", "1"))
    report = json.loads((tmp_path / "out" / "data_report.json").read_text())
    assert report["fates"]["dropped_no_label"] == 3 and report["kept_pairs"] == 0
