"""Where training data comes from (sft.data.sources): files by extension, globs, hub-layout and save_to_disk folders,
an offline hub cache, data config files; mixing, resampling, --val_size, --max_samples; errors by row or line."""

from __future__ import annotations

import glob
import json
import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import datasets
import pytest

from sft.data import DataError, DataErrors, load_data, load_train_eval, parse_sources, read_data, resample
from sft.errors import ConfigurationError
from sft.outputs import read_run_info


def chat(k: int) -> dict:
    return {"messages": [{"role": "user", "content": f"question {k}"}, {"role": "assistant", "content": f"answer {k}"}]}


def answers(data) -> list[str]:
    """The last answer of each sample: of `load_data`'s conversations or of `read_data`'s data set."""
    conversations = data if isinstance(data, list) else [json.loads(messages) for messages in data["messages"]]
    return [messages[-1]["content"] for messages in conversations]


def test_parquet_csv_tsv_arrow_and_jsonl_files_by_extension(tmp_path):
    table = datasets.Dataset.from_list([chat(k) for k in range(3)])
    table.to_parquet(tmp_path / "a.parquet")
    table.to_json(tmp_path / "a.jsonl")
    alpaca = datasets.Dataset.from_list([{"instruction": f"question {k}", "output": f"answer {k}"} for k in range(3)])
    alpaca.to_csv(tmp_path / "a.csv", index=False)
    alpaca.to_pandas().to_csv(tmp_path / "a.tsv", sep="\t", index=False)
    table.save_to_disk(tmp_path / "disk")
    shutil.copy(glob.glob(str(tmp_path / "disk" / "*.arrow"))[0], tmp_path / "a.arrow")
    for name in ("a.parquet", "a.jsonl", "a.csv", "a.tsv", "a.arrow"):
        conversations = load_data(str(tmp_path / name))
        assert answers(conversations) == ["answer 0", "answer 1", "answer 2"], name
    assert load_data(str(tmp_path / "a.parquet")).wheres == ["row 0", "row 1", "row 2"]
    assert load_data(str(tmp_path / "a.jsonl")).wheres == ["line 1", "line 2", "line 3"]


def test_several_sources_and_a_glob_are_mixed_in_order(tmp_path):
    for name, k in (("x1.jsonl", 1), ("x2.jsonl", 2), ("y.jsonl", 3)):
        (tmp_path / name).write_text(json.dumps(chat(k)) + "\n")
    conversations = load_data(f"{tmp_path}/y.jsonl {tmp_path}/x*.jsonl")
    assert answers(conversations) == ["answer 3", "answer 1", "answer 2"]
    assert conversations.paths == [str(tmp_path / n) for n in ("y.jsonl", "x1.jsonl", "x2.jsonl")]


def test_hub_layout_folder_and_save_to_disk_folders(tmp_path):
    repo = tmp_path / "repo"
    (repo / "data").mkdir(parents=True)
    (repo / "README.md").write_text("---\nlicense: mit\n---\n# a dataset\n")
    datasets.Dataset.from_list([chat(k) for k in range(4)]).to_parquet(repo / "data" / "train-00000-of-00001.parquet")
    datasets.Dataset.from_list([chat(9)]).to_parquet(repo / "data" / "test-00000-of-00001.parquet")
    assert answers(load_data(str(repo))) == [f"answer {k}" for k in range(4)]

    datasets.Dataset.from_list([chat(k) for k in range(2)]).save_to_disk(tmp_path / "one")
    assert answers(load_data(str(tmp_path / "one"))) == ["answer 0", "answer 1"]
    splits = datasets.DatasetDict(
        {"train": datasets.Dataset.from_list([chat(5)]), "test": datasets.Dataset.from_list([chat(6)])}
    )
    splits.save_to_disk(tmp_path / "dict")
    assert answers(load_data(str(tmp_path / "dict"))) == ["answer 5"]
    config = tmp_path / "mix.yaml"
    config.write_text(f"sources:\n  - path: {tmp_path / 'dict'}\n    split: test\n  - path: {repo}\n    split: test\n")
    assert answers(load_data(str(config))) == ["answer 6", "answer 9"]
    config.write_text(f"sources:\n  - path: {tmp_path / 'dict'}\n    split: valid\n")
    with pytest.raises(DataError, match="no split 'valid'"):
        load_data(str(config))


