"""The vocabulary of data errors: the exception every reader raises, and the shapes its messages ask for."""

from __future__ import annotations

EXPECTED_ROW = '{"messages": [{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}]}'
EXPECTED_SOURCE = (
    "a JSON lines file (.jsonl, plain or gzip/bz2/xz-compressed), a JSON array file (.json), a Parquet file, "
    "a folder written by Dataset.save_to_disk, or a hub dataset name"
)


class DataFormatError(ValueError):
    """A dataset or one of its rows does not have the expected shape; the message names the file, line and field."""
