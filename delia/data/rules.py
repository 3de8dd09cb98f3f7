"""DELIA's conversation rules, checked in one place: a Python reference per row and an Arrow fast path per batch.

A DELIA conversation is `{"messages": [system?, user, assistant, (user, assistant)...]}` with non-empty string
contents (TRL's prompt/completion form is accepted too). Self-sampled caches and query files must follow it. The
fast path checks a million rows in well under a second; when it finds a bad row, the Python reference explains it,
and the two are tested to agree.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from datasets import Dataset

from . import forms
from .reading import EXPECTED_ROW, DataFormatError, DatasetOrigin, read_dataset

VALIDATION_BATCH_ROWS = 65_536
PYTHON_BATCH_ROWS = 1_000
"""Rows decoded at a time when the Python reference checks a dataset (a Json layout, or explaining a bad row)."""

RULES_FORMAT = {
    forms.MESSAGES: "messages",
    forms.CONVERSATIONAL_PROMPT_COMPLETION: "conversational",
    forms.PROMPT_COMPLETION: "standard",
}
"""The rules' name of each form they check (what `validate_conversations` returns and `row_problem` takes)."""


# ----------------------------------------------------------------------------------------------------------------------
# Checking one row in Python: the reference rules, used to explain a row the fast check rejected
# ----------------------------------------------------------------------------------------------------------------------


def type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def messages_problem(messages: Any, field_of: Callable[[int], str], whole: str) -> str | None:
    """Why `messages` is not [system?, user, assistant, (user, assistant)...], or None if it is fine."""
    if messages is None:
        return f"missing field {whole}: expected a list of messages, as in {EXPECTED_ROW}"
    if not isinstance(messages, list):
        return f"field {whole}: expected a list of {{role, content}} messages, got {type_name(messages)}"
    has_system = bool(messages) and isinstance(messages[0], dict) and messages[0].get("role") == "system"
    for index, message in enumerate(messages):
        if not isinstance(message, dict):
            return f"field {field_of(index)}: expected an object with 'role' and 'content', got {type_name(message)}"
        turn = index - has_system
        if index == 0 and has_system:
            expected = "system"
        else:
            expected = "user" if turn % 2 == 0 else "assistant"
        role = message.get("role")
        if role != expected:
            allowed = "'system' or 'user'" if index == 0 else repr(expected)
            return (
                f"field {field_of(index)}.role: expected {allowed}, got {role!r} (roles must alternate user/assistant)"
            )
        content = message.get("content")
        if not isinstance(content, str):
            return f"field {field_of(index)}.content: expected a non-empty string, got {type_name(content)}"
        if not content.strip():
            return f"field {field_of(index)}.content: expected a non-empty string, got an empty one"
    turns = len(messages) - has_system
    if turns < 2:
        return f"field {whole}: expected at least a user message and an assistant reply, got {turns} message(s)"
    if turns % 2:
        return f"field {whole}: expected the last message to be the assistant's reply, got role 'user'"
    return None


def row_problem(row: Any, data_format: str) -> str | None:
    """Why one row does not fit `data_format` ("messages", "conversational" or "standard"), or None."""
    if not isinstance(row, dict):
        return f"expected a JSON object such as {EXPECTED_ROW}, got {type_name(row)}"
    if data_format == "messages":
        if "messages" not in row:
            found = ", ".join(map(repr, row)) or "none"
            return f"missing field 'messages': expected {EXPECTED_ROW} (fields found: {found})"
        return messages_problem(row["messages"], lambda i: f"'messages'[{i}]", "'messages'")
    if data_format == "standard":
        for name in ("prompt", "completion"):
            value = row.get(name)
            if not isinstance(value, str) or not value.strip():
                return (
                    f"field '{name}': expected a non-empty string, got {type_name(value) if value else 'an empty one'}"
                )
        return None
    prompt, completion = row.get("prompt"), row.get("completion")
    for name, value in (("prompt", prompt), ("completion", completion)):
        if not isinstance(value, list):
            return f"field '{name}': expected a list of {{role, content}} messages, got {type_name(value)}"
    if len(completion) != 1:
        return f"field 'completion': expected exactly one assistant message, got {len(completion)}"

    def field_of(index: int) -> str:
        return f"'prompt'[{index}]" if index < len(prompt) else f"'completion'[{index - len(prompt)}]"

    return messages_problem(prompt + completion, field_of, "'prompt' + 'completion'")


# ----------------------------------------------------------------------------------------------------------------------
# Checking a whole dataset: vectorised over Arrow batches, so a million-row cache takes seconds and little memory
# ----------------------------------------------------------------------------------------------------------------------


def _detect_format(dataset: Dataset, origin: DatasetOrigin) -> str:
    """The rules' name of the dataset's form (`forms.detect_form` decides); a form they do not check is an error."""
    try:
        form = forms.detect_form(dataset)
    except DataFormatError:
        form = None
    if form not in RULES_FORMAT:
        found = ", ".join(map(repr, dataset.column_names)) or "none"
        raise DataFormatError(
            f"{origin.where(0)}: missing field 'messages': expected {EXPECTED_ROW} (fields found: {found})"
        )
    return RULES_FORMAT[form]