def test_hub_dataset_id_from_the_offline_cache(tmp_path, monkeypatch):
    # A cache as `datasets` leaves it after downloading someone/tiny-chat: the prepared Arrow file and its info.
    builder = datasets.load_dataset_builder(
        "parquet", data_files=str(_parquet(tmp_path, [chat(k) for k in range(3)])), cache_dir=str(tmp_path / "b")
    )
    builder.download_and_prepare()
    prepared = next(p for p in glob.glob(str(tmp_path / "b" / "parquet" / "*" / "*" / "*")) if os.path.isdir(p))
    cached = tmp_path / "cache" / "someone___tiny-chat" / "default" / "0.0.0" / "0123abcd"
    shutil.copytree(prepared, cached)
    os.rename(cached / "parquet-train.arrow", cached / "tiny-chat-train.arrow")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "cache"))
    conversations = load_data("someone/tiny-chat")
    assert answers(conversations) == ["answer 0", "answer 1", "answer 2"]
    assert conversations.paths[0] == "someone/tiny-chat [train]" and conversations.wheres[2] == "row 2"
    with pytest.raises(DataError, match="someone/missing"):
        load_data("someone/missing")


def _parquet(folder: Path, rows: list[dict]) -> Path:
    datasets.Dataset.from_list(rows).to_parquet(folder / "rows.parquet")
    return folder / "rows.parquet"


def test_data_config_options_columns_system_and_resampling(tmp_path):
    rows = [{"q": f"question {k}", "a": f"answer {k}"} for k in range(10)]
    path = _parquet(tmp_path, [{"instruction": r["q"], "output": r["a"]} for r in rows])
    (tmp_path / "named.jsonl").write_text("".join(json.dumps({"ask": r["q"], "reply": r["a"]}) + "\n" for r in rows))
    config = {
        "sources": [
            {"path": str(path), "num_samples": 4},
            {"path": "named.jsonl", "columns": {"ask": "instruction", "reply": "output"}, "num_samples": 25},
            {"path": str(path), "system_prompt": "Be brief.", "num_samples": 1},
        ]
    }
    (tmp_path / "mix.json").write_text(json.dumps(config))  # a relative path is relative to the config file
    conversations = load_data(str(tmp_path / "mix.json"), seed=7)
    assert len(conversations) == 4 + 25 + 1
    first = answers(conversations[:4])
    assert len(set(first)) == 4  # drawn without repeats
    upsampled = answers(conversations[4:29])
    assert all(upsampled.count(f"answer {k}") in (2, 3) for k in range(10))  # two whole copies and 5 drawn
    assert conversations[29][0] == {"role": "system", "content": "Be brief."}
    assert conversations[0][0]["role"] == "user"
    assert answers(load_data(str(tmp_path / "mix.json"), seed=7)) == answers(conversations)  # seeded
    assert answers(load_data(str(tmp_path / "mix.json"), seed=8))[:4] != first  # another seed, another draw


def test_read_data_is_load_data_in_memory_mapped_arrow(tmp_path):
    rows = [{"instruction": f"question {k}", "output": f"answer {k}"} for k in range(10)]
    path = _parquet(tmp_path, rows)
    (tmp_path / "chat.jsonl").write_text("".join(json.dumps(chat(k)) + "\n" for k in range(5)))
    config = {"sources": [{"path": str(path), "num_samples": 4}, {"path": "chat.jsonl", "system_prompt": "Hi."}]}
    (tmp_path / "mix.json").write_text(json.dumps(config))
    in_memory = load_data(str(tmp_path / "mix.json"), "Be kind.", max_samples=8, seed=7)
    mapped = read_data(str(tmp_path / "mix.json"), "Be kind.", max_samples=8, seed=7, cache_dir=tmp_path / "cache")
    assert [json.loads(messages) for messages in mapped["messages"]] == list(in_memory)
    assert (mapped["file"], mapped["place"]) == (in_memory.paths, in_memory.wheres)
    assert mapped["format"] == in_memory.formats == ["alpaca"] * 4 + ["chatml"] * 5
    assert {Path(file["filename"]).parent for file in mapped.cache_files} == {tmp_path / "cache" / "llm_finetuning"}


