"""Opening a data file: compression and what a file holds, recognised by its first bytes; its lines as bytes.

The readers (`reading`, `json_check`) see a gzip, bz2 or xz file as its decompressed bytes, as datasets does; a
damaged compressed file, or a file that is not JSON text (another encoding, an archive, an image), fails in one line.
"""

from __future__ import annotations

import bz2
import codecs
import gzip
import lzma
import os
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import IO

from .errors import EXPECTED_SOURCE, DataFormatError

JSON_SPACE = b" \t\r\n"
_COMPRESSED: dict[bytes, Callable[[str], IO[bytes]]] = {
    b"\x1f\x8b": gzip.open,
    b"BZh": bz2.open,
    b"\xfd7zXZ\x00": lzma.open,
}
_NOT_JSON_TEXT = {
    b"PK\x03\x04": "a zip archive (or an Office document)",
    b"\x89PNG": "a PNG image",
    b"\xff\xd8\xff": "a JPEG image",
    b"GIF8": "a GIF image",
    b"%PDF": "a PDF document",
    b"ARROW1": "an .arrow table file (pass the folder written by Dataset.save_to_disk instead)",
    b"\x28\xb5\x2f\xfd": "zstd-compressed data (decompress it first)",
    b"\x04\x22\x4d\x18": "lz4-compressed data (decompress it first)",
    b"7z\xbc\xaf\x27\x1c": "a 7-Zip archive",
    b"Rar!": "a RAR archive",
    b"SQLite format 3\x00": "an SQLite database",
}
_DAMAGED = (EOFError, OSError, zlib.error, lzma.LZMAError)
"""What a damaged or truncated compressed file raises while it is read (gzip.BadGzipFile is an OSError)."""


def _opener(path: str) -> Callable[[str], IO[bytes]] | None:
    """The decompressing `open` for a gzip/bz2/xz file (datasets decompresses those too), or None for a plain one."""
    with open(path, "rb") as handle:
        magic = handle.read(6)
    return next((opener for prefix, opener in _COMPRESSED.items() if magic.startswith(prefix)), None)


@contextmanager
def open_data(path: str) -> Iterator[IO[bytes]]:
    """The file's bytes, decompressed; a damaged compressed file becomes a `DataFormatError`."""
    opener = _opener(path)
    if opener is None:
        with open(path, "rb") as handle:
            yield handle
        return
    try:
        with opener(path) as handle:
            yield handle
    except _DAMAGED:
        raise DataFormatError(
            f"{path}: the compressed data is damaged or cut short; expected a complete gzip, bz2 or xz file"
        ) from None


def file_lines(path: str) -> Iterator[bytes]:
    """The file's lines as bytes (ends kept), decompressed; a lone CR ends a line too, as in editors."""
    with open_data(path) as handle:
        for line in handle:
            if b"\r" in line and line.count(b"\r") > line.endswith(b"\r\n"):
                yield from line.splitlines(keepends=True)
            else:
                yield line


def head_bytes(path: str, size: int = 8192) -> bytes:
    """The first `size` bytes of the file's data, decompressed."""
    with open_data(path) as handle:
        return handle.read(size)


def not_json_text(head: bytes) -> str | None:
    """Why a file starting with `head` cannot be JSON text in UTF-8 (another encoding, binary data), or None."""
    if head.startswith((codecs.BOM_UTF32_LE, codecs.BOM_UTF32_BE)):
        return "looks like UTF-32 text (it starts with a UTF-32 byte-order mark); expected UTF-8: re-save it as UTF-8"
    if head.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        return "looks like UTF-16 text (it starts with a UTF-16 byte-order mark); expected UTF-8: re-save it as UTF-8"
    for magic, kind in _NOT_JSON_TEXT.items():
        if head.startswith(magic):
            return f"looks like {kind}, not text; expected {EXPECTED_SOURCE}"
    if head[257:262] == b"ustar":
        return f"looks like a tar archive, not text; expected {EXPECTED_SOURCE}"
    if b"\x00" in head:
        half = len(head) // 2
        if max(head[0::2].count(0), head[1::2].count(0)) > 0.4 * half:  # ASCII text with a zero byte before or after
            return "looks like UTF-16 text (every other byte is zero); expected UTF-8: re-save it as UTF-8"
        return f"holds binary data (it contains zero bytes), not text; expected {EXPECTED_SOURCE}"
    return None


def is_blank(line: bytes) -> bool:
    """Whether a line holds only JSON white space (and so no row)."""
    return not line.strip(JSON_SPACE)


def has_content(path: str) -> bool:
    """Whether the file holds anything but white space."""
    return any(not is_blank(line) for line in file_lines(path))


def data_size(path: str) -> int:
    """The size of the file's data in bytes, decompressed."""
    if _opener(path) is None:
        return os.path.getsize(path)
    size = 0
    with open_data(path) as handle:
        while chunk := handle.read(1 << 20):
            size += len(chunk)
    return size
