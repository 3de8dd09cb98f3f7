"""General queries for self-sampling: read from conversations or named fields, each with a stable id.

`load_queries` is what `build_cache` answers and what `delia eval` holds out; `repeat_queries` gives a query several
samples, each with its own id (and so its own seed and resume entry).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, replace
from typing import Any

from . import forms
from .reading import DataFormatError, DatasetOrigin, read_dataset
from .rules import RULES_FORMAT, validate_conversations


@dataclass(frozen=True)
class Query:
    """One query to answer: its id (see query_id), text, reference answer, and where it was read."""

    id: str
    query: str
    reference: str | None
    row: int
    origin: DatasetOrigin  # names the file, for error messages

    @property
    def where(self) -> str:
        """File and line (or dataset and row), looked up only when an error needs it."""
        return self.origin.where(self.row)


def query_id(query: str) -> str:
    """A stable id for a query: the first 16 hex digits of its SHA-256."""
    return hashlib.sha256(query.encode("utf-8")).hexdigest()[:16]


def repeat_queries(queries: list[Query], samples_per_query: int) -> list[Query]:
    """Each query `samples_per_query` times, sample k > 0 with id `<id>-<k>`: its own row, seed and resume entry.

    Sample 0 keeps the query's plain id, so a cache of one reply per query is the first part of a larger one. With
    a few hundred queries, several samples each give the several thousand diverse rows DELIA mixes in.
    """
    if isinstance(samples_per_query, bool) or not isinstance(samples_per_query, int) or samples_per_query < 1:
        raise ValueError(f"samples_per_query must be a positive integer, got {samples_per_query!r}")
    if samples_per_query == 1:
        return queries
    return [
        query if sample == 0 else replace(query, id=f"{query.id}-{sample}")
        for query in queries
        for sample in range(samples_per_query)
    ]


def _text(value: Any, origin: DatasetOrigin, row: int, field: str, required: bool) -> str | None:
    """`value` if it is a non-empty string; None if it is empty and optional; else an error naming file and line."""
    if value is None or (isinstance(value, str) and not value.strip()):
        if required:
            raise DataFormatError(
                f"{origin.where(row)}: field {field!r} is missing or empty; expected a non-empty string"
            )
        return None
    if not isinstance(value, str):
        raise DataFormatError(f"{origin.where(row)}: field {field!r}: expected a string, got {type(value).__name__}")
    return value


def _conversation_form(dataset: Any) -> str | None:
    try:
        return forms.detect_form(dataset)
    except DataFormatError:
        return None


def _first_exchange(row: dict[str, Any]) -> tuple[str, str]:
    """A validated conversation's first user turn and the assistant reply to it (rows of any form, Json included)."""
    turns = [message for message in forms.conversation_of(row) if message["role"] != "system"]
    return turns[0]["content"], turns[1]["content"]


def load_queries(
    source: Any,
    *,
    query_field: str | None = None,
    reference_field: str | None = None,
    input_field: str | None = None,
    split: str = "train",
    need_reference: bool = True,
) -> list[Query]:
    """Queries (and reference answers) from conversations or from named fields; duplicates keep their first row.

    Without `query_field`: conversations (`messages`, or prompt/completion as strings or message lists; plain or
    Json columns) give the first user turn and the assistant reply after it; an Alpaca-style `instruction` column
    gives instruction (+ `input`) and `output`.
    """
    dataset, origin = read_dataset(source, "query file", split)
    columns = dataset.column_names
    if query_field is None and _conversation_form(dataset) in RULES_FORMAT:
        validate_conversations(dataset, origin)  # so each row is system?, user, assistant, ...
        pairs = [_first_exchange(row) for row in dataset.with_format(None)]
    else:
        if query_field is None and "instruction" in columns:
            query_field = "instruction"
            input_field = input_field or ("input" if "input" in columns else None)
            reference_field = reference_field or ("output" if "output" in columns else None)
        if query_field is None or query_field not in columns:
            raise DataFormatError(
                f"{origin.where(0)}: no query field {query_field or 'messages'!r} (fields: {', '.join(columns)}); "
                "pass query_field= / reference_field= (CLI: --query-field / --reference-field)"
            )
        for name in (reference_field, input_field):
            if name is not None and name not in columns:
                raise DataFormatError(f"{origin.label}: no field {name!r} (fields: {', '.join(columns)})")
        queries = dataset[query_field]
        references = dataset[reference_field] if reference_field else [None] * len(queries)
        inputs = dataset[input_field] if input_field else [None] * len(queries)
        pairs = []
        for row, (query, reference, extra) in enumerate(zip(queries, references, inputs, strict=True)):
            query = _text(query, origin, row, query_field, required=True)
            extra = _text(extra, origin, row, input_field, required=False) if input_field else None
            reference = _text(reference, origin, row, reference_field, need_reference) if reference_field else None
            pairs.append((f"{query}\n\n{extra}" if extra else query, reference))
    if need_reference and query_field is not None and reference_field is None:
        raise DataFormatError(
            f"{origin.label}: the 'reference' template needs reference answers; pass reference_field= "
            "(CLI: --reference-field) or use template='plain'"
        )
    seen: dict[str, Query] = {}
    for row, (query, reference) in enumerate(pairs):
        identifier = query_id(query)
        seen.setdefault(identifier, Query(identifier, query, reference, row, origin))
    return list(seen.values())