def test_read_data_reads_a_source_again_only_when_its_files_change(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(chat(k)) + "\n" for k in range(3)))
    first = read_data(str(path), cache_dir=tmp_path / "cache")
    cached = {file["filename"] for file in first.cache_files}
    assert {file["filename"] for file in read_data(str(path), cache_dir=tmp_path / "cache").cache_files} == cached
    with path.open("a") as more:
        more.write(json.dumps(chat(3)) + "\n")
    again = read_data(str(path), cache_dir=tmp_path / "cache")
    assert answers(again) == [f"answer {k}" for k in range(4)]
    assert {file["filename"] for file in again.cache_files}.isdisjoint(cached)
    with pytest.raises(DataError, match="line 5"):  # a source with problems leaves no file under its key
        with path.open("a") as bad:
            bad.write("{oops}\n")
        read_data(str(path), cache_dir=tmp_path / "cache")
    assert not list((tmp_path / "cache" / "llm_finetuning").glob("*.partial"))


def test_resample_draws_without_repeats_below_the_count_and_whole_copies_above():
    assert resample(10, 4, 0) == sorted(set(resample(10, 4, 0))) and len(resample(10, 4, 0)) == 4
    assert resample(3, 7, 0).count(0) + resample(3, 7, 0).count(1) + resample(3, 7, 0).count(2) == 7
    assert all(resample(3, 7, 0).count(k) in (2, 3) for k in range(3))
    assert resample(5, 5, 1) == [0, 1, 2, 3, 4]


def test_config_mistakes_name_the_source(tmp_path):
    config = tmp_path / "mix.yaml"
    for text, expected in (
        ("sources: []\n", "non-empty list 'sources'"),
        ("sources:\n  - split: train\n", r"sources\[0\], field 'path': missing"),
        ("sources:\n  - path: a.jsonl\n    weight: 2\n", r"sources\[0\], field 'weight': unknown option"),
        ("sources:\n  - path: a.jsonl\n    num_samples: 0\n", "expected a positive integer"),
    ):
        config.write_text(text)
        with pytest.raises(DataError, match=expected):
            parse_sources(str(config))


