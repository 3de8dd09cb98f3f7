"""Reading any dataset source (Dataset, JSONL/JSON/Parquet file, saved folder, hub name), naming file and line in errors.

Nothing here judges a row's shape (that is `rules.py` and `forms.py`); this module makes sure that whatever the user
points at either loads, or fails with one line that names the file, the line and what was expected, never with a
pyarrow, datasets or json message. datasets (through pyarrow) reads JSON lines fast but explains nothing, accepts
some broken input (bytes that are not UTF-8) and crashes the process on some (very deep nesting, a `null` row). So a
cheap scan keeps the crashes from pyarrow, a file datasets refuses is re-read line by line with `json` to find the
line at fault, and what it accepted is checked for bytes that are not UTF-8.
"""

from __future__ import annotations

import bz2
import codecs
import gzip
import json
import logging
import lzma
import os
import re
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import IO, Any

import numpy as np
import pyarrow as pa
from datasets import Dataset, DatasetDict, load_dataset, load_from_disk

EXPECTED_ROW = '{"messages": [{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}]}'
EXPECTED_SOURCE = (
    "a JSON lines file (.jsonl, plain or gzip/bz2/xz-compressed), a JSON array file (.json), a Parquet file, "
    "a folder written by Dataset.save_to_disk, or a hub dataset name"
)
MAX_NESTING = 63
"""The most levels of arrays and objects a row may nest, counting the row itself: deeper rows cannot be stored."""

logger = logging.getLogger(__name__)


class DataFormatError(ValueError):
    """A dataset or one of its rows does not have the expected shape; the message names the file, line and field."""


@dataclass(frozen=True)
class DatasetOrigin:
    """Names a dataset in messages, and turns a row index into `file, line N` (JSON lines) or `name, row N`.

    `rows` (the number of rows read from `json_path`) tells whether every non-blank line holds exactly one row.
    """

    label: str
    json_path: str | None = None
    rows: int | None = None

    def where(self, row: int) -> str:
        if self.json_path is None:
            return f"{self.label}, row {row}"
        return f"{self.json_path}, line {line_of_row(self.json_path, row, self.rows)}"


# ----------------------------------------------------------------------------------------------------------------------
# Opening a file: compression and what a file holds, recognised by its first bytes
# ----------------------------------------------------------------------------------------------------------------------

_JSON_SPACE = b" \t\r\n"
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
def _open_data(path: str) -> Iterator[IO[bytes]]:
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


def _lines(path: str) -> Iterator[bytes]:
    """The file's lines as bytes (ends kept), decompressed; a lone CR ends a line too, as in editors."""
    with _open_data(path) as handle:
        for line in handle:
            if b"\r" in line and line.count(b"\r") > line.endswith(b"\r\n"):
                yield from line.splitlines(keepends=True)
            else:
                yield line


def _head(path: str, size: int = 8192) -> bytes:
    with _open_data(path) as handle:
        return handle.read(size)


def _not_json_text(head: bytes) -> str | None:
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


def _is_blank(line: bytes) -> bool:
    return not line.strip(_JSON_SPACE)


def _has_content(path: str) -> bool:
    return any(not _is_blank(line) for line in _lines(path))


# ----------------------------------------------------------------------------------------------------------------------
# Naming a row by its line
# ----------------------------------------------------------------------------------------------------------------------


def line_of_row(path: str, row: int, rows: int | None = None) -> int:
    """The 1-based line where the `row`-th JSON value of a JSON lines file starts (blank lines hold no row).

    Counting non-blank lines is right when each holds one value; when the file has `rows` values but not as many
    non-blank lines (two objects on a line, or an object spread over lines), the values are parsed to find it.
    """
    line_number, found, non_blank = 0, None, 0
    for line_number, line in enumerate(_lines(path), start=1):
        if not _is_blank(line):
            if non_blank == row:
                found = line_number
                if rows is None:
                    return found
            non_blank += 1
    if rows is not None and non_blank != rows:
        for index, (start, _value, _text) in enumerate(_json_values(path, json.JSONDecoder())):
            if index == row:
                return start
    return found if found is not None else line_number + 1  # past the end: only if the file changed under us


