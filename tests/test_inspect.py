"""sft.inspect: it shows exactly the rows training gets, and its report counts what training does to the data."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sft.data import IGNORE_INDEX, load_conversations, tokenize_conversations
from sft.errors import UserError
from sft.inspect import inspect_data, parse_arguments, render_row, run_inspection
from sft.modeling import load_tokenizer
from sft.packing import pack_dataset
from sft.plots import plotted_data

EXAMPLES = sorted(str(path) for path in Path("data").glob("example_*.json*"))
# The tiny model's ChatML template has no tool syntax: tool data is inspected with a Qwen2.5-style template.
TOOL_EXAMPLES = {"data/example_tools.jsonl"}


def inspect_args(tiny_model: str, data: str, *extra: str):
    return parse_arguments(["--model_name_or_path", tiny_model, "--data_path", data, "--report_to", "none", *extra])


@pytest.mark.parametrize("packing", [False, True], ids=["unpacked", "packed"])
@pytest.mark.parametrize("data", EXAMPLES)
def test_inspected_rows_are_the_training_rows(tiny_model, tool_model, tmp_path, data, packing):
    model = tool_model if data in TOOL_EXAMPLES else tiny_model
    tokenizer = load_tokenizer(model)
    max_length = 512 if data in TOOL_EXAMPLES else 64  # tool schemas alone are longer than 64 tokens
    extra = ["--model_max_length", str(max_length), "--train_on", "last_assistant", "--system_prompt", "Be brief."]
    extra += ["--packing"] if packing else []
    model_args, data_args, training_args, _ = inspect_args(model, data, *extra)
    inspection = inspect_data(model_args, data_args, training_args)

    # What finetune.py does with the same options.
    conversations = load_conversations(data, "Be brief.")
    dataset, _ = tokenize_conversations(conversations, tokenizer, max_length, train_on="last_assistant")
    if packing:
        dataset = pack_dataset(dataset, max_length)
    assert len(inspection.dataset) == len(dataset)
    for row, expected in zip(inspection.dataset, dataset):
        assert row["input_ids"] == expected["input_ids"]
        assert row["labels"] == expected["labels"]
        if packing:
            assert row["position_ids"] == expected["position_ids"]
    assert inspection.report["training_rows"] == len(dataset)
    assert inspection.report["trained_tokens"] == sum(
        sum(label != IGNORE_INDEX for label in row["labels"][1:]) for row in dataset
    )


def test_rendered_row_brackets_exactly_the_trained_tokens(tiny_model, tokenizer):
    model_args, data_args, training_args, _ = inspect_args(tiny_model, "data/example_qwen.json", "--packing")
    inspection = inspect_data(model_args, data_args, training_args)
    for row in inspection.dataset:
        shown = render_row(tokenizer, row["input_ids"], row["labels"], row["position_ids"], color=False)
        separator = f"\n{'-' * 20} next packed sample {'-' * 20}\n"
        assert shown.count(separator) == row["position_ids"].count(0) - 1
        plain = shown.replace(separator, "").replace("↵\n", "\n")
        decode = lambda ids: tokenizer.decode(ids, skip_special_tokens=False)  # noqa: E731
        assert plain.replace("[[", "").replace("]]", "") == decode(row["input_ids"])
        # Each bracketed run is one run of consecutive trained tokens, in order.
        runs, current = [], []
        for token, label in zip(row["input_ids"], row["labels"]):
            if label != IGNORE_INDEX:
                current.append(token)
            elif current:
                runs.append(current)
                current = []
        runs += [current] if current else []
        assert re.findall(r"\[\[(.*?)\]\]", plain, flags=re.S) == [decode(run) for run in runs]


def test_colours_on_request_and_special_tokens_visible(tiny_model, tmp_path, capsys):
    run_inspection(["--model_name_or_path", tiny_model, "--data_path", "data/example_chatml.jsonl", "--report_dir",
          str(tmp_path), "--show", "1", "--color", "always"])  # fmt: skip
    out = capsys.readouterr().out
    assert "\033[30;42m" in out and "[[" not in out
    assert "<|im_start|>" in out and "<|im_end|>" in out


def write_known_data(path: Path) -> list[list[dict]]:
    """Samples of every format, short and long: which fit in 96 tokens, which get truncated and which lose their
    whole answer follows from their lengths, computed in the test from the chat template directly."""
    short = "The cat likes the weather."
    long = " ".join(["Our team builds a new language every morning."] * 12)
    records = [
        {"conversations": [{"from": "user", "value": "Hello?"}, {"from": "assistant", "value": short}]},
        {"messages": [{"role": "user", "content": "Who?"}, {"role": "assistant", "content": short}]},
        {"instruction": "Say it.", "input": "", "output": short},
        {
            "messages": [
                {"role": "system", "content": "Be long."},
                {"role": "user", "content": "Write."},
                {"role": "assistant", "content": long},
            ]
        },
        {"instruction": "Write more.", "output": long},
        {"messages": [{"role": "user", "content": long}, {"role": "assistant", "content": short}]},
        {
            "conversations": [
                {"from": "human", "value": "One?"},
                {"from": "gpt", "value": short},
                {"from": "human", "value": "Two?"},
                {"from": "gpt", "value": long},
            ]
        },
    ]
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return load_conversations(path)


def expected_fates(tokenizer, conversations, max_length: int, drop_long: bool) -> list[dict]:
    """Each sample's length and fate from the template and the tokenizer alone (one-turn answers at the end)."""
    results = []
    for messages in conversations:
        full = tokenizer.apply_chat_template(messages, tokenize=False)
        prompt = tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
        length = len(tokenizer.encode(full, add_special_tokens=False))
        answer_start = len(tokenizer.encode(prompt, add_special_tokens=False))
        answer_end = len(tokenizer.encode(full.rstrip(), add_special_tokens=False))  # ends with <|im_end|>
        if length <= max_length:
            fate = "ok"
        elif drop_long:
            fate = "dropped_too_long"
        else:
            fate = "truncated" if answer_start < max_length else "dropped_no_label"
        results.append({"length": length, "fate": fate, "answer": (answer_start, answer_end)})
    return results