def test_errors_name_row_or_line_and_up_to_twenty_are_reported(tmp_path):
    rows = [chat(0), {"messages": [{"role": "user", "content": "q"}]}, {"instruction": "q", "output": ""}]
    datasets.Dataset.from_list([{"payload": json.dumps(r)} for r in rows]).to_parquet(tmp_path / "wrapped.parquet")
    datasets.Dataset.from_list(rows[1:2]).to_parquet(tmp_path / "bad.parquet")
    with pytest.raises(DataError, match=r"bad.parquet, row 0, field 'messages': no assistant turn"):
        load_data(str(tmp_path / "bad.parquet"))
    pd = datasets.Dataset.from_list([{"instruction": "q", "output": "a"}, {"instruction": "q", "output": " "}])
    pd.to_csv(tmp_path / "bad.csv", index=False)
    with pytest.raises(DataError, match=r"bad.csv, row 1, field 'output': is empty"):
        load_data(str(tmp_path / "bad.csv"))

    lines = [json.dumps(chat(0))] + ['{"messages": []}'] * 25
    (tmp_path / "many.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(DataErrors) as caught:
        load_data(str(tmp_path / "many.jsonl"))
    message = str(caught.value)
    assert message.startswith("20+ problems in the data (the first 20 shown):")
    assert "many.jsonl, line 2, field 'messages'" in message and "line 21," in message and "line 22," not in message
    assert caught.value.where == "line 2"  # a DataError naming the first
    (tmp_path / "two.jsonl").write_text(json.dumps(chat(0)) + "\n{}\n[]\n")
    with pytest.raises(DataErrors, match=r"^2 problems in the data: \(1\) .*two.jsonl, line 2: .*; \(2\) .*line 3"):
        load_data(str(tmp_path / "two.jsonl"))


def test_missing_sources_are_errors(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        load_data(str(tmp_path / "missing.jsonl"))
    with pytest.raises(DataError, match="the glob matches no file"):
        load_data(str(tmp_path / "*.parquet"))
    (tmp_path / "broken.parquet").write_text("not parquet")
    with pytest.raises(DataError, match="broken.parquet: cannot read as parquet"):
        load_data(str(tmp_path / "broken.parquet"))


def _data_args(data_path: str, **options) -> SimpleNamespace:
    cache = Path(data_path.split()[0]).parent / "cache"
    defaults = dict(eval_data_path=None, system_prompt=None, val_size=None, max_samples=None)
    defaults["preprocessing_cache_dir"] = str(cache)
    return SimpleNamespace(data_path=data_path, **{**defaults, **options})


def test_val_size_and_max_samples(tmp_path):
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(chat(k)) + "\n" for k in range(20)))
    data = str(tmp_path / "d.jsonl")
    train, evaluation = load_train_eval(_data_args(data, val_size=0.25), seed=3)
    assert (len(train), len(evaluation)) == (15, 5)
    assert sorted(answers(train) + answers(evaluation), key=lambda a: int(a.split()[1])) == answers(load_data(data))
    assert answers(load_train_eval(_data_args(data, val_size=0.25), seed=3)[1]) == answers(evaluation)
    assert answers(load_train_eval(_data_args(data, val_size=0.25), seed=4)[1]) != answers(evaluation)
    train, evaluation = load_train_eval(_data_args(data, val_size=3), seed=3)
    assert (len(train), len(evaluation)) == (17, 3)
    assert evaluation["place"] == [w for w in load_data(data).wheres if w in evaluation["place"]]  # places kept
    train, evaluation = load_train_eval(_data_args(data, max_samples=4), seed=3)
    assert answers(train) == [f"answer {k}" for k in range(4)] and evaluation is None
    for options, expected in (
        (dict(val_size=1.5), "fraction between 0 and 1 or a whole count"),
        (dict(val_size=0.1, eval_data_path=data), "drop --eval_data_path"),
        (dict(max_samples=0), "at least 1"),
    ):
        with pytest.raises(ConfigurationError, match=expected):
            load_train_eval(_data_args(data, **options), seed=0)
    with pytest.raises(DataError, match="both need at least one"):
        load_train_eval(_data_args(data, val_size=20), seed=0)


def test_finetune_trains_on_a_mix_with_a_validation_split(run_finetune, common_args, tiny_model, tmp_path):
    datasets.Dataset.from_list([chat(k) for k in range(6)]).to_parquet(tmp_path / "extra.parquet")
    examples = len(load_data("data/example_chatml.jsonl"))
    flags = common_args(tiny_model, tmp_path / "out", steps=1)
    trainer = run_finetune(
        *flags, "--data_path", f"data/example_chatml.jsonl {tmp_path / 'extra.parquet'}", "--val_size", "3"
    )
    assert (len(trainer.train_dataset), len(trainer.eval_dataset)) == (examples + 6 - 3, 3)
    recorded = read_run_info(tmp_path / "out")["data_path"]
    assert recorded == [os.path.abspath("data/example_chatml.jsonl"), str(tmp_path / "extra.parquet")]


def test_finetune_reports_every_data_problem_on_one_error_line(user_error, tiny_model, tmp_path):
    rows = [chat(0), {"instruction": "q", "output": " "}, chat(2), {"messages": [{"role": "user", "content": "q"}]}]
    (tmp_path / "bad.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    line = user_error(
        "finetune.py",
        *("--model_name_or_path", tiny_model, "--output_dir", str(tmp_path / "out")),
        *("--data_path", str(tmp_path / "bad.jsonl")),
    )
    assert line.startswith("error: 2 problems in the data: (1) ")
    assert "bad.jsonl, line 2, field 'output': is empty" in line and "bad.jsonl, line 4, field 'messages'" in line