# ----------------------------------------------------------------------------------------------------------------------
# Explaining a JSON file that datasets refused: the first line at fault, found with `json`
# ----------------------------------------------------------------------------------------------------------------------

RowCheck = Callable[[dict], "str | None"]
"""Says why one parsed row is not what the caller expects (None if it is fine); used to explain a failed read."""


class _LineProblem(Exception):
    """A problem found while walking the values of a JSON lines file, at `line` (the message says what)."""

    def __init__(self, line: int, message: str) -> None:
        super().__init__(message)
        self.line = line


class _DuplicateKey(Exception):
    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


def _refuse_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict:
    """`object_pairs_hook` that refuses a field given twice in one object (which value counts would be a guess)."""
    result = dict(pairs)
    if len(result) != len(pairs):
        seen: set[str] = set()
        raise _DuplicateKey(next(key for key, _ in pairs if key in seen or seen.add(key)))
    return result


def _utf8_problem(line: bytes, first_line: bool) -> str | None:
    """Why `line` is not UTF-8 text, naming the byte and its column, or None."""
    if first_line:
        line = line.removeprefix(codecs.BOM_UTF8)
    elif line.startswith(codecs.BOM_UTF8):
        return (
            "starts with a byte-order mark (U+FEFF), as if two files were joined; "
            "expected one JSON object per line and a byte-order mark, if any, only at the start of the file"
        )
    try:
        line.decode("utf-8")
    except UnicodeDecodeError as error:
        column = len(line[: error.start].decode("utf-8")) + 1
        return (
            f"not valid UTF-8 (byte 0x{line[error.start]:02x} at column {column}); expected UTF-8 text "
            "(if the file is in another encoding, such as Latin-1 or Windows-1252, re-save it as UTF-8)"
        )
    return None


class _Positions:
    """Turns increasing offsets into a text that starts at (`line`, `column`) of the file into (line, column)."""

    def __init__(self, text: str, line: int, column: int) -> None:
        self.text, self.line, self.column, self.offset = text, line, column, 0

    def at(self, offset: int) -> tuple[int, int]:
        newline = self.text.rfind("\n", self.offset, offset)
        if newline >= 0:
            self.line += self.text.count("\n", self.offset, offset)
            self.column = -newline  # so that the character after the newline is in column 1
        self.offset = offset
        return self.line, self.column + offset


def _syntax_problem(error: json.JSONDecodeError, start: int, where: tuple[int, int], at_end: bool) -> str:
    """A JSON syntax error at `where` (line, column), in a value that starts on line `start`."""
    line, column = where
    reason = error.msg.removesuffix(" at")  # "Invalid control character at"
    expected = f"expected one JSON object per line, such as {EXPECTED_ROW}"
    # A JSON string cannot go on to the next line: a line ending inside one was most likely cut short.
    if reason.startswith("Unterminated string"):
        return f"malformed JSON (the line ends inside a string that starts at column {column}, as if cut short); {expected}"
    if reason == "Invalid control character" and error.doc[error.pos] in "\r\n":
        return f"malformed JSON (the line ends inside a string, at column {column}, as if cut short); {expected}"
    if at_end:
        found = f"the file ends before the value is closed: {reason}"
    elif line != start:
        found = f"the value that starts on this line is not closed: {reason}"
    else:
        found = reason
    at = f"line {line}, column {column}" if line != start else f"column {column}"
    return f"malformed JSON ({found} at {at}); {expected}"


def _parse_values(
    text: str, origin: tuple[int, int], decoder: json.JSONDecoder, at_end: bool
) -> Iterator[tuple[int, Any, str]]:
    """The JSON values in `text` (which starts at `origin`, a line and column), each with its line and its text.

    Returns the unfinished value at the end of `text`, if any, and where it starts: it may go on on the next line.
    """
    positions = _Positions(text, *origin)
    position = _skip_space(text, 0)
    while position < len(text):
        line, column = positions.at(position)
        try:
            value, end = decoder.raw_decode(text, position)
        except json.JSONDecodeError as error:
            cut_off = error.pos >= len(text.rstrip(" \t\r\n"))
            if cut_off and not at_end:
                return text[position:], (line, column)
            raise _LineProblem(line, _syntax_problem(error, line, positions.at(error.pos), cut_off)) from None
        except RecursionError:
            raise _LineProblem(line, _too_deep()) from None
        except _DuplicateKey as duplicate:
            raise _LineProblem(
                line, f"field {duplicate.key!r} appears twice in one object; expected each field once"
            ) from None
        yield line, value, text[position:end]
        position = _skip_space(text, end)
    return "", origin