@pytest.mark.parametrize("drop_long", [False, True], ids=["truncate", "drop"])
def test_report_counts_match_independent_counts(tiny_model, tokenizer, tmp_path, capsys, drop_long):
    data = tmp_path / "known.jsonl"
    conversations = write_known_data(data)
    max_length = 96
    expected = expected_fates(tokenizer, conversations, max_length, drop_long)
    fates = [sample["fate"] for sample in expected]
    assert set(fates) == ({"ok", "dropped_too_long"} if drop_long else {"ok", "truncated", "dropped_no_label"})

    args = ["--model_name_or_path", tiny_model, "--data_path", str(data), "--model_max_length", str(max_length)]
    args += ["--train_on", "last_assistant", "--per_device_train_batch_size", "2", "--gradient_accumulation_steps"]
    args += ["2", "--world_size", "2", "--num_train_epochs", "3", "--report_dir", str(tmp_path / "report")]
    args += ["--drop_long_samples"] if drop_long else []
    report = run_inspection(args).report

    kept = [sample for sample in expected if sample["fate"] in ("ok", "truncated")]
    assert report["samples"] == 7
    assert report["formats"] == {"qwen": 2, "chatml": 3, "alpaca": 2}
    assert report["messages"] == sum(len(messages) for messages in conversations) == 17
    assert report["assistant_turns"] == 8
    assert report["fates"] == {fate: fates.count(fate) for fate in report["fates"]}
    assert report["kept_samples"] == len(kept)
    assert report["tokens"] == sum(min(sample["length"], max_length) for sample in kept)
    trained = [min(end, max_length) - start for start, end in (sample["answer"] for sample in kept)]
    assert report["trained_tokens"] == sum(trained)
    truncated = [sample for sample in expected if sample["fate"] == "truncated"]
    assert report["tokens_cut_by_truncation"] == sum(sample["length"] - max_length for sample in truncated)
    assert report["trained_tokens_cut_by_truncation"] == sum(s["answer"][1] - max_length for s in truncated)
    lengths = [sample["length"] for sample in expected]
    assert report["length_percentiles"]["p50"] == np.percentile(lengths, 50)
    assert report["length_percentiles"]["max"] == max(lengths)
    # 2 rows per batch x 2 processes, 2 batches per step.
    assert report["steps_per_epoch"] == math.ceil(math.ceil(len(kept) / 4) / 2)
    assert report["total_steps"] == 3 * report["steps_per_epoch"]

    out = capsys.readouterr().out
    assert f"{len(truncated)} truncated to --model_max_length" in out or drop_long
    written = json.loads((tmp_path / "report" / "data_report.json").read_text())
    assert written == report
    assert (tmp_path / "report" / "data_report.txt").read_text().startswith("Data: ")

    picture = tmp_path / "report" / "data_lengths.png"
    assert picture.stat().st_size > 10_000
    with Image.open(picture) as image:
        image.verify()
        assert image.format == "PNG" and image.size[0] >= 500 and image.size[1] >= 300
    plotted = plotted_data(picture)["samples"]
    assert plotted["max_length"] == max_length
    layers = {name: layer for name, layer in plotted.items() if name != "max_length"}
    names = {"ok": "fit", "truncated": "truncated to --model_max_length",
             "dropped_too_long": "dropped: longer than --model_max_length (--drop_long_samples)",
             "dropped_no_label": "dropped: no trained token left"}  # fmt: skip
    assert set(layers) == {names[fate] for fate in set(fates)}
    for fate in set(fates):
        layer = layers[names[fate]]
        counts, _ = np.histogram([s["length"] for s in expected if s["fate"] == fate], bins=layer["bin_edges"])
        assert layer["counts"] == counts.tolist()


