"""Stage 1 of the data pipeline, reading: a data file into its records, each with its place in the file.

A JSON list (or one JSON object) gives "sample N" places, a JSONL file "line N". Every way a file can be unreadable
(missing, not UTF-8, invalid JSON) is a `DataError` naming the file and the line.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from sft.errors import UserError


class DataError(UserError, ValueError):
    """A problem in a data file, with where it is: file, line or sample, and field.

    A ValueError too, so that callers written before `UserError` existed still catch it."""

    def __init__(self, path: str | os.PathLike, where: str, field: str | None, message: str):
        self.path, self.where, self.field = str(path), where, field
        location = f"{self.path}, {where}" if where else self.path
        if field:
            location += f", field '{field}'"
        super().__init__(f"{location}: {message}")


def _parse_json(text: str, path: Path, first_line: int) -> Any:
    """json.loads, with every way it can fail turned into a DataError that names the line."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise DataError(path, f"line {first_line + error.lineno - 1}", None, f"invalid JSON: {error.msg}") from None
    except RecursionError:
        raise DataError(path, f"line {first_line}", None, "invalid JSON: nested too deeply") from None
    except ValueError as error:  # e.g. an integer with more digits than Python converts
        raise DataError(path, f"line {first_line}", None, f"invalid JSON: {error}") from None


def read_records(path: str | os.PathLike) -> list[tuple[str, Any]]:
    """Reads a JSON list (or a single JSON object) or JSONL file into (where, record) pairs.

    `where` is "line N" for JSONL and "sample N" (0-based, as in the list) for a JSON list.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(path, "", None, "no such file" if not path.exists() else "not a file")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = raw[: error.start].count(b"\n") + 1
        raise DataError(path, f"line {line}", None, f"not valid UTF-8 (byte offset {error.start})") from None

    stripped = text.lstrip()
    if not stripped:
        raise DataError(path, "", None, "the file is empty")
    if stripped[0] == "[":
        records = _parse_json(text, path, first_line=1)
        return [(f"sample {index}", record) for index, record in enumerate(records)]

    lines = text.splitlines()
    if stripped[0] == "{" and len(lines) > 1:
        try:  # a pretty-printed single JSON object rather than JSONL
            return [("sample 0", json.loads(text))]
        except (ValueError, RecursionError):
            pass
    records = []
    for line_number, line in enumerate(lines, start=1):
        if line.strip():
            records.append((f"line {line_number}", _parse_json(line, path, first_line=line_number)))
    return records


class Conversations(list):
    """The conversations of one data file, with where each came from (`path`, `wheres`), so that problems found
    later, when the chat template renders them, are reported at their place in the file too."""

    def __init__(self, conversations: list[list[dict[str, Any]]], path: str | os.PathLike, wheres: list[str]):
        super().__init__(conversations)
        self.path, self.wheres = str(path), wheres
        self.paths: list[str] | None = None  # each conversation's own file, where they come from several
        self.formats: list[str] | None = None  # each one's record format (`sft.data.formats.record_format`)