def _json_values(path: str, decoder: json.JSONDecoder) -> Iterator[tuple[int, Any, str]]:
    """Each top-level JSON value of a JSON lines file with the line it starts on and its text, as pyarrow reads them.

    Like pyarrow, it accepts several values on a line and a value spread over several lines (pretty-printed). A
    line that is not UTF-8 or not JSON raises `_LineProblem`.
    """
    pending, origin = "", (1, 1)  # the start of a value not closed at the end of its line, and where it starts
    parse_at = 0  # a long unclosed value is parsed again once it doubled in length, not on every line
    for line_number, raw in enumerate(_lines(path), start=1):
        problem = _utf8_problem(raw, first_line=line_number == 1)
        if problem:
            raise _LineProblem(line_number, problem)
        text = raw.decode("utf-8")
        if line_number == 1:
            text = text.removeprefix("\ufeff")
        if not pending:
            if _is_blank(raw):
                continue
            origin = (line_number, 1)
        pending += text
        if len(pending) >= parse_at:
            pending, origin = yield from _parse_values(pending, origin, decoder, at_end=False)
            parse_at = 2 * len(pending)
    if pending:
        yield from _parse_values(pending, origin, decoder, at_end=True)


def _skip_space(text: str, position: int) -> int:
    while position < len(text) and text[position] in " \t\r\n":
        position += 1
    return position


def _too_deep(depth: int | None = None) -> str:
    found = f", got {depth}" if depth else ""
    return f"arrays and objects nested too deeply; expected at most {MAX_NESTING} levels (counting the row){found}"


def _json_type(value: Any) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}.get(
        type(value), "number"
    )


def _field_name(path: str, key: str | int) -> str:
    if isinstance(key, int):
        return f"{path}[{key}]"
    return f"{path}.{key}" if path else repr(key)


def _value_problem(row: Any, text: str | None = None) -> str | None:
    """What no dataset can store about one parsed row: not an object, too deep, or a lone UTF-16 surrogate escape.

    `text`, the row's JSON, spares the walk through its values when it has too few brackets to be too deep and no
    escape of a surrogate.
    """
    if not isinstance(row, dict):
        return f"expected a JSON object such as {EXPECTED_ROW}, got {_json_type(row)}"
    if text is not None and text.count("[") + text.count("{") <= MAX_NESTING and not _SURROGATE_ESCAPE.search(text):
        return None
    stack: list[tuple[Any, str, int]] = [(row, "", 1)]  # (value, field name, depth): iterative, for deep rows
    while stack:
        value, name, depth = stack.pop()
        if isinstance(value, (dict, list)):
            if depth > MAX_NESTING:
                return _too_deep(depth + _depth_below(value))
            items = value.items() if isinstance(value, dict) else enumerate(value)
            for key, item in items:
                if isinstance(key, str) and _has_lone_surrogate(key):
                    return f"field {_field_name(name, key)}: the name holds a lone surrogate escape; expected text"
                stack.append((item, _field_name(name, key), depth + 1))
        elif isinstance(value, str) and _has_lone_surrogate(value):
            return (
                f"field {name}: a \\ud800-\\udfff escape without its pair (a lone UTF-16 surrogate); "
                "expected valid Unicode text"
            )
    return None


def _depth_below(value: Any) -> int:
    """How many levels of arrays and objects lie under `value` (iterative: the value may be very deep)."""
    deepest, stack = 0, [(value, 0)]
    while stack:
        item, depth = stack.pop()
        deepest = max(deepest, depth)
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else ()
        stack.extend((child, depth + 1) for child in children if isinstance(child, (dict, list)))
    return deepest


_SURROGATE = re.compile("[\ud800-\udfff]")
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


def _has_lone_surrogate(text: str) -> bool:
    return _SURROGATE.search(text) is not None  # `json` decodes a valid pair into one character