def test_report_files_are_kept_unless_asked(tiny_model, tmp_path, capsys):
    args = ["--model_name_or_path", tiny_model, "--data_path", "data/example_alpaca.json", "--show", "0"]
    args += ["--output_dir", str(tmp_path)]
    (tmp_path / "data_lengths.png").write_text("mine")
    with pytest.raises(UserError) as stopped:
        run_inspection(args)
    assert str(stopped.value) == (
        f"{tmp_path / 'data_lengths.png'} exists: pass --overwrite_report to replace it, or choose another --report_dir"
    )
    assert (tmp_path / "data_lengths.png").read_text() == "mine"
    run_inspection([*args, "--overwrite_report"])
    assert (tmp_path / "data_lengths.png").read_bytes().startswith(b"\x89PNG")


def test_bad_data_is_a_clear_error(tiny_model, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "bot", "content": "hi"}]}\n')
    with pytest.raises(UserError) as stopped:
        run_inspection(["--model_name_or_path", str(tmp_path / "no-model"), "--data_path", str(bad)])
    assert str(stopped.value).startswith(f"{bad}, line 1, field 'messages[0].role': unknown role 'bot'")


def test_training_config_file_and_bf16_without_a_gpu(tiny_model, tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text(
        f"model_name_or_path: {tiny_model}\ndata_path: data/example_qwen.json\noutput_dir: {tmp_path / 'out'}\n"
        "bf16: true\nmodel_max_length: 128\nper_device_train_batch_size: 1\nreport_to: none\n"
    )
    model_args, data_args, training_args, inspect_args = parse_arguments([str(config), "--show", "5"])
    assert training_args.model_max_length == 128 and inspect_args.show == 5
    assert inspect_data(model_args, data_args, training_args).report["steps_per_epoch"] == 3


def test_fold_system_prompt_reaches_the_inspection(tiny_model, tmp_path):
    from chat_templates import GEMMA2_STYLE

    tokenizer = load_tokenizer(tiny_model)
    tokenizer.chat_template = GEMMA2_STYLE  # refuses a system message
    data = tmp_path / "system.jsonl"
    sample = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"},
                           {"role": "assistant", "content": "Hello."}]}  # fmt: skip
    data.write_text(json.dumps(sample) + "\n")
    cache = ["--preprocessing_cache_dir", str(tmp_path / "cache")]
    model_args, data_args, training_args, _ = inspect_args(tiny_model, str(data), *cache)
    assert inspect_data(model_args, data_args, training_args, tokenizer=tokenizer).report["samples"] == 1
    model_args, data_args, training_args, _ = inspect_args(tiny_model, str(data), "--fold_system_prompt", "false",
                                                           *cache)  # fmt: skip
    with pytest.raises(UserError, match="System role not supported"):
        inspect_data(model_args, data_args, training_args, tokenizer=tokenizer)