def test_nested_columns_read_from_parquet_keep_their_meaning(tmp_path):
    # Arrow gives every struct of a column the same fields (None where a sample had none): text parts of both
    # spellings, a tool call in one message only, a marked answer.
    rows = [
        {
            "messages": [
                {"role": "user", "content": [{"type": "text", "text": "question 0"}]},
                {"role": "assistant", "content": [{"type": "text", "value": "answer 0"}], "train": False},
                {"role": "user", "content": [{"type": "text", "text": "again"}]},
                {"role": "assistant", "content": [{"type": "text", "text": "answer 1"}]},
            ]
        }
    ]
    datasets.Dataset.from_list(rows).to_parquet(tmp_path / "parts.parquet")
    (messages,) = load_data(str(tmp_path / "parts.parquet"))
    assert [m["content"] for m in messages] == ["question 0", "answer 0", "again", "answer 1"]
    assert [m.get("train", True) for m in messages] == [True, False, True, True]


def test_an_unwritable_cache_folder_is_one_error_line(tmp_path):
    (tmp_path / "d.jsonl").write_text(json.dumps(chat(0)) + "\n")
    blocked = tmp_path / "file-not-folder"
    blocked.write_text("")
    with pytest.raises(ConfigurationError, match="--preprocessing_cache_dir: cannot create"):
        load_train_eval(_data_args(str(tmp_path / "d.jsonl"), preprocessing_cache_dir=str(blocked)), seed=0)