def _type_conflict(value: Any, path: str, seen: dict[str, str]) -> str | None:
    """The first field whose JSON type differs from the type it had on an earlier line (pyarrow cannot mix them)."""
    kind = _json_type(value)
    if kind != "null":
        first = seen.setdefault(path, kind)
        if first != kind:
            return f"field {path}: expected {first} (as on earlier lines), got {kind}"
    if isinstance(value, dict):
        for key, item in value.items():
            problem = _type_conflict(item, f"{path}.{key}" if path else repr(key), seen)
            if problem:
                return problem
    elif isinstance(value, list):
        for item in value:
            problem = _type_conflict(item, f"{path}[]", seen)
            if problem:
                return problem
    return None


def _first_bad_line(path: str, row_problem: RowCheck | None, type_conflicts: bool = False) -> DataFormatError | None:
    """The first line of a JSON lines file that is not UTF-8, not JSON, not an object, too deep or refused by
    `row_problem` (and, if asked, whose field types differ from earlier lines'); None if every line is fine."""
    seen: dict[str, str] = {}
    try:
        decoder = json.JSONDecoder(object_pairs_hook=_refuse_duplicate_keys)
        for line_number, row, text in _json_values(path, decoder):
            problem = _value_problem(row, text) or (row_problem(row) if row_problem else None)
            if problem is None and type_conflicts:
                problem = _type_conflict(row, "", seen)
            if problem is not None:
                return DataFormatError(f"{path}, line {line_number}: {problem}")
    except _LineProblem as problem:
        return DataFormatError(f"{path}, line {problem.line}: {problem}")
    return None


def _first_bad_element(path: str, row_problem: RowCheck | None) -> DataFormatError | None:
    """The first problem in a JSON array file: its syntax (by line and column), or the first element at fault."""
    with _open_data(path) as handle:
        data = handle.read()
    problem = _utf8_problem(data, first_line=True)  # the whole file: report the line of the bad byte
    if problem:
        lines = data.removeprefix(codecs.BOM_UTF8).split(b"\n")
        for number, line in enumerate(lines, start=1):
            problem = _utf8_problem(line, first_line=True)
            if problem:
                return DataFormatError(f"{path}, line {number}: {problem}")
    try:
        rows = json.loads(data.decode("utf-8-sig"), object_pairs_hook=_refuse_duplicate_keys)
    except json.JSONDecodeError as error:
        if error.msg == "Extra data":  # more after the array: JSON lines whose first line is an array
            return _first_bad_line(path, row_problem)
        return DataFormatError(
            f"{path}, line {error.lineno}: malformed JSON ({error.msg.removesuffix(' at')} at column {error.colno}); "
            f"expected a JSON array of objects such as [{EXPECTED_ROW}]"
        )
    except RecursionError:
        return DataFormatError(f"{path}: {_too_deep()}")
    except _DuplicateKey as duplicate:
        return DataFormatError(f"{path}: field {duplicate.key!r} appears twice in one object; expected each field once")
    if not isinstance(rows, list) or not rows:
        got = "an empty array" if isinstance(rows, list) else _json_type(rows)
        return DataFormatError(f"{path}: expected a JSON array of objects such as [{EXPECTED_ROW}], got {got}")
    for index, row in enumerate(rows):
        problem = _value_problem(row) or (row_problem(row) if row_problem else None)
        if problem is not None:
            return DataFormatError(f"{path}, row {index}: {problem}")
    return None


# ----------------------------------------------------------------------------------------------------------------------
# Reading a JSON file
# ----------------------------------------------------------------------------------------------------------------------

CRASH_GUARD_BRACKETS = 4096
"""Opening brackets on one line above which the file is parsed with `json` before pyarrow sees it."""


@contextmanager
def _quiet_json_builder():
    """datasets logs its own pyarrow error before raising; we replace that with a message naming the line."""
    json_logger = logging.getLogger("datasets.packaged_modules.json.json")
    level = json_logger.level
    json_logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        json_logger.setLevel(level)


