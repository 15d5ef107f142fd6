"""Stage 1 of the data pipeline, reading: a data file into its records, each with its place in the file.

A JSON list (or one JSON object) gives "sample N" places, a JSONL file "line N". Files are read as a stream, one
record at a time, so that a file of millions of samples never sits whole in memory; compressed ones (.gz, .bz2, .xz,
.zst) are decompressed as they are read, and their places are lines of the decompressed text. Every way a file can
be unreadable (missing, not UTF-8, invalid JSON, corrupt compression) is a `DataError` naming the file and the line.
"""

from __future__ import annotations

import codecs
import json
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

from sft.data.files import DECOMPRESSION_ERRORS, CompressionError, compression_of, open_data
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


CHUNK_BYTES = 1 << 20
# A JSON list's record that is still not complete after this many characters is reported as invalid, rather than
# read on to the end of a file of many gigabytes.
MAX_RECORD_CHARS = 1 << 28
BOM = b"\xef\xbb\xbf"


class _Text:
    """A file read as UTF-8 text in chunks: a buffer with the line number of its first character, and undecodable
    bytes reported with their line and byte offset."""

    def __init__(self, handle: BinaryIO, path: Path):
        self.handle, self.path = handle, path
        self.decoder = codecs.getincrementaldecoder("utf-8")()
        self.buffer, self.first_line, self.bytes_read, self.newlines_read = "", 1, 0, 0
        self.finished = False

    def more(self, size: int = CHUNK_BYTES) -> bool:
        """Appends the next chunk to the buffer; False at the end of the file."""
        if self.finished:
            return False
        try:
            chunk = self.handle.read(size)
        except DECOMPRESSION_ERRORS as error:
            line = 1 + self.newlines_read
            message = f"cannot decompress ({error or type(error).__name__})"
            raise DataError(self.path, f"line {line}", None, message) from None
        if self.bytes_read == 0 and chunk.startswith(BOM):
            chunk, self.bytes_read = chunk[len(BOM) :], len(BOM)
        pending = len(self.decoder.getstate()[0])
        try:
            self.buffer += self.decoder.decode(chunk, final=not chunk)
        except UnicodeDecodeError as error:
            line = 1 + self.newlines_read + error.object[: error.start].count(b"\n")
            offset = self.bytes_read - pending + error.start
            of = " of the decompressed text" if compression_of(self.path) else ""
            raise DataError(self.path, f"line {line}", None, f"not valid UTF-8 (byte offset {offset}{of})") from None
        self.bytes_read += len(chunk)
        self.newlines_read += chunk.count(b"\n")
        self.finished = not chunk
        return not self.finished

    def line_at(self, position: int) -> int:
        return self.first_line + self.buffer.count("\n", 0, position)

    def drop(self, position: int) -> None:
        """Forgets the buffer before `position` (read already)."""
        self.first_line = self.line_at(position)
        self.buffer = self.buffer[position:]

    def skip_space(self, position: int) -> int:
        """The position of the next character that is not whitespace, reading on as needed; -1 at the end."""
        while True:
            match = _NOT_SPACE.search(self.buffer, position)
            if match:
                return match.start()
            position = len(self.buffer)
            if not self.more():
                return -1


_NOT_SPACE = re.compile(r"\S")