def _jsonl(path: Path, records: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return path


def test_a_folder_reads_every_data_file_whatever_words_its_names_hold(tmp_path, caplog):
    # Issue 29, item 1: split words in file names ("train_a", "chat-2024") and a second extension drop no file.
    folder = tmp_path / "mine"
    _jsonl(folder / "train_a.jsonl", [chat(0)])
    _jsonl(folder / "more_data.jsonl", [chat(1)])
    _jsonl(folder / "chat-2024-test.jsonl", [chat(2)])
    _jsonl(folder / "nested" / "deeper.jsonl", [chat(3)])
    datasets.Dataset.from_list([chat(4)]).to_parquet(folder / "c.parquet")
    (folder / "notes.txt").write_text("not data")
    with caplog.at_level("INFO", logger="sft.data"):
        data = read_data(str(folder), cache_dir=tmp_path / "cache")
    assert sorted(answers(data)) == [f"answer {k}" for k in range(5)]
    names = ["c.parquet", "chat-2024-test.jsonl", "more_data.jsonl", "nested/deeper.jsonl", "train_a.jsonl"]
    assert sorted(set(data["file"])) == sorted(str(folder / name) for name in names)
    assert [Path(file).relative_to(folder).as_posix() for file in dict.fromkeys(data["file"])] == names  # name order
    log = caplog.text
    assert "reading 5 files" in log and "notes.txt (not a data file" in log


def test_a_folder_declares_its_splits_by_readme_configs_or_split_subfolders(tmp_path):
    by_folders = tmp_path / "by_folders"
    _jsonl(by_folders / "train" / "a.jsonl", [chat(0), chat(1)])
    _jsonl(by_folders / "test" / "b.jsonl", [chat(2)])
    assert answers(load_data(str(by_folders))) == ["answer 0", "answer 1"]
    config = tmp_path / "mix.yaml"
    config.write_text(f"sources:\n  - path: {by_folders}\n    split: test\n")
    assert answers(load_data(str(config))) == ["answer 2"]

    hub = tmp_path / "hub"
    _jsonl(hub / "data" / "first.jsonl", [chat(5)])
    _jsonl(hub / "data" / "second.jsonl", [chat(6)])
    (hub / "README.md").write_text(
        "---\nconfigs:\n- config_name: default\n  data_files:\n  - split: train\n    path: data/first.jsonl\n"
        "  - split: test\n    path: data/second.jsonl\n---\n# card\n"
    )
    assert answers(load_data(str(hub))) == ["answer 5"]
    config.write_text(f"sources:\n  - path: {hub}\n    split: validation\n")
    with pytest.raises(DataError, match=r"no split 'validation' in the README.md configs \(splits: train, test\)"):
        load_data(str(config))
    plain = tmp_path / "plain"
    _jsonl(plain / "a.jsonl", [chat(7)])
    config.write_text(f"sources:\n  - path: {plain}\n    split: test\n")
    with pytest.raises(DataError, match="no split 'test': the folder declares no splits"):
        load_data(str(config))


def test_a_folder_of_mixed_record_formats_and_file_types_reads_each_file_on_its_own(tmp_path):
    # Issue 29, item 2: one file of `messages`, one alpaca, one Parquet file of prompt/completion.
    folder = tmp_path / "mixed"
    _jsonl(folder / "a.jsonl", [chat(0)])
    _jsonl(folder / "b.jsonl", [{"instruction": "question 1", "output": "answer 1"}])
    datasets.Dataset.from_list([{"prompt": "question 2", "completion": "answer 2"}]).to_parquet(folder / "c.parquet")
    data = read_data(str(folder), cache_dir=tmp_path / "cache")
    assert answers(data) == ["answer 0", "answer 1", "answer 2"]
    assert data["format"] == ["chatml", "alpaca", "prompt_completion"]
    _jsonl(folder / "d.jsonl", [{"instruction": "question 3", "output": 3}])
    with pytest.raises(DataError, match=r"mixed/d.jsonl, line 1, field 'output'"):
        read_data(str(folder), cache_dir=tmp_path / "cache")


def test_validation_samples_are_never_trained_in_an_upsampled_mix(tmp_path):
    # Issue 29, item 5: a source upsampled 4x holds 4 copies of each sample; none of a validation sample's copies
    # may stay in training.
    _jsonl(tmp_path / "small.jsonl", [chat(k) for k in range(5)])
    _jsonl(tmp_path / "big.jsonl", [chat(k) for k in range(100, 120)])
    config = tmp_path / "mix.yaml"
    config.write_text("sources:\n  - path: small.jsonl\n    num_samples: 20\n  - path: big.jsonl\n")
    for seed in range(5):
        train, evaluation = load_train_eval(_data_args(str(config), val_size=0.4), seed=seed)
        held_out = set(zip(evaluation["file"], evaluation["place"]))
        assert len(held_out) == len(evaluation) == 10  # 40% of the 25 distinct samples, each once
        assert held_out.isdisjoint(zip(train["file"], train["place"]))
        assert set(answers(evaluation)).isdisjoint(answers(train))
        small_held_out = sum(file.endswith("small.jsonl") for file, _ in held_out)
        assert len(train) == 20 - 4 * small_held_out + 20 - (10 - small_held_out)


def test_a_json_data_file_with_a_sources_field_is_data_and_a_config_is_one_object(tmp_path):
    # Issue 29, item 6: "sources" as a record's provenance field, in JSONL form in a .json file.
    record = {**chat(0), "sources": ["https://example.com/a"]}
    data = _jsonl(tmp_path / "d.json", [record, {**chat(1), "sources": []}])
    assert answers(load_data(str(data))) == ["answer 0", "answer 1"]
    (tmp_path / "one.json").write_text(json.dumps(record, indent=2))  # one record, pretty-printed
    assert answers(load_data(str(tmp_path / "one.json"))) == ["answer 0"]
    (tmp_path / "list.json").write_text(json.dumps([record]))
    assert answers(load_data(str(tmp_path / "list.json"))) == ["answer 0"]
    (tmp_path / "mix.json").write_text(json.dumps({"sources": [{"path": "d.json", "num_samples": 1}]}, indent=2))
    assert len(load_data(str(tmp_path / "mix.json"))) == 1


def test_relative_globs_in_a_data_config_resolve_from_its_folder(tmp_path, monkeypatch):
    # Issue 29, item 10.
    _jsonl(tmp_path / "configs" / "data" / "part-1.jsonl", [chat(1)])
    _jsonl(tmp_path / "configs" / "data" / "part-2.jsonl", [chat(2)])
    config = tmp_path / "configs" / "mix.yaml"
    config.write_text("sources:\n  - path: data/part-*.jsonl\n")
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    assert answers(load_data(str(config))) == ["answer 1", "answer 2"]