def _may_crash_pyarrow(path: str) -> bool:
    """Whether pyarrow's JSON parser might crash the process (a crash, not an exception) on this file.

    It crashes on nesting near 10,000 levels, and on a read that starts with `null` (datasets reads in 10 MB
    pieces, each starting at a line). So: a line with more than `CRASH_GUARD_BRACKETS` opening brackets (a line
    nests no deeper than that), or a line whose first non-blank byte is `n`. Counted per line with numpy in 64 KB
    chunks: a few hundredths of a second per 100 MB.
    """
    carried = 0  # opening brackets of the line that runs on from the previous chunk
    with _open_data(path) as handle:
        chunk = handle.read(1 << 16)
        if chunk.removeprefix(codecs.BOM_UTF8).lstrip(_JSON_SPACE).startswith(b"n"):
            return True
        previous_ends_line = False
        while chunk:
            data = np.frombuffer(chunk, dtype=np.uint8)
            # A line whose first non-blank byte is `n` (JSON strings hold no raw newline, so that is a `null` row):
            # for each `n`, the last byte before it that is not a space, tab or CR must be a newline.
            blank = (data == ord(" ")) | (data == ord("\t")) | (data == ord("\r"))
            last_kept = np.maximum.accumulate(np.where(blank, -1, np.arange(len(data))))
            at_n = np.flatnonzero(data == ord("n"))
            before = last_kept[np.maximum(at_n - 1, 0)]
            after_newline = np.where(at_n == 0, -1, before)
            if (after_newline >= 0).any() and (data[after_newline[after_newline >= 0]] == ord("\n")).any():
                return True
            if previous_ends_line and chunk.lstrip(b" \t\r").startswith(b"n"):
                return True
            opening = np.cumsum((data | 0x20) == ord("{"))  # "[" is 0x5b and "{" 0x7b: no other byte maps to 0x7b
            newlines = np.flatnonzero(data == ord("\n"))
            if len(newlines) == 0:
                carried += int(opening[-1])
            else:  # opening brackets per line; the first line holds what ran on from the previous chunk
                per_line = np.diff(opening[newlines], prepend=0)
                if carried + int(per_line[0]) > CRASH_GUARD_BRACKETS or int(per_line.max()) > CRASH_GUARD_BRACKETS:
                    return True
                carried = int(opening[-1] - opening[newlines[-1]])
            if carried > CRASH_GUARD_BRACKETS:
                return True
            previous_ends_line = chunk.endswith(b"\n")
            chunk = handle.read(1 << 16)
    return False


def _from_json(path: str, **options: Any) -> Dataset:
    with _quiet_json_builder():
        return Dataset.from_json(path, **options)


def _data_size(path: str) -> int:
    if _opener(path) is None:
        return os.path.getsize(path)
    size = 0
    with _open_data(path) as handle:
        while chunk := handle.read(1 << 20):
            size += len(chunk)
    return size


def _has_invalid_utf8(dataset: Dataset) -> bool:
    """Whether a string in `dataset` is not UTF-8: pyarrow reads such bytes without complaint (checked in C, fast)."""
    try:
        dataset.data.validate(full=True)
    except pa.ArrowException:
        return True
    return False


def _read_json(path: str, is_array: bool, row_problem: RowCheck | None) -> Dataset:
    """Read a JSON lines or JSON array file with datasets; explain a refusal by the first line at fault."""
    if not is_array and _may_crash_pyarrow(path):
        problem = _first_bad_line(path, row_problem)  # every line parsed with `json` before pyarrow sees one
        if problem is not None:
            raise problem
    try:
        dataset = _from_json(path)
    except Exception as error:  # pyarrow / datasets errors: explain them by line instead
        logger.debug("datasets could not read %s", path, exc_info=error)
        dataset = _read_json_again(path, is_array, row_problem)
    if _has_invalid_utf8(dataset):
        raise _explain(path, is_array, row_problem, type_conflicts=False) or DataFormatError(
            f"{path}: holds text that is not valid UTF-8; expected UTF-8 text"
        )
    return dataset


def _read_json_again(path: str, is_array: bool, row_problem: RowCheck | None) -> Dataset:
    """After datasets refused the file: the line at fault, or a second read for a field first seen after 10 MB."""
    problem = _explain(path, is_array, row_problem, type_conflicts=False)
    if problem is not None:
        raise problem
    # Every line is sound JSON: datasets fixes the columns from the first 10 MB it reads, so a field that first
    # appears later fails; reading the file in one piece (slower, more memory) sees every field.
    if not is_array:  # an array is always read in one piece
        try:
            return _from_json(path, chunksize=_data_size(path) + 1)
        except Exception as error:
            logger.debug("datasets could not read %s in one piece", path, exc_info=error)
    raise _explain(path, is_array, row_problem, type_conflicts=True) or DataFormatError(
        f"{path}: could not be read as JSON lines, although each line is valid JSON; expected one JSON object per "
        f"line with the same fields and types on every line, such as {EXPECTED_ROW}"
    )


