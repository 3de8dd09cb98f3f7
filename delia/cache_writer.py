"""The durable JSONL writer behind build_cache: append and flush per batch, resume by id, repair a killed tail, merge.

Invariants: a row is one JSON object on one line; a batch is written, flushed and fsynced before the next starts;
nothing already written is lost. A process killed mid-write can leave a partial last line: on restart it is moved to
`<file>.partial` (kept, not deleted) and the file ends at its last complete row again, or, if the tail is in fact a
complete row that only lacks its newline, the newline is added.
"""

from __future__ import annotations

import glob
import json
import os
import re
from collections.abc import Iterable, Iterator
from typing import Any

from .io import iter_jsonl, repair_tail, replace_atomically


def read_rows(path: str) -> Iterator[dict[str, Any]]:
    """The rows of a cache file; a line that is not a JSON object is an error naming the file and line."""
    return (row for _, row in iter_jsonl(path))


def done_ids(paths: Iterable[str]) -> set[str]:
    """Ids of every row already written to any of `paths` (missing files count as empty)."""
    ids: set[str] = set()
    for path in paths:
        if os.path.exists(path):
            ids.update(str(row["id"]) for row in read_rows(path) if "id" in row)
    return ids


class CacheWriter:
    """Appends rows to one JSONL file; each `write` is flushed and fsynced before it returns.

    The file is opened at the first row: a run that fails before writing any (every request refused) leaves no empty
    file behind. Leaving the `with` block without an error creates it all the same, so a finished run has its output.
    """

    def __init__(self, path: str):
        self.path = path
        directory = os.path.dirname(os.path.abspath(path))
        os.makedirs(directory, exist_ok=True)
        repair_tail(path)  # appends start on a fresh line, whatever an earlier kill left
        self._handle = None

    def write(self, rows: Iterable[dict[str, Any]]) -> int:
        """Append `rows`, one JSON object a line, and return once they are on disk; return how many were written."""
        lines = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
        if not lines:
            return 0
        if self._handle is None:
            self._handle = open(self.path, "a", encoding="utf-8")
        self._handle.write(lines)
        self._handle.flush()
        os.fsync(self._handle.fileno())
        return lines.count("\n")

    def close(self) -> None:
        """Close the file (every row is already on disk)."""
        if self._handle is not None:
            self._handle.close()

    def __enter__(self) -> CacheWriter:
        return self

    def __exit__(self, exc_type, *exc_info) -> None:
        if exc_type is None and self._handle is None:  # finished with no row to write: the output exists, empty
            self._handle = open(self.path, "a", encoding="utf-8")
        self.close()


def shard_path(output: str, rank: int, world_size: int) -> str:
    """The file process `rank` of `world_size` appends to, merged into `output` at the end."""
    return f"{output}.shard-{rank:05d}-of-{world_size:05d}"


def shard_paths(output: str) -> list[str]:
    """Every shard file next to `output`, from this run or an earlier one with another number of processes."""
    candidates = glob.glob(glob.escape(output) + ".shard-*-of-*")  # also matches a shard's `.partial` file
    return sorted(path for path in candidates if re.fullmatch(r".*\.shard-\d+-of-\d+", path))


def merge_shards(output: str, order: dict[str, int]) -> int:
    """Fold every shard into `output` (rows ordered by `order[id]`, duplicates dropped), atomically; return the rows.

    The merged file is written next to `output` and moved over it in one step, then the shards are removed: a kill at
    any point leaves either the old files or the merged one, never a half-written output.
    """
    shards = shard_paths(output)
    if not shards:
        return 0
    rows: dict[str, dict[str, Any]] = {}
    rows_without_id: list[dict[str, Any]] = []  # not ours to deduplicate: kept, after the rest, in file order
    for path in [output, *shards]:
        if os.path.exists(path):
            repair_tail(path)
            for row in read_rows(path):
                if row.get("id") is None:
                    rows_without_id.append(row)
                else:
                    rows.setdefault(str(row["id"]), row)
    ordered = sorted(rows.values(), key=lambda row: order.get(str(row["id"]), len(order))) + rows_without_id
    replace_atomically(
        output, lambda out: out.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in ordered)
    )
    for path in shards:
        os.remove(path)
    return len(ordered)
