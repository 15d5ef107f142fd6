"""What a data file is: its type, by extension and by its first bytes; how it is opened (compressed files are
decompressed as a stream); and its content's fingerprint, which the read cache and the run identity both key on.
"""

from __future__ import annotations

import bz2
import gzip
import hashlib
import lzma
import os
from pathlib import Path
from typing import Any, BinaryIO

from sft.errors import UserError

# The file types read by `datasets` (.json and .jsonl are read by `sft.data.reading`, which names lines).
FILE_BUILDERS = {".parquet": "parquet", ".csv": "csv", ".tsv": "csv", ".arrow": "arrow"}
JSON_EXTENSIONS = (".json", ".jsonl")
DATA_EXTENSIONS = (*JSON_EXTENSIONS, *FILE_BUILDERS)
# Compressed forms, by extension and by the magic bytes they start with.
COMPRESSIONS = {".gz": b"\x1f\x8b", ".bz2": b"BZh", ".xz": b"\xfd7zXZ\x00", ".zst": b"\x28\xb5\x2f\xfd"}
PARQUET_MAGIC = b"PAR1"
ARROW_MAGICS = (b"ARROW1", b"\xff\xff\xff\xff")  # an Arrow IPC file, an Arrow IPC stream (as `datasets` writes)


class CompressionError(UserError, ValueError):
    """A compressed data file that cannot be decompressed (corrupt, cut off, or its codec not installed)."""


def _head(path: Path, size: int = 8) -> bytes:
    try:
        with path.open("rb") as file:
            return file.read(size)
    except OSError:
        return b""


def compression_of(path: str | os.PathLike) -> str | None:
    """The compression of a file (".gz", ".bz2", ".xz", ".zst"): by its extension, else by its first bytes."""
    path = Path(path)
    if path.suffix.lower() in COMPRESSIONS:
        return path.suffix.lower()
    head = _head(path)
    return next((suffix for suffix, magic in COMPRESSIONS.items() if head.startswith(magic)), None)


def data_suffix(path: str | os.PathLike) -> str:
    """A data file's type as an extension: its own, or the one under a compression's (`a.jsonl.gz` is ".jsonl"), or,
    for a file of an unknown extension, the one its first bytes show (Parquet, Arrow; else JSON, read and checked as
    JSON or JSONL)."""
    path = Path(path)
    suffixes = [suffix.lower() for suffix in path.suffixes]
    if suffixes and suffixes[-1] in COMPRESSIONS:
        suffixes.pop()
    if suffixes and suffixes[-1] in DATA_EXTENSIONS:
        return suffixes[-1]
    head = _head(path)
    if head.startswith(PARQUET_MAGIC):
        return ".parquet"
    if head.startswith(ARROW_MAGICS):
        return ".arrow"
    return ".jsonl"


def is_data_file_name(path: str | os.PathLike) -> bool:
    """Whether a file's name says it holds data: a data extension, plain or compressed (`a.jsonl.gz`)."""
    suffixes = [suffix.lower() for suffix in Path(path).suffixes]
    if suffixes and suffixes[-1] in COMPRESSIONS:
        suffixes.pop()
    return bool(suffixes) and suffixes[-1] in DATA_EXTENSIONS


def open_data(path: str | os.PathLike) -> BinaryIO:
    """A data file opened for reading bytes, decompressed as it is read where it is compressed."""
    path = Path(path)
    compression = compression_of(path)
    if compression == ".gz":
        return gzip.open(path, "rb")
    if compression == ".bz2":
        return bz2.open(path, "rb")
    if compression == ".xz":
        return lzma.open(path, "rb")
    if compression == ".zst":
        try:
            import zstandard
        except ImportError:
            raise CompressionError(f"{path}: a .zst file needs the zstandard package (pip install zstandard)") from None
        return zstandard.open(path, "rb")
    return path.open("rb")


# Errors a decompressor raises on corrupt or cut-off data.
DECOMPRESSION_ERRORS = (EOFError, gzip.BadGzipFile, lzma.LZMAError, OSError, ValueError)

# A file up to this size is hashed whole; a bigger one by its size, modification time, first and last MiB.
WHOLE_HASH_LIMIT = 64 * 2**20
HEAD_TAIL_BYTES = 2**20


def file_fingerprint(path: str | os.PathLike) -> dict[str, Any]:
    """A file's content in brief: sha256 of the whole file, or, over WHOLE_HASH_LIMIT, of its size, mtime and
    first and last MiB (cheap for data sets of many GB; an edit that keeps size and mtime goes unseen here, which
    `content_key` closes for the read cache)."""
    path = Path(path)
    stat = path.stat()
    digest = hashlib.sha256()
    with path.open("rb") as file:
        if stat.st_size <= WHOLE_HASH_LIMIT:
            for block in iter(lambda: file.read(2**20), b""):
                digest.update(block)
            kind = "sha256"
        else:
            digest.update(f"{stat.st_size}:{stat.st_mtime_ns}:".encode())
            digest.update(file.read(HEAD_TAIL_BYTES))
            file.seek(stat.st_size - HEAD_TAIL_BYTES)
            digest.update(file.read(HEAD_TAIL_BYTES))
            kind = "sha256(size,mtime,head,tail)"
    return {"path": str(path.resolve()), "size": stat.st_size, kind: digest.hexdigest()}


def content_key(path: str | os.PathLike) -> dict[str, Any]:
    """What the read cache keys a file on: `file_fingerprint` (its whole content up to WHOLE_HASH_LIMIT), and over
    that also its inode and change time, which every write sets and neither `cp -p`, `rsync -t` nor `touch` can put
    back: a rewritten big file is read again, never served from the cache."""
    key = file_fingerprint(path)
    if "sha256" not in key:
        stat = Path(path).stat()
        key.update(inode=stat.st_ino, ctime_ns=stat.st_ctime_ns)
    return key