def _explain(path: str, is_array: bool, row_problem: RowCheck | None, type_conflicts: bool) -> DataFormatError | None:
    if is_array:
        return _first_bad_element(path, row_problem)
    return _first_bad_line(path, row_problem, type_conflicts)


# ----------------------------------------------------------------------------------------------------------------------
# Reading any source
# ----------------------------------------------------------------------------------------------------------------------

_HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
_JSON_SUFFIXES = (".jsonl", ".json", ".ndjson", ".jsonl.gz", ".json.gz", ".jsonl.bz2", ".jsonl.xz")
_DATA_SUFFIXES = (*_JSON_SUFFIXES, ".parquet", ".csv", ".tsv", ".arrow", ".txt")
_TABLE_SUFFIXES = (".csv", ".tsv")
_SAVED_DATASET_FILES = ("state.json", "dataset_info.json", "dataset_dict.json")


def _pick_split(dataset: Dataset | DatasetDict, split: str, label: str) -> Dataset:
    if isinstance(dataset, DatasetDict):
        if split not in dataset:
            raise DataFormatError(
                f"{label}: has no split {split!r}; expected a saved dataset with that split "
                f"(available splits: {', '.join(dataset)})"
            )
        return dataset[split]
    return dataset


def _read_file(path: str, row_problem: RowCheck | None) -> tuple[Dataset, DatasetOrigin]:
    lower = path.lower()
    if lower.endswith(_TABLE_SUFFIXES):
        raise DataFormatError(f"{path}: CSV and TSV files are not read; expected {EXPECTED_SOURCE}")
    head = _head(path)
    if lower.endswith(".parquet") or head.startswith(b"PAR1"):
        try:
            return Dataset.from_parquet(path), DatasetOrigin(path)
        except Exception as error:
            logger.debug("datasets could not read %s", path, exc_info=error)
            raise DataFormatError(
                f"{path}: could not be read as Parquet (the file is damaged or not Parquet); expected a Parquet "
                "file, or JSON lines named .jsonl"
            ) from None
    problem = _not_json_text(head)
    if problem:
        raise DataFormatError(f"{path}: {problem}")
    if not _has_content(path):
        raise DataFormatError(f"{path}: the file is empty; expected one JSON object per line, such as {EXPECTED_ROW}")
    is_array = head.removeprefix(codecs.BOM_UTF8).lstrip(_JSON_SPACE).startswith(b"[")
    dataset = _read_json(path, is_array, row_problem)
    # A JSON array file holds rows that are not lines: name its rows by index, not by a wrong line number.
    if is_array:
        return dataset, DatasetOrigin(path)
    return dataset, DatasetOrigin(path, json_path=path, rows=len(dataset))


def _folder_contents(path: str) -> str:
    """What a folder that is not a saved dataset holds, to suggest what to pass instead."""
    try:
        names = sorted(os.listdir(path))
    except OSError:
        names = None
    named_like_a_file = "it is a folder named like a file, and " if path.lower().endswith(_DATA_SUFFIXES) else ""
    if names is None:
        return f"{named_like_a_file}its contents cannot be listed"
    if not names:
        return f"{named_like_a_file}it is empty"
    data_files = [name for name in names if name.lower().endswith(_DATA_SUFFIXES)]
    if data_files:
        shown = ", ".join(data_files[:3]) + (", ..." if len(data_files) > 3 else "")
        return f"{named_like_a_file}it holds {len(data_files)} data file(s) ({shown}): pass one of them instead"
    return f"{named_like_a_file}it holds no data file: pass a JSONL file instead"