def _json_list_records(text: _Text, start: int) -> Iterator[tuple[str, Any]]:
    """The records of a JSON list whose "[" is at `start`, one at a time: the file is never held whole."""
    decoder = json.JSONDecoder()
    position, index = start + 1, 0
    while True:
        position = text.skip_space(position)
        if position == -1:
            line = text.line_at(len(text.buffer))
            raise DataError(text.path, f"line {line}", None, "invalid JSON: unterminated list")
        if index == 0 and text.buffer[position] == "]":
            break
        read_size = CHUNK_BYTES
        while True:
            try:
                record, end = decoder.raw_decode(text.buffer, position)
                if end < len(text.buffer) or not text.more(read_size):  # a number may go on in the next chunk
                    break
                continue
            except json.JSONDecodeError as error:
                # Maybe only cut off by the end of the buffer: read on, in growing steps, before calling it invalid.
                if len(text.buffer) - position < MAX_RECORD_CHARS and text.more(read_size):
                    read_size *= 2
                    continue
                line = text.first_line + error.lineno - 1
                raise DataError(text.path, f"line {line}", None, f"invalid JSON: {error.msg}") from None
            except RecursionError:
                message = "nested too deeply"
            except ValueError as error:  # e.g. an integer with more digits than Python converts
                message = str(error)
            raise DataError(text.path, f"line {text.line_at(position)}", None, f"invalid JSON: {message}")
        yield f"sample {index}", record
        index += 1
        position = text.skip_space(end)
        if position == -1:
            raise DataError(text.path, f"line {text.line_at(end)}", None, "invalid JSON: unterminated list")
        if text.buffer[position] == "]":
            break
        if text.buffer[position] != ",":
            raise DataError(text.path, f"line {text.line_at(position)}", None, "invalid JSON: Expecting ',' delimiter")
        position += 1
        if position > CHUNK_BYTES:
            text.drop(position)
            position = 0
    position = text.skip_space(position + 1)
    if position != -1:
        raise DataError(text.path, f"line {text.line_at(position)}", None, "invalid JSON: Extra data")


def iter_records(path: str | os.PathLike) -> Iterator[tuple[str, Any]]:
    """(where, record) of each record of a JSON list (or a single JSON object) or JSONL file, read as a stream:
    memory holds one record at a time, whatever the file's size.

    `where` is "line N" for JSONL and "sample N" (0-based, as in the list) for a JSON list.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(path, "", None, "no such file" if not path.exists() else "not a file")
    try:
        handle = open_data(path)
    except CompressionError as error:
        raise DataError(path, "", None, str(error).split(": ", 1)[-1]) from None
    with handle:
        text = _Text(handle, path)
        start = text.skip_space(0)
        if start == -1:
            raise DataError(path, "", None, "the file is empty")
        if text.buffer[start] == "[":
            yield from _json_list_records(text, start)
            return
        # JSONL: a line at a time (split at "\n" only: JSON text may hold other line separators such as U+2028).
        line_number = text.first_line
        position = 0
        first = True
        while True:
            newline = text.buffer.find("\n", position)
            while newline == -1 and text.more():
                newline = text.buffer.find("\n", position)
            line = text.buffer[position:] if newline == -1 else text.buffer[position:newline]
            if line.strip():
                try:
                    record = _parse_json(line, path, first_line=line_number)
                except DataError:
                    if first and line.lstrip().startswith("{"):
                        whole = _single_object(path)  # a pretty-printed JSON object rather than JSONL
                        if whole is not None:
                            yield "sample 0", whole
                            return
                    raise
                first = False
                yield f"line {line_number}", record
            if newline == -1:
                return
            position, line_number = newline + 1, line_number + 1
            if position > CHUNK_BYTES:
                text.drop(position)
                position = 0


def _single_object(path: Path) -> Any | None:
    """The file as one JSON object, or None when it is not one (such files are small: read whole)."""
    try:
        with open_data(path) as handle:
            record = json.loads(handle.read().decode("utf-8-sig"))
    except (ValueError, RecursionError, *DECOMPRESSION_ERRORS):
        return None
    return record if isinstance(record, dict) else None


def read_records(path: str | os.PathLike) -> list[tuple[str, Any]]:
    """Every (where, record) of a data file (`iter_records`), as a list: for small files."""
    return list(iter_records(path))


class Conversations(list):
    """The conversations of one data file, with where each came from (`path`, `wheres`), so that problems found
    later, when the chat template renders them, are reported at their place in the file too."""

    def __init__(self, conversations: list[list[dict[str, Any]]], path: str | os.PathLike, wheres: list[str]):
        super().__init__(conversations)
        self.path, self.wheres = str(path), wheres
        self.paths: list[str] | None = None  # each conversation's own file, where they come from several
        self.formats: list[str] | None = None  # each one's record format (`sft.data.formats.record_format`)

    def take(self, indices: list[int] | range) -> Conversations:
        """The conversations at `indices`, each still with its file, place and format (a plain slice forgets)."""
        part = Conversations([self[k] for k in indices], self.path, [self.wheres[k] for k in indices])
        part.paths = [self.paths[k] for k in indices] if self.paths else None
        part.formats = [self.formats[k] for k in indices] if self.formats else None
        return part
