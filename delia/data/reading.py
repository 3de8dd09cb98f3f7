"""Reading any dataset source (Dataset, JSONL/JSON/Parquet file, saved folder, hub name), naming file and line in errors.

Nothing here judges a row's shape (that is `rules.py` and `forms.py`); this module makes sure that whatever the user
points at either loads, or fails with one line that names the file, the line and what was expected, never with a
pyarrow, datasets or json message. A JSON file is read by datasets (fast); what pyarrow cannot be trusted with, and
the explanation of a file datasets refused, are `json_check`'s; opening (compressed) files is `files`'.
"""

from __future__ import annotations

import codecs
import json
import logging
import os
import re
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from datasets import Dataset, DatasetDict, load_dataset, load_from_disk

from ..io import looks_like_local_path
from . import json_check
from .errors import EXPECTED_ROW, EXPECTED_SOURCE, DataFormatError
from .files import JSON_SPACE, data_size, file_lines, has_content, head_bytes, is_blank, not_json_text
from .json_check import RowCheck

__all__ = ["EXPECTED_ROW", "EXPECTED_SOURCE", "DataFormatError", "DatasetOrigin", "line_of_row", "read_dataset"]

logger = logging.getLogger(__name__)


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
# Naming a row by its line
# ----------------------------------------------------------------------------------------------------------------------


def line_of_row(path: str, row: int, rows: int | None = None) -> int:
    """The 1-based line where the `row`-th JSON value of a JSON lines file starts (blank lines hold no row).

    Counting non-blank lines is right when each holds one value; when the file has `rows` values but not as many
    non-blank lines (two objects on a line, or an object spread over lines), the values are parsed to find it.
    """
    line_number, found, non_blank = 0, None, 0
    for line_number, line in enumerate(file_lines(path), start=1):
        if not is_blank(line):
            if non_blank == row:
                found = line_number
                if rows is None:
                    return found
            non_blank += 1
    if rows is not None and non_blank != rows:
        for index, (start, _value, _text) in enumerate(json_check.json_values(path, json.JSONDecoder())):
            if index == row:
                return start
    return found if found is not None else line_number + 1  # past the end: only if the file changed under us


# ----------------------------------------------------------------------------------------------------------------------
# Reading a JSON file
# ----------------------------------------------------------------------------------------------------------------------


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


def _from_json(path: str, **options: Any) -> Dataset:
    with _quiet_json_builder():
        return Dataset.from_json(path, **options)


def _read_json(path: str, is_array: bool, row_problem: RowCheck | None) -> Dataset:
    """Read a JSON lines or JSON array file with datasets; explain a refusal by the first line at fault."""
    if not is_array and json_check.may_crash_pyarrow(path):
        problem = json_check.first_bad_line(path, row_problem)  # every line parsed with `json` before pyarrow sees one
        if problem is not None:
            raise problem
    try:
        dataset = _from_json(path)
    except Exception as error:  # pyarrow / datasets errors: explain them by line instead
        logger.debug("datasets could not read %s", path, exc_info=error)
        dataset = _read_json_again(path, is_array, row_problem)
    if json_check.has_invalid_utf8(dataset):
        raise json_check.explain(path, is_array, row_problem, type_conflicts=False) or DataFormatError(
            f"{path}: holds text that is not valid UTF-8; expected UTF-8 text"
        )
    return dataset


def _read_json_again(path: str, is_array: bool, row_problem: RowCheck | None) -> Dataset:
    """After datasets refused the file: the line at fault, or a second read for a field first seen after 10 MB."""
    problem = json_check.explain(path, is_array, row_problem, type_conflicts=False)
    if problem is not None:
        raise problem
    # Every line is sound JSON: datasets fixes the columns from the first 10 MB it reads, so a field that first
    # appears later fails; reading the file in one piece (slower, more memory) sees every field.
    if not is_array:  # an array is always read in one piece
        try:
            return _from_json(path, chunksize=data_size(path) + 1)
        except Exception as error:
            logger.debug("datasets could not read %s in one piece", path, exc_info=error)
    raise json_check.explain(path, is_array, row_problem, type_conflicts=True) or DataFormatError(
        f"{path}: could not be read as JSON lines, although each line is valid JSON; expected one JSON object per "
        f"line with the same fields and types on every line, such as {EXPECTED_ROW}"
    )


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
    head = head_bytes(path)
    if lower.endswith(".parquet") or head.startswith(b"PAR1"):
        try:
            return Dataset.from_parquet(path), DatasetOrigin(path)
        except Exception as error:
            logger.debug("datasets could not read %s", path, exc_info=error)
            raise DataFormatError(
                f"{path}: could not be read as Parquet (the file is damaged or not Parquet); expected a Parquet "
                "file, or JSON lines named .jsonl"
            ) from None
    problem = not_json_text(head)
    if problem:
        raise DataFormatError(f"{path}: {problem}")
    if not has_content(path):
        raise DataFormatError(f"{path}: the file is empty; expected one JSON object per line, such as {EXPECTED_ROW}")
    is_array = head.removeprefix(codecs.BOM_UTF8).lstrip(JSON_SPACE).startswith(b"[")
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
        f"{label} {shown!r}{expanded} not found (no such file or folder){hint}: expected a JSONL file, a folder "
        "written by Dataset.save_to_disk, or a hub dataset name"
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
    looks_like_a_path = path != shown or path.lower().endswith(_DATA_SUFFIXES) or looks_like_local_path(path)
    if looks_like_a_path or not _HUB_NAME.match(path):
        raise _not_found(path, shown, label)
    try:
        return load_dataset(path, split=split), DatasetOrigin(f"hub dataset {path!r}")
    except Exception as error:
        logger.debug("could not load %r from the hub", path, exc_info=error)
        raise FileNotFoundError(
            f"{label} {path!r}: no such file or folder, and {_hub_failure(error)}; expected {EXPECTED_SOURCE}"
        ) from None