def _read_folder(path: str, shown: str, label: str, split: str) -> tuple[Dataset, DatasetOrigin]:
    try:
        loaded = load_from_disk(path)
    except PermissionError:
        raise PermissionError(f"{label} {shown!r}: permission denied; expected a folder you can read") from None
    except FileNotFoundError:
        if any(os.path.exists(os.path.join(path, name)) for name in _SAVED_DATASET_FILES):
            raise _damaged_saved_dataset(shown, label) from None
        raise DataFormatError(
            f"{label} {shown!r}: the folder is not a saved dataset (expected one written by Dataset.save_to_disk); "
            f"{_folder_contents(path)}"
        ) from None
    except Exception as error:
        logger.debug("datasets could not load %s", path, exc_info=error)
        raise _damaged_saved_dataset(shown, label) from None
    return _pick_split(loaded, split, shown), DatasetOrigin(shown)


def _damaged_saved_dataset(shown: str, label: str) -> DataFormatError:
    return DataFormatError(
        f"{label} {shown!r}: the folder looks like a saved dataset but could not be read (a file is missing or "
        "damaged); expected a complete folder written by Dataset.save_to_disk with a compatible version of datasets"
    )


def _hub_failure(error: Exception) -> str:
    """A one-line reason a hub name did not load, without datasets' own exception names or messages."""
    if isinstance(error, ConnectionError) or "offline" in str(error).lower():
        return "the Hugging Face Hub could not be reached to look for it there"
    if isinstance(error, FileNotFoundError):
        return "the Hugging Face Hub has no dataset of that name (or it is private)"
    return "loading it from the Hugging Face Hub failed"


def _not_found(path: str, shown: str, label: str) -> OSError:
    """Why a path that names no file or folder is missing: a dangling link, stray whitespace, or just absent."""
    if os.path.islink(path):
        return FileNotFoundError(
            f"{label} {shown!r}: is a symbolic link to {os.readlink(path)!r}, which does not exist; "
            f"expected {EXPECTED_SOURCE}"
        )
    hint = ""
    if path != path.strip() and os.path.exists(path.strip()):
        hint = f" (but {path.strip()!r}, without the surrounding spaces, exists)"
    expanded = f" ({path})" if path != shown else ""
    return FileNotFoundError(
        f"{label} {shown!r}{expanded} not found{hint}: expected a JSONL file, a folder written by "
        "Dataset.save_to_disk, or a hub dataset name"
    )


def read_dataset(
    source: Any, label: str, split: str = "train", *, row_problem: RowCheck | None = None
) -> tuple[Dataset, DatasetOrigin]:
    """Read any dataset source (Dataset, JSONL/JSON/Parquet file, saved folder, hub name) unvalidated, with its origin.

    A path may start with `~` (the home folder, as a shell would expand it). `row_problem` only sharpens the
    message when a JSON file cannot be read: the first line it objects to is named.
    """
    if isinstance(source, (Dataset, DatasetDict)):
        return _pick_split(source, split, label), DatasetOrigin(label)
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(
            f"{label}: expected a datasets.Dataset or a path: {EXPECTED_SOURCE}; got {type(source).__name__}"
        )
    shown = os.fspath(source)
    if isinstance(shown, bytes):
        raise TypeError(f"{label}: expected a path as text, got bytes {shown!r}")
    if not shown.strip():
        raise FileNotFoundError(f"{label}: the path is empty; expected {EXPECTED_SOURCE}")
    path = os.path.expanduser(shown)
    if os.path.isdir(path):
        return _read_folder(path, shown, label, split)
    if os.path.isfile(path):
        if not os.access(path, os.R_OK):
            raise PermissionError(f"{label} {shown!r}: permission denied; expected a file you can read")
        return _read_file(path, row_problem)
    if os.path.exists(path):
        raise DataFormatError(
            f"{label} {shown!r}: is not a regular file (a device, pipe or socket); expected {EXPECTED_SOURCE}"
        )
    looks_like_a_path = path != shown or path.lower().endswith(_DATA_SUFFIXES) or path.startswith((".", "/"))
    if looks_like_a_path or not _HUB_NAME.match(path):
        raise _not_found(path, shown, label)
    try:
        return load_dataset(path, split=split), DatasetOrigin(f"hub dataset {path!r}")
    except Exception as error:
        logger.debug("could not load %r from the hub", path, exc_info=error)
        raise FileNotFoundError(
            f"{label} {path!r}: no such file or folder, and {_hub_failure(error)}; expected {EXPECTED_SOURCE}"
        ) from None