def bad_message_rows(messages: pa.ChunkedArray | pa.Array) -> np.ndarray | None:
    """Indices of rows in one Arrow batch that break the messages rules; None if the column's type needs Python."""
    if isinstance(messages, pa.ChunkedArray):
        messages = messages.combine_chunks()
    if not forms.is_message_list(messages.type, plain=True):
        return None

    rows = len(messages)
    lengths = pc.fill_null(pc.list_value_length(messages), 0).to_numpy(zero_copy_only=False).astype(np.int64)
    bad = np.asarray(messages.is_null().to_numpy(zero_copy_only=False), dtype=bool).copy()
    flat = pc.list_flatten(messages)
    if len(flat) == 0:
        return np.flatnonzero(bad | (lengths < 2))
    parent = pc.list_parent_indices(messages).to_numpy().astype(np.int64)
    starts = np.concatenate(([0], np.cumsum(lengths)[:-1]))
    position = np.arange(len(flat), dtype=np.int64) - starts[parent]

    def is_role(name: str) -> np.ndarray:
        return pc.fill_null(pc.equal(pc.struct_field(flat, "role"), name), False).to_numpy(zero_copy_only=False)

    is_system, is_user, is_assistant = is_role("system"), is_role("user"), is_role("assistant")
    row_has_system = np.zeros(rows, dtype=bool)
    row_has_system[parent[(position == 0) & is_system]] = True
    turn = position - row_has_system[parent]
    role_ok = (
        ((position == 0) & is_system) | ((turn >= 0) & (turn % 2 == 0) & is_user) | ((turn % 2 == 1) & is_assistant)
    )
    stripped = pc.utf8_trim_whitespace(pc.struct_field(flat, "content"))
    content_ok = pc.fill_null(pc.greater(pc.utf8_length(stripped), 0), False).to_numpy(zero_copy_only=False)
    element_ok = role_ok & content_ok & ~pc.is_null(flat).to_numpy(zero_copy_only=False)
    bad[parent[~element_ok]] = True
    turns = lengths - row_has_system
    bad |= (turns < 2) | (turns % 2 == 1)
    return np.flatnonzero(bad)


def _iter_arrow_batches(dataset: Dataset, columns: list[str]) -> Iterator[pa.Table]:
    yield from dataset.select_columns(columns).with_format("arrow").iter(batch_size=VALIDATION_BATCH_ROWS)


def _first_problem(dataset: Dataset, data_format: str, start: int = 0) -> tuple[int, str] | None:
    """The first row from `start` on that breaks the rules, checked in Python on decoded rows (Json included): slow,
    used to explain a rejection and for layouts the fast check cannot read."""
    dataset = dataset.with_format(None)
    for begin in range(start, len(dataset), PYTHON_BATCH_ROWS):
        batch = dataset[begin : begin + PYTHON_BATCH_ROWS]
        names = list(batch)
        for index, values in enumerate(zip(*batch.values(), strict=True), start=begin):
            problem = row_problem(dict(zip(names, values, strict=True)), data_format)
            if problem is not None:
                return index, problem
    return None


def validate_conversations(dataset: Dataset, origin: DatasetOrigin | str = "dataset") -> str:
    """Check every row of `dataset`; return its format, or raise `DataFormatError` naming the first bad row."""
    origin = origin if isinstance(origin, DatasetOrigin) else DatasetOrigin(origin)
    if len(dataset) == 0:
        raise DataFormatError(f"{origin.label}: has no rows; expected one conversation per row, as in {EXPECTED_ROW}")
    data_format = _detect_format(dataset, origin)
    if data_format == "messages":
        offset = 0
        for batch in _iter_arrow_batches(dataset, ["messages"]):
            bad = bad_message_rows(batch.column("messages"))
            if bad is None or len(bad):
                found = _first_problem(dataset, data_format, start=offset + (int(bad[0]) if bad is not None else 0))
                if found is not None:
                    row, problem = found
                    raise DataFormatError(f"{origin.where(row)}: {problem}")
                if bad is not None:  # the fast check and the reference rules disagree: report what we know
                    raise DataFormatError(f"{origin.where(offset + int(bad[0]))}: not a valid conversation")
                break  # the column's type needed the Python check, which passed every row
            offset += batch.num_rows
    elif data_format == "standard":
        for name in ("prompt", "completion"):
            offset = 0
            for batch in _iter_arrow_batches(dataset, [name]):
                column = batch.column(name)
                ok = pc.fill_null(pc.greater(pc.utf8_length(pc.utf8_trim_whitespace(column)), 0), False)
                bad = np.flatnonzero(~ok.to_numpy(zero_copy_only=False))
                if len(bad):
                    row = offset + int(bad[0])
                    raise DataFormatError(f"{origin.where(row)}: {row_problem(dataset[row], data_format)}")
                offset += batch.num_rows
    else:
        found = _first_problem(dataset, data_format)
        if found is not None:
            raise DataFormatError(f"{origin.where(found[0])}: {found[1]}")
    return data_format


def load_conversations(source: Any, *, label: str = "dataset", split: str = "train") -> Dataset:
    """Load conversations from a Dataset, a JSONL/JSON file, a saved dataset folder or a hub dataset name.

    Every row is validated; a bad row raises `DataFormatError` naming the file and line (or row) and the field.
    Returns the dataset as stored (validation does not rewrite it).
    """
    dataset, origin = read_dataset(source, label, split, row_problem=any_format_row_problem)
    validate_conversations(dataset, origin)
    return dataset


def any_format_row_problem(row: dict) -> str | None:
    """`row_problem` for a row of unknown format: messages, or prompt/completion as strings or message lists."""
    if not isinstance(row, dict):
        return row_problem(row, "messages")
    return row_problem(row, RULES_FORMAT[forms.closest_form(row)])
