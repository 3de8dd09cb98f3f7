"""Explaining a JSON file that datasets refused, and keeping the files that would crash pyarrow away from it.

datasets (through pyarrow) reads JSON lines fast but explains nothing, accepts some broken input (bytes that are not
UTF-8) and crashes the process on some (very deep nesting, a `null` row). So `may_crash_pyarrow` is a cheap scan run
before pyarrow sees a file; `explain` re-reads a refused file with `json` to name the first line at fault (not UTF-8,
not JSON, a field given twice, not an object, nested too deeply, a lone surrogate, a field whose type changes, or a
row the caller's `RowCheck` objects to); `has_invalid_utf8` checks what pyarrow accepted.
"""

from __future__ import annotations

import codecs
import json
import re
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pyarrow as pa
from datasets import Dataset

from .errors import EXPECTED_ROW, DataFormatError
from .files import JSON_SPACE, file_lines, is_blank, open_data

MAX_NESTING = 63
"""The most levels of arrays and objects a row may nest, counting the row itself: deeper rows cannot be stored."""

CRASH_GUARD_BRACKETS = 4096
"""Opening brackets on one line above which the file is parsed with `json` before pyarrow sees it."""

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


def json_values(path: str, decoder: json.JSONDecoder) -> Iterator[tuple[int, Any, str]]:
    """Each top-level JSON value of a JSON lines file with the line it starts on and its text, as pyarrow reads them.

    Like pyarrow, it accepts several values on a line and a value spread over several lines (pretty-printed). A
    line that is not UTF-8 or not JSON raises `_LineProblem`.
    """
    pending, origin = "", (1, 1)  # the start of a value not closed at the end of its line, and where it starts
    parse_at = 0  # a long unclosed value is parsed again once it doubled in length, not on every line
    for line_number, raw in enumerate(file_lines(path), start=1):
        problem = _utf8_problem(raw, first_line=line_number == 1)
        if problem:
            raise _LineProblem(line_number, problem)
        text = raw.decode("utf-8")
        if line_number == 1:
            text = text.removeprefix("\ufeff")
        if not pending:
            if is_blank(raw):
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


def first_bad_line(path: str, row_problem: RowCheck | None, type_conflicts: bool = False) -> DataFormatError | None:
    """The first line of a JSON lines file that is not UTF-8, not JSON, not an object, too deep or refused by
    `row_problem` (and, if asked, whose field types differ from earlier lines'); None if every line is fine."""
    seen: dict[str, str] = {}
    try:
        decoder = json.JSONDecoder(object_pairs_hook=_refuse_duplicate_keys)
        for line_number, row, text in json_values(path, decoder):
            problem = _value_problem(row, text) or (row_problem(row) if row_problem else None)
            if problem is None and type_conflicts:
                problem = _type_conflict(row, "", seen)
            if problem is not None:
                return DataFormatError(f"{path}, line {line_number}: {problem}")
    except _LineProblem as problem:
        return DataFormatError(f"{path}, line {problem.line}: {problem}")
    return None


def first_bad_element(path: str, row_problem: RowCheck | None) -> DataFormatError | None:
    """The first problem in a JSON array file: its syntax (by line and column), or the first element at fault."""
    with open_data(path) as handle:
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
            return first_bad_line(path, row_problem)
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


def explain(path: str, is_array: bool, row_problem: RowCheck | None, type_conflicts: bool) -> DataFormatError | None:
    """The first problem in a JSON array or JSON lines file, or None if `json` finds none."""
    if is_array:
        return first_bad_element(path, row_problem)
    return first_bad_line(path, row_problem, type_conflicts)


# ----------------------------------------------------------------------------------------------------------------------
# Guarding pyarrow, and checking what it read
# ----------------------------------------------------------------------------------------------------------------------


def may_crash_pyarrow(path: str) -> bool:
    """Whether pyarrow's JSON parser might crash the process (a crash, not an exception) on this file.

    It crashes on nesting near 10,000 levels, and on a read that starts with `null` (datasets reads in 10 MB
    pieces, each starting at a line). So: a line with more than `CRASH_GUARD_BRACKETS` opening brackets (a line
    nests no deeper than that), or a line whose first non-blank byte is `n`. Counted per line with numpy in 64 KB
    chunks: a few hundredths of a second per 100 MB.
    """
    carried = 0  # opening brackets of the line that runs on from the previous chunk
    with open_data(path) as handle:
        chunk = handle.read(1 << 16)
        if chunk.removeprefix(codecs.BOM_UTF8).lstrip(JSON_SPACE).startswith(b"n"):
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


def has_invalid_utf8(dataset: Dataset) -> bool:
    """Whether a string in `dataset` is not UTF-8: pyarrow reads such bytes without complaint (checked in C, fast)."""
    try:
        dataset.data.validate(full=True)
    except pa.ArrowException:
        return True
    return False
