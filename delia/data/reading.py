"""Reading any dataset source (Dataset, JSONL/JSON file, saved folder, hub name) with errors that name file and line.

Nothing here judges a row's shape (that is `rules.py` and `forms.py`); this module makes sure that whatever the user
points at either loads, or fails with one line that names the file, the line and what was expected, never with a
pyarrow or json traceback.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from datasets import Dataset, DatasetDict, load_dataset, load_from_disk

EXPECTED_ROW = '{"messages": [{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}]}'


class DataFormatError(ValueError):
    """A dataset or one of its rows does not have the expected shape; the message names the file, line and field."""


@dataclass(frozen=True)
class DatasetOrigin:
    """Names a dataset in messages, and turns a row index into `file, line N` (JSON lines) or `name, row N`."""

    label: str
    json_path: str | None = None

    def where(self, row: int) -> str:
        if self.json_path is None:
            return f"{self.label}, row {row}"
        return f"{self.json_path}, line {line_of_row(self.json_path, row)}"


def line_of_row(path: str, row: int) -> int:
    """The 1-based line of the `row`-th JSON object in a JSONL file (blank lines hold no row)."""
    seen = -1
    with open(path, "rb") as handle:
        for line_number, line in enumerate(handle, start=1):
            if line.strip():
                seen += 1
                if seen == row:
                    return line_number
    return line_number + 1  # past the end: only reachable if the file changed under us


_HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


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


RowCheck = Callable[[dict], "str | None"]
"""Says why one parsed row is not what the caller expects (None if it is fine); used to explain a failed read."""


def _json_type(value: Any) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}.get(
        type(value), "number"
    )


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


def _explain_unreadable_json(path: str, error: Exception, row_problem: RowCheck | None) -> DataFormatError:
    """Find the line that pyarrow could not read, parsing the file line by line with `json`."""
    seen: dict[str, str] = {}
    with open(path, "rb") as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError) as decode_error:
                reason = getattr(decode_error, "msg", str(decode_error))
                column = getattr(decode_error, "colno", None)
                at = f" at column {column}" if column else ""
                return DataFormatError(
                    f"{path}, line {line_number}: malformed JSON ({reason}{at}); expected one JSON object per line, "
                    f"such as {EXPECTED_ROW}"
                )
            if not isinstance(row, dict):
                return DataFormatError(
                    f"{path}, line {line_number}: expected a JSON object such as {EXPECTED_ROW}, got {_json_type(row)}"
                )
            problem = (row_problem(row) if row_problem else None) or _type_conflict(row, "", seen)
            if problem is not None:
                return DataFormatError(f"{path}, line {line_number}: {problem}")
    summary = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return DataFormatError(f"{path}: could not be read as JSON lines ({summary})")


def _read_json(path: str, row_problem: RowCheck | None) -> Dataset:
    if os.path.getsize(path) == 0 or not _has_content(path):
        raise DataFormatError(f"{path}: the file is empty; expected one JSON object per line, such as {EXPECTED_ROW}")
    try:
        with _quiet_json_builder():
            return Dataset.from_json(path)
    except Exception as error:  # pyarrow / datasets errors: explain them by line instead
        raise _explain_unreadable_json(path, error, row_problem) from None


def _has_content(path: str) -> bool:
    with open(path, "rb") as handle:
        return any(line.strip() for line in handle)


def _is_json_array(path: str) -> bool:
    """Whether the file is one JSON array (its first non-blank character, after any BOM, is `[`), not JSON lines."""
    with open(path, "rb") as handle:
        for line in handle:
            text = line.lstrip(b"\xef\xbb\xbf").strip()
            if text:
                return text.startswith(b"[")
    return False


def _pick_split(dataset: Dataset | DatasetDict, split: str, label: str) -> Dataset:
    if isinstance(dataset, DatasetDict):
        if split not in dataset:
            raise ValueError(f"{label}: has no split {split!r}; available splits: {', '.join(dataset)}")
        return dataset[split]
    return dataset


def read_dataset(
    source: Any, label: str, split: str = "train", *, row_problem: RowCheck | None = None
) -> tuple[Dataset, DatasetOrigin]:
    """Read any dataset source (Dataset, JSONL/JSON file, saved folder, hub name) unvalidated, with its origin.

    `row_problem` only sharpens the message when a JSON file cannot be read: the first line it objects to is named.
    """
    if isinstance(source, (Dataset, DatasetDict)):
        return _pick_split(source, split, label), DatasetOrigin(label)
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(
            f"{label}: expected a datasets.Dataset, a JSONL path, a saved dataset folder or a hub dataset name; "
            f"got {type(source).__name__}"
        )
    path = os.fspath(source)
    if os.path.isfile(path):
        dataset = _read_json(path, row_problem)
        # A JSON array file holds rows that are not lines: name its rows by index, not by a wrong line number.
        return dataset, DatasetOrigin(path, json_path=None if _is_json_array(path) else path)
    if os.path.isdir(path):
        try:
            loaded = load_from_disk(path)
        except FileNotFoundError:
            raise DataFormatError(
                f"{label} {path!r}: the folder is not a saved dataset (expected one written by "
                "Dataset.save_to_disk); pass a JSONL file instead"
            ) from None
        return _pick_split(loaded, split, path), DatasetOrigin(path)
    if path.endswith((".json", ".jsonl")) or path.startswith((".", "/", "~")) or not _HUB_NAME.match(path):
        raise FileNotFoundError(
            f"{label} {path!r} not found: expected a JSONL file, a folder written by Dataset.save_to_disk, "
            "or a hub dataset name"
        )
    try:
        return load_dataset(path, split=split), DatasetOrigin(f"hub dataset {path!r}")
    except Exception as error:
        raise FileNotFoundError(
            f"{label} {path!r}: no such file or folder, and loading it as a hub dataset failed "
            f"({type(error).__name__}: {str(error).strip().splitlines()[0] if str(error).strip() else ''})"
        ) from None