def write_mixed_data(path: Path, unlabelled: bool = False) -> list[dict]:
    """Chat samples (one fits in 64 tokens, one does not) and plain texts (one short, one of several chunks); with
    `unlabelled`, a last chat sample with no trained token at all (which sft.inspect tokenises batch by batch)."""
    short = "The cat likes the weather."
    long = " ".join(["Our team builds a new language every morning."] * 12)
    records = [
        {"messages": [{"role": "user", "content": "Who?"}, {"role": "assistant", "content": short}]},
        {"text": long + " " + long},
        {"messages": [{"role": "user", "content": "Write."}, {"role": "assistant", "content": long}]},
        {"text": short},
        {"conversations": [{"from": "human", "value": "Hi?"}, {"from": "gpt", "value": short}]},
    ]
    if unlabelled:
        answer = {"role": "assistant", "content": short, "train": False}  # context only: no loss on it
        records.append({"messages": [{"role": "user", "content": "Hello?"}, answer]})
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return records


@pytest.mark.parametrize("unlabelled", [False, True], ids=["labelled", "unlabelled"])
@pytest.mark.parametrize("drop_long", [False, True], ids=["truncate", "drop"])
def test_plain_texts_longer_than_max_length_are_chunked_rows(tiny_model, tokenizer, tmp_path, drop_long, unlabelled):
    data = tmp_path / "mixed.jsonl"
    records = write_mixed_data(data, unlabelled)
    max_length = 64
    text = records[1]["text"]
    text_ids = tokenizer.encode(text, add_special_tokens=False) + [tokenizer.eos_token_id]
    chunks = math.ceil(len(text_ids) / max_length)
    rows_before = max_length * (chunks - 1)  # tokens in the chunks before the last
    assert chunks >= 3
    conversations = load_conversations(data)
    chats = expected_fates(tokenizer, [conversations[k] for k in (0, 2, 4)], max_length, drop_long)
    assert [chat["fate"] for chat in chats] == ["ok", "dropped_too_long" if drop_long else "truncated", "ok"]

    extra = ["--model_max_length", str(max_length), "--report_dir", str(tmp_path / "report")]
    extra += ["--drop_long_samples"] if drop_long else []
    inspection = inspect_data(*inspect_args(tiny_model, str(data), *extra)[:3])  # raises if its own check fails
    report = inspection.report

    # The long text keeps every token as chunks, whatever --drop_long_samples says; the short one fits.
    long_chat = "dropped_too_long" if drop_long else "truncated"
    fates = {"ok": 3, "chunked": 1, long_chat: 1} | ({"dropped_no_label": 1} if unlabelled else {})
    assert report["fates"] == {fate: 0 for fate in report["fates"]} | fates
    assert report["formats"] == {"chatml": 3 if unlabelled else 2, "text": 2, "qwen": 1}
    assert report["chunk_rows"] == chunks
    kept_chat_rows = 2 if drop_long else 3
    assert report["kept_samples"] == kept_chat_rows + 2
    assert report["training_rows"] == len(inspection.dataset) == kept_chat_rows + chunks + 1
    where = ["sample 0 (line 1)"] + [f"sample 1 (line 2), chunk {n} of {chunks}" for n in range(1, chunks + 1)]
    where += [] if drop_long else ["sample 2 (line 3)"]
    where += ["sample 3 (line 4)", "sample 4 (line 5)"]
    assert list(inspection.where) == where
    # The chunks are the text's tokens and eos, in order, every one trained.
    rows = inspection.dataset[1 : 1 + chunks]
    assert sum(rows["input_ids"], []) == text_ids == sum(rows["labels"], [])
    assert [len(ids) for ids in rows["input_ids"]] == [max_length] * (chunks - 1) + [len(text_ids) - rows_before]
    # The histogram counts the long text once, at its whole length.
    lengths = inspection.lengths_by_fate["split into --model_max_length chunks (plain text)"]
    assert lengths == [len(text_ids)]


