"""Fingerprints of a training mixture and of the files it came from, to compare processes and resumed runs.

- `hash_rows`: sha256 of rows in order, content and `source` tags included, computed over Arrow data (the IPC
  serialisation of fixed 10,000-row slices, each copied into fresh buffers first), with no Python row objects:
  1.1 s for a 1,000,100-row mixture (599 MiB of Arrow data) on our shared 2-core machine
  (`python benchmarks/fingerprint.py`; the mixing itself took 28-43 s).
- `file_identity`: size and sha256 of a local file (or of every file in a saved-dataset folder), read in 1 MiB chunks:
  1.0 s for a 635 MiB cache. The whole file is hashed, not a sample of blocks: a size + mtime + first/last blocks check
  misses an edit in the middle of a file of the same size, and a full hash costs a few percent of the mixing.
- `mixture_fingerprint`: both, plus one `combined` hash over the rows' hash and the files' sizes and hashes (paths
  are left out, so the same file at another mount point matches).

What the rows' hash detects: any change of a row's content, of the row order, of a `source` tag, of a column's Arrow
type or of the row count. The same rows hash the same however Arrow holds them (one chunk or many, a slice of a larger
table, behind an indices mapping); schema metadata is left out. A mixture is hashed as delia builds it: the mixed rows
before their interleave, then the interleave order. A future pyarrow whose IPC format wrote the same rows differently
would give another hash: a false alarm (a refused resume, which `allow_mixture_change` overrides), never a missed
change.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

import numpy as np
import pyarrow as pa
from datasets import Dataset

from .mixing import PreparedData

HASH_BATCH_ROWS = 10_000
_CHUNK = 1 << 20


class _HashingSink:
    """A write-only file object that feeds every byte to a hash, so the IPC stream is hashed without being kept."""

    closed = False

    def __init__(self, digest: Any):
        self.digest = digest

    def write(self, data: bytes) -> int:
        self.digest.update(data)
        return len(data)

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


def _compact(table: pa.Table) -> pa.Table:
    """`table` with each column in one freshly written chunk: a slice's buffers reach past its rows (and IPC writes
    some of that), so the same rows sliced from a larger table would otherwise hash differently."""
    columns = [pa.concat_arrays(column.chunks or [pa.array([], column.type)]) for column in table.columns]
    return pa.table(columns, schema=table.schema)


def hash_rows(dataset: Dataset, order: np.ndarray | None = None) -> str:
    """sha256 of `dataset`'s rows (Arrow IPC of fixed-size slices), then of `order`: the rows `dataset.select(order)`
    holds, in that order. Without `order`, the rows in the dataset's own order."""
    digest = hashlib.sha256()
    arrow = dataset.with_format("arrow")
    schema = arrow[:0].schema.remove_metadata()
    with pa.ipc.new_stream(_HashingSink(digest), schema) as writer:
        for start in range(0, len(dataset), HASH_BATCH_ROWS):
            batch = arrow[start : start + HASH_BATCH_ROWS]
            writer.write_table(_compact(batch.replace_schema_metadata(None)))
    digest.update(b"order:" + (b"none" if order is None else np.asarray(order, dtype="<i8").tobytes()))
    return digest.hexdigest()


def _hash_file(path: str, digest: Any) -> int:
    size = 0
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return size


def file_identity(source: Any) -> dict[str, Any] | None:
    """`{"path", "bytes", "sha256"}` of a local file or saved-dataset folder; None for anything else (a Dataset in
    memory, a hub name), whose rows the mixture hash covers on their own."""
    if not isinstance(source, (str, os.PathLike)) or not os.path.exists(source):
        return None
    path = os.fspath(source)
    digest = hashlib.sha256()
    if os.path.isfile(path):
        size = _hash_file(path, digest)
    else:  # a folder: every file, by relative path in sorted order, name and content
        size = 0
        for folder, subfolders, files in sorted(os.walk(path)):
            subfolders.sort()
            for name in sorted(files):
                relative = os.path.relpath(os.path.join(folder, name), path)
                digest.update(relative.encode() + b"\0")
                size += _hash_file(os.path.join(folder, name), digest)
    return {"path": os.path.abspath(path), "bytes": size, "sha256": digest.hexdigest()}


def mixture_fingerprint(prepared: PreparedData, downstream: Any, diverse: Any) -> dict[str, Any]:
    """The fingerprint `DSFTTrainer` records and compares: the training rows' hash (None when streaming), the
    identities of the `downstream` and `diverse` sources as given, and a `combined` hash of them all."""
    rows_sha256, rows = None, None
    if prepared.unshuffled is not None:  # hash the mixed rows where they lie, then the interleave order
        rows_sha256, rows = hash_rows(prepared.unshuffled, prepared.order), len(prepared.train_dataset)
    elif isinstance(prepared.train_dataset, Dataset):
        rows_sha256, rows = hash_rows(prepared.train_dataset), len(prepared.train_dataset)
    files = {"downstream_file": file_identity(downstream), "diverse_file": file_identity(diverse)}
    compared = {"rows_sha256": rows_sha256, "rows": rows}
    for name, identity in files.items():
        compared[name] = None if identity is None else [identity["bytes"], identity["sha256"]]
    combined = hashlib.sha256(json.dumps(compared, sort_keys=True).encode()).hexdigest()
    return {"combined": combined, "rows": rows, "rows_sha256": rows_sha256, **files}


def _describe_file(identity: dict[str, Any] | None) -> str:
    if identity is None:
        return "not a local file"
    return f"{identity['path']}, {identity['bytes']} bytes, sha256 {identity['sha256'][:16]}"


def fingerprint_differences(
    first: dict[str, Any], second: dict[str, Any], labels: tuple[str, str] = ("then", "now")
) -> list[str]:
    """What differs between two fingerprints, one phrase per part (empty when they match); `labels` name the two."""
    differences = []
    for key, name in (("downstream_file", "the downstream file"), ("diverse_file", "the diverse cache")):
        old, new = first.get(key), second.get(key)
        if (old and [old["bytes"], old["sha256"]]) != (new and [new["bytes"], new["sha256"]]):
            differences.append(f"{name} differs ({_describe_file(old)} {labels[0]}; {_describe_file(new)} {labels[1]})")
    if first.get("rows_sha256") != second.get("rows_sha256") or first.get("rows") != second.get("rows"):
        differences.append(
            f"the mixed rows differ ({first.get('rows')} rows, sha256 {str(first.get('rows_sha256'))[:16]} "
            f"{labels[0]}; {second.get('rows')} rows, sha256 {str(second.get('rows_sha256'))[:16]} {labels[1]})"
        )
    return differences
