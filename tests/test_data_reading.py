"""Reading data files as streams (sft.data.reading.iter_records): records and places equal to reading the file
whole, however the file falls into chunks, and errors naming the line wherever it is."""

from __future__ import annotations

import bz2
import gzip
import json
import lzma

import pytest

from sft.data import DataError, reading
from sft.data.reading import iter_records

RECORDS = [{"messages": [{"role": "user", "content": f"q{k} " + "é" * k + "\u2028"}], "n": 10**k} for k in range(30)]


@pytest.fixture(params=[1, 7, 1 << 20], ids=["1-byte chunks", "7-byte chunks", "1-MiB chunks"])
def chunk_bytes(request, monkeypatch):
    monkeypatch.setattr(reading, "CHUNK_BYTES", request.param)
    return request.param


def test_a_json_list_streams_to_the_records_json_reads(tmp_path, chunk_bytes):
    path = tmp_path / "list.json"
    path.write_text(json.dumps([*RECORDS, 12345, [1, 2]], indent=2, ensure_ascii=False), encoding="utf-8")
    got = list(iter_records(path))
    assert [record for _, record in got] == json.loads(path.read_text(encoding="utf-8"))
    assert [where for where, _ in got] == [f"sample {k}" for k in range(len(RECORDS) + 2)]


def test_jsonl_lines_split_at_newlines_only_with_a_bom_and_blank_lines(tmp_path, chunk_bytes):
    path = tmp_path / "lines.jsonl"
    lines = [json.dumps(record, ensure_ascii=False) for record in RECORDS]
    path.write_bytes(b"\xef\xbb\xbf" + "\n\n".join(lines).encode() + b"\r\n\n")
    got = list(iter_records(path))
    assert [record for _, record in got] == RECORDS  # U+2028 inside a string does not end a line
    assert [where for where, _ in got] == [f"line {2 * k + 1}" for k in range(len(RECORDS))]


@pytest.mark.parametrize(
    ("content", "line", "message"),
    [
        ('[{"a": 1},\n{"b": 2}\n{"c": 3}]', 3, "Expecting ',' delimiter"),
        ('[{"a": 1},\n\n{"b": }]', 3, "invalid JSON"),
        ('[{"a": 1},\n{"b": 2}', 2, "unterminated list"),
        ('[{"a": 1}]\n\n{"b": 2}', 3, "Extra data"),
        ('{"a": 1}\n{"b": 2}\n{"c": }\n', 3, "invalid JSON"),
    ],
)
def test_invalid_json_is_reported_at_its_line_in_any_chunk(tmp_path, chunk_bytes, content, line, message):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(DataError, match=rf"line {line}: .*{message}"):
        list(iter_records(path))


def test_invalid_utf8_names_its_line_and_byte_offset(tmp_path, chunk_bytes):
    path = tmp_path / "bad.jsonl"
    good = json.dumps(RECORDS[0]).encode() + b"\n"
    path.write_bytes(good * 3 + b'{"a": "caf\xe9"}\n')
    offset = len(good) * 3 + len(b'{"a": "caf')
    with pytest.raises(DataError, match=rf"line 4: not valid UTF-8 \(byte offset {offset}\)"):
        list(iter_records(path))


def test_a_pretty_printed_single_object_is_one_sample(tmp_path, chunk_bytes):
    path = tmp_path / "one.json"
    path.write_text(json.dumps(RECORDS[3], indent=2))
    assert list(iter_records(path)) == [("sample 0", RECORDS[3])]


COMPRESSORS = {".gz": gzip.compress, ".bz2": bz2.compress, ".xz": lzma.compress}


@pytest.mark.parametrize("suffix", list(COMPRESSORS))
def test_compressed_files_are_read_with_their_lines(tmp_path, chunk_bytes, suffix):
    # Issue 29, item 8: `.jsonl.gz` (and bz2, xz) read as the JSONL it holds, an error at its line of the text.
    compress = COMPRESSORS[suffix]
    lines = [json.dumps(record, ensure_ascii=False) for record in RECORDS[:5]]
    path = tmp_path / f"data.jsonl{suffix}"
    path.write_bytes(compress(("\n".join(lines) + "\n").encode()))
    got = list(iter_records(path))
    assert got == [(f"line {k + 1}", record) for k, record in enumerate(RECORDS[:5])]
    bad = tmp_path / f"bad.json{suffix}"
    bad.write_bytes(compress(("\n".join(lines[:3]) + '\n{"a": }\n').encode()))
    with pytest.raises(DataError, match=rf"bad.json{suffix}, line 4: invalid JSON"):
        list(iter_records(bad))
    cut = tmp_path / f"cut.jsonl{suffix}"
    cut.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])
    with pytest.raises(DataError, match=rf"cut.jsonl{suffix}, line \d+: cannot decompress"):
        list(iter_records(cut))


def test_a_compressed_file_is_known_by_its_first_bytes_and_a_missing_codec_is_one_error(tmp_path):
    path = tmp_path / "download.jsonl"  # gzip content under a plain name
    path.write_bytes(gzip.compress(json.dumps(RECORDS[0]).encode() + b"\n"))
    assert list(iter_records(path)) == [("line 1", RECORDS[0])]
    try:
        import zstandard
    except ImportError:
        (tmp_path / "d.jsonl.zst").write_bytes(b"\x28\xb5\x2f\xfd" + b"\0" * 8)
        with pytest.raises(DataError, match="d.jsonl.zst: a .zst file needs the zstandard package"):
            list(iter_records(tmp_path / "d.jsonl.zst"))
    else:
        (tmp_path / "d.jsonl.zst").write_bytes(zstandard.compress(json.dumps(RECORDS[0]).encode()))
        assert list(iter_records(tmp_path / "d.jsonl.zst")) == [("line 1", RECORDS[0])]