def test_the_fates_check_holds_with_plain_texts(tiny_model, tmp_path, monkeypatch):
    data = tmp_path / "mixed.jsonl"
    write_mixed_data(data)
    args = inspect_args(tiny_model, str(data), "--model_max_length", "64")[:3]
    # A wrong count of the chunks' rows is caught, not skipped for data with plain texts.
    monkeypatch.setattr("sft.inspect_survey.sample_rows", lambda fate, length, max_length: 1)
    with pytest.raises(RuntimeError, match="disagrees with sft.data"):
        inspect_data(*args)


# With --seed 3, --val_size cuts samples 3 and 4 (of 8) off the JSONL file, sample 0 (of 3) off the JSON list.
@pytest.mark.parametrize(
    ("data", "val_size", "row", "label"),
    [("data/example_chatml.jsonl", "0.25", 3, "sample 3 (line 6)"), ("data/example_qwen.json", "1", 0,
      "sample 0 (sample 1)")],
)  # fmt: skip
def test_val_size_reports_the_training_part_only(tiny_model, tokenizer, tmp_path, capsys, data, val_size, row, label):
    from sft.data import split_validation

    everything = load_conversations(data)
    train, validation = split_validation(everything, float(val_size), seed=3)
    assert len(validation) == (2 if data.endswith(".jsonl") else 1)

    args = ["--model_name_or_path", tiny_model, "--data_path", data, "--val_size", val_size, "--seed", "3"]
    args += ["--model_max_length", "512", "--report_dir", str(tmp_path / "report"), "--show", "0"]
    inspection = run_inspection(args)
    report = inspection.report

    assert report["samples"] == len(train)
    assert report["validation_samples"] == len(validation)
    assert report["messages"] == sum(len(messages) for messages in train)
    assert report["assistant_turns"] == sum(m["role"] == "assistant" for messages in train for m in messages)
    dataset, _ = tokenize_conversations(train, tokenizer, 512)
    assert report["training_rows"] == len(dataset)
    assert report["tokens"] == sum(dataset["length"])
    assert report["length_percentiles"]["max"] == max(dataset["length"])  # every sample fits in 512 tokens
    assert "validation:" in capsys.readouterr().out
    assert json.loads((tmp_path / "report" / "data_report.json").read_text()) == report

    # Each row names its sample in the training part, and the sample's own place in the file where they differ.
    own = [f"sample {k}" if place == f"sample {k}" else f"sample {k} ({place})" for k, place in enumerate(train.wheres)]
    assert list(inspection.where) == own
    assert inspection.where[row] == label


def test_max_samples_and_val_size_as_finetune_applies_them(tiny_model, tmp_path):
    args = inspect_args(tiny_model, "data/example_chatml.jsonl", "--max_samples", "6", "--val_size", "2")[:3]
    report = inspect_data(*args).report
    # The first 6 samples are read, then 2 of them cut off for validation.
    assert (report["samples"], report["validation_samples"]) == (4, 2)
    assert inspect_data(*inspect_args(tiny_model, "data/example_chatml.jsonl")[:3]).report["validation_samples"] is None
