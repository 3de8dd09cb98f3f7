"""Load, validate and mix conversational datasets: the path a row takes from JSONL to the trainer.

A DELIA row is a conversation, `{"messages": [{"role": "user", ...}, {"role": "assistant", ...}]}`, with an optional
leading system message; TRL's prompt/completion form is accepted too. Rows are validated here, in one place, with
errors that name the file, line and field. Each row is then turned into TRL's conversational prompt/completion form
(the final assistant reply is the completion, so the loss falls on it whatever the chat template) and tagged with its
`source`. `mix_datasets` draws the diverse rows by index, concatenates and shuffles with a seed: no Python lists of
rows, and the same result on every process.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from datasets import Dataset, DatasetDict, Features, List, Value, concatenate_datasets, load_dataset, load_from_disk

from .config import check_diverse_ratio, check_diverse_sampling

logger = logging.getLogger(__name__)

SOURCES = ("downstream", "diverse")
"""Values of the `source` column, in the order of the `source_ids` the trainer uses."""

EXPECTED_ROW = '{"messages": [{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}]}'
_MESSAGE = {"role": Value("string"), "content": Value("string")}
CONVERSATIONAL_FEATURES = Features({"prompt": List(_MESSAGE), "completion": List(_MESSAGE), "source": Value("string")})
STANDARD_FEATURES = Features({"prompt": Value("string"), "completion": Value("string"), "source": Value("string")})
_VALIDATION_BATCH_ROWS = 65_536


class DataFormatError(ValueError):
    """A dataset row does not have the shape DELIA expects; the message names the file, line and field."""


# ----------------------------------------------------------------------------------------------------------------------
# Where a row came from, for error messages
# ----------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Origin:
    """Names a dataset in messages, and turns a row index into `file, line N` (JSON files) or `name, row N`."""

    label: str
    json_path: str | None = None

    def where(self, row: int) -> str:
        if self.json_path is None:
            return f"{self.label}, row {row}"
        return f"{self.json_path}, line {_line_of_row(self.json_path, row)}"


def _line_of_row(path: str, row: int) -> int:
    """The 1-based line of the `row`-th JSON object in a JSONL file (blank lines hold no row)."""
    seen = -1
    with open(path, "rb") as handle:
        for line_number, line in enumerate(handle, start=1):
            if line.strip():
                seen += 1
                if seen == row:
                    return line_number
    return line_number + 1  # past the end: only reachable if the file changed under us


# ----------------------------------------------------------------------------------------------------------------------
# Checking one row in Python: the reference rules, used to explain a row the fast check rejected
# ----------------------------------------------------------------------------------------------------------------------


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _messages_problem(messages: Any, field_of: Callable[[int], str], whole: str) -> str | None:
    """Why `messages` is not [system?, user, assistant, (user, assistant)...], or None if it is fine."""
    if messages is None:
        return f"missing field {whole}: expected a list of messages, as in {EXPECTED_ROW}"
    if not isinstance(messages, list):
        return f"field {whole}: expected a list of {{role, content}} messages, got {_type_name(messages)}"
    has_system = bool(messages) and isinstance(messages[0], dict) and messages[0].get("role") == "system"
    for index, message in enumerate(messages):
        if not isinstance(message, dict):
            return f"field {field_of(index)}: expected an object with 'role' and 'content', got {_type_name(message)}"
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
            return f"field {field_of(index)}.content: expected a non-empty string, got {_type_name(content)}"
        if not content.strip():
            return f"field {field_of(index)}.content: expected a non-empty string, got an empty one"
    turns = len(messages) - has_system
    if turns < 2:
        return f"field {whole}: expected at least a user message and an assistant reply, got {turns} message(s)"
    if turns % 2:
        return f"field {whole}: expected the last message to be the assistant's reply, got role 'user'"
    return None


def _row_problem(row: Any, data_format: str) -> str | None:
    """Why one row does not fit `data_format` ("messages", "conversational" or "standard"), or None."""
    if not isinstance(row, dict):
        return f"expected a JSON object such as {EXPECTED_ROW}, got {_type_name(row)}"
    if data_format == "messages":
        if "messages" not in row:
            found = ", ".join(map(repr, row)) or "none"
            return f"missing field 'messages': expected {EXPECTED_ROW} (fields found: {found})"
        return _messages_problem(row["messages"], lambda i: f"'messages'[{i}]", "'messages'")
    if data_format == "standard":
        for name in ("prompt", "completion"):
            value = row.get(name)
            if not isinstance(value, str) or not value.strip():
                return (
                    f"field '{name}': expected a non-empty string, got {_type_name(value) if value else 'an empty one'}"
                )
        return None
    prompt, completion = row.get("prompt"), row.get("completion")
    for name, value in (("prompt", prompt), ("completion", completion)):
        if not isinstance(value, list):
            return f"field '{name}': expected a list of {{role, content}} messages, got {_type_name(value)}"
    if len(completion) != 1:
        return f"field 'completion': expected exactly one assistant message, got {len(completion)}"

    def field_of(index: int) -> str:
        return f"'prompt'[{index}]" if index < len(prompt) else f"'completion'[{index - len(prompt)}]"

    return _messages_problem(prompt + completion, field_of, "'prompt' + 'completion'")


# ----------------------------------------------------------------------------------------------------------------------
# Checking a whole dataset: vectorised over Arrow batches, so a million-row cache takes seconds and little memory
# ----------------------------------------------------------------------------------------------------------------------


def _detect_format(dataset: Dataset, origin: _Origin) -> str:
    """ "messages", "conversational" (prompt/completion message lists) or "standard" (prompt/completion strings)."""
    columns = dataset.column_names
    if "messages" in columns:
        return "messages"
    if "prompt" in columns and "completion" in columns:
        prompt_feature = dataset.features["prompt"]
        return "standard" if isinstance(prompt_feature, Value) else "conversational"
    found = ", ".join(map(repr, columns)) or "none"
    raise DataFormatError(
        f"{origin.where(0)}: missing field 'messages': expected {EXPECTED_ROW} (fields found: {found})"
    )


def _bad_rows_in_messages_batch(messages: pa.ChunkedArray | pa.Array) -> np.ndarray | None:
    """Indices of rows in one Arrow batch that break the messages rules; None if the column's type needs Python."""
    if isinstance(messages, pa.ChunkedArray):
        messages = messages.combine_chunks()
    if not _has_plain_message_type(messages.type):
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
    yield from dataset.select_columns(columns).with_format("arrow").iter(batch_size=_VALIDATION_BATCH_ROWS)


def _first_problem(dataset: Dataset, data_format: str, start: int = 0) -> tuple[int, str] | None:
    """The first row from `start` on that breaks the rules, checked in Python (slow; used to explain a rejection)."""
    for index in range(start, len(dataset)):
        problem = _row_problem(dataset[index], data_format)
        if problem is not None:
            return index, problem
    return None


def validate_conversations(dataset: Dataset, origin: _Origin | str = "dataset") -> str:
    """Check every row of `dataset`; return its format, or raise `DataFormatError` naming the first bad row."""
    origin = origin if isinstance(origin, _Origin) else _Origin(origin)
    if len(dataset) == 0:
        raise DataFormatError(f"{origin.label}: has no rows; expected one conversation per row, as in {EXPECTED_ROW}")
    data_format = _detect_format(dataset, origin)
    if data_format == "messages":
        offset = 0
        for batch in _iter_arrow_batches(dataset, ["messages"]):
            bad = _bad_rows_in_messages_batch(batch.column("messages"))
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
                    raise DataFormatError(f"{origin.where(row)}: {_row_problem(dataset[row], data_format)}")
                offset += batch.num_rows
    else:
        found = _first_problem(dataset, data_format)
        if found is not None:
            raise DataFormatError(f"{origin.where(found[0])}: {found[1]}")
    return data_format


# ----------------------------------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------------------------------

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


def _explain_unreadable_json(path: str, error: Exception) -> DataFormatError:
    """Find the line that pyarrow could not read, parsing the file line by line with `json`."""
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
                    f"{path}, line {line_number}: expected a JSON object such as {EXPECTED_ROW}, got {_type_name(row)}"
                )
            data_format = "messages" if "messages" in row or "prompt" not in row else "conversational"
            if data_format == "conversational" and isinstance(row.get("prompt"), str):
                data_format = "standard"
            problem = _row_problem(row, data_format)
            if problem is not None:
                return DataFormatError(f"{path}, line {line_number}: {problem}")
    summary = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return DataFormatError(f"{path}: could not be read as JSON lines ({summary})")


def _read_json(path: str) -> Dataset:
    if os.path.getsize(path) == 0 or not _has_content(path):
        raise DataFormatError(f"{path}: the file is empty; expected one JSON object per line, such as {EXPECTED_ROW}")
    try:
        with _quiet_json_builder():
            return Dataset.from_json(path)
    except Exception as error:  # pyarrow / datasets errors: explain them by line instead
        raise _explain_unreadable_json(path, error) from None


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


def read_dataset(source: Any, label: str, split: str = "train") -> tuple[Dataset, _Origin]:
    """Read any dataset source (Dataset, JSONL/JSON file, saved folder, hub name) unvalidated, with its origin."""
    if isinstance(source, (Dataset, DatasetDict)):
        return _pick_split(source, split, label), _Origin(label)
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(
            f"{label}: expected a datasets.Dataset, a JSONL path, a saved dataset folder or a hub dataset name; "
            f"got {type(source).__name__}"
        )
    path = os.fspath(source)
    if os.path.isfile(path):
        dataset = _read_json(path)
        # A JSON array file holds rows that are not lines: name its rows by index, not by a wrong line number.
        return dataset, _Origin(path, json_path=None if _is_json_array(path) else path)
    if os.path.isdir(path):
        try:
            loaded = load_from_disk(path)
        except FileNotFoundError:
            raise DataFormatError(
                f"{label} {path!r}: the folder is not a saved dataset (expected one written by "
                "Dataset.save_to_disk); pass a JSONL file instead"
            ) from None
        return _pick_split(loaded, split, path), _Origin(path)
    if path.endswith((".json", ".jsonl")) or path.startswith((".", "/", "~")) or not _HUB_NAME.match(path):
        raise FileNotFoundError(
            f"{label} {path!r} not found: expected a JSONL file, a folder written by Dataset.save_to_disk, "
            "or a hub dataset name"
        )
    try:
        return load_dataset(path, split=split), _Origin(f"hub dataset {path!r}")
    except Exception as error:
        raise FileNotFoundError(
            f"{label} {path!r}: no such file or folder, and loading it as a hub dataset failed "
            f"({type(error).__name__}: {str(error).strip().splitlines()[0] if str(error).strip() else ''})"
        ) from None


def load_conversations(source: Any, *, label: str = "dataset", split: str = "train") -> Dataset:
    """Load conversations from a Dataset, a JSONL/JSON file, a saved dataset folder or a hub dataset name.

    Every row is validated; a bad row raises `DataFormatError` naming the file and line (or row) and the field.
    Returns the dataset as stored (validation does not rewrite it).
    """
    dataset, origin = read_dataset(source, label, split)
    validate_conversations(dataset, origin)
    return dataset


def read_conversations(source: Any, label: str, split: str = "train") -> tuple[Dataset, str, str]:
    """Load and validate; return the dataset, its format ("messages", "conversational" or "standard") and a name."""
    dataset, origin = read_dataset(source, label, split)
    return dataset, validate_conversations(dataset, origin), origin.label


# ----------------------------------------------------------------------------------------------------------------------
# Normalising: every row becomes TRL's prompt/completion form with plain {role, content} messages and a source
# ----------------------------------------------------------------------------------------------------------------------


def _sources(batch: dict[str, list], source: str | None, rows: int) -> list[str]:
    return batch["source"] if source is None else [source] * rows


def _plain_messages(messages: list[dict[str, Any]]) -> list[dict[str, str]]:
    return [{"role": message["role"], "content": message["content"]} for message in messages]


def _split_messages_batch(batch: dict[str, list], source: str) -> dict[str, list]:
    prompts, completions = [], []
    for messages in batch["messages"]:
        messages = _plain_messages(messages)
        prompts.append(messages[:-1])
        completions.append(messages[-1:])
    return {"prompt": prompts, "completion": completions, "source": _sources(batch, source, len(prompts))}


def _has_plain_message_type(column_type: pa.DataType) -> bool:
    """list<struct<role: string, content: string, ...>>: the Arrow layout the fast split below can handle."""
    if not (pa.types.is_list(column_type) or pa.types.is_large_list(column_type)):
        return False
    item = column_type.value_type
    return (
        pa.types.is_struct(item)
        and item.get_field_index("role") >= 0
        and item.get_field_index("content") >= 0
        and pa.types.is_string(item.field("role").type)
        and pa.types.is_string(item.field("content").type)
    )


def _split_messages_table(table: pa.Table, source: str | None) -> pa.Table:
    """The vectorised `_split_messages_batch`: prompt = messages[:-1], completion = messages[-1:], as Arrow lists."""
    messages = table.column("messages").combine_chunks()
    lengths = pc.list_value_length(messages).to_numpy(zero_copy_only=False).astype(np.int64)
    flat = pc.list_flatten(messages)
    plain = pa.StructArray.from_arrays(
        [pc.struct_field(flat, "role"), pc.struct_field(flat, "content")], names=["role", "content"]
    )
    is_last = np.zeros(len(plain), dtype=bool)
    is_last[np.cumsum(lengths) - 1] = True
    prompt_offsets = pa.array(np.concatenate(([0], np.cumsum(lengths - 1))), type=pa.int32())
    completion_offsets = pa.array(np.arange(len(lengths) + 1), type=pa.int32())
    sources = table.column("source") if source is None else pa.array([source] * len(lengths), type=pa.string())
    return pa.table(
        {
            "prompt": pa.ListArray.from_arrays(prompt_offsets, plain.filter(pa.array(~is_last))),
            "completion": pa.ListArray.from_arrays(completion_offsets, plain.filter(pa.array(is_last))),
            "source": sources,
        }
    )


def _plain_prompt_completion_batch(batch: dict[str, list], source: str) -> dict[str, list]:
    return {
        "prompt": [_plain_messages(prompt) for prompt in batch["prompt"]],
        "completion": [_plain_messages(completion) for completion in batch["completion"]],
        "source": _sources(batch, source, len(batch["prompt"])),
    }


def _standard_batch(batch: dict[str, list], source: str) -> dict[str, list]:
    return {
        "prompt": batch["prompt"],
        "completion": batch["completion"],
        "source": _sources(batch, source, len(batch["prompt"])),
    }


def to_prompt_completion(dataset: Dataset, data_format: str, source: str | None) -> Dataset:
    """Rewrite validated rows as `prompt` / `completion` / `source`; every other column is dropped.

    `source` tags every row; None keeps the dataset's own `source` column. The result is kept in memory: it holds
    only the rows a mixture uses, and writing it to datasets' cache would leave one file per seed and ratio.
    """
    if source is not None and source not in SOURCES:
        raise ValueError(f"source must be one of {SOURCES}, got {source!r}")
    if source is None and "source" not in dataset.column_names:
        raise ValueError("source=None keeps the dataset's `source` column, but it has none")
    if data_format == "messages" and _has_plain_message_type(dataset.data.schema.field("messages").type):
        # Fast path for the usual layout: split the lists with Arrow instead of a Python loop over rows
        columns = ["messages"] if source is not None else ["messages", "source"]
        return (
            dataset.select_columns(columns)
            .with_format("arrow")
            .map(
                _split_messages_table,
                batched=True,
                batch_size=10_000,
                fn_kwargs={"source": source},
                remove_columns=columns,
                features=CONVERSATIONAL_FEATURES,
                keep_in_memory=True,
                desc=f"Preparing {source or 'tagged'} rows",
            )
            .with_format(None)
        )
    function, features = {
        "messages": (_split_messages_batch, CONVERSATIONAL_FEATURES),
        "conversational": (_plain_prompt_completion_batch, CONVERSATIONAL_FEATURES),
        "standard": (_standard_batch, STANDARD_FEATURES),
    }[data_format]
    return dataset.map(
        function,
        batched=True,
        fn_kwargs={"source": source},
        remove_columns=dataset.column_names,
        features=features,
        keep_in_memory=True,
        desc=f"Preparing {source or 'tagged'} rows",
    )


def prepare_conversations(source: Any, *, label: str = "dataset", row_source: str = "downstream") -> Dataset:
    """Load, validate and normalise one dataset (for example an eval set) to prompt/completion/source rows."""
    dataset, data_format, _ = read_conversations(source, label)
    return to_prompt_completion(dataset, data_format, row_source)


# ----------------------------------------------------------------------------------------------------------------------
# Mixing
# ----------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MixturePlan:
    """How many diverse rows a mixture takes from the cache, and how they are drawn."""

    downstream_rows: int
    cache_rows: int
    diverse_rows: int
    ratio: float
    seed: int
    sampling: str  # as asked: auto | without_replacement | with_replacement
    resolved_sampling: str  # as done: none | without_replacement | with_replacement | every_row_then_with_replacement

    def draw(self) -> np.ndarray:
        """Cache row indices of the diverse rows, sorted (the mixture is shuffled afterwards)."""
        rng = np.random.default_rng(self.seed)
        if self.resolved_sampling == "none":
            indices = np.empty(0, dtype=np.int64)
        elif self.resolved_sampling == "without_replacement":
            indices = rng.choice(self.cache_rows, size=self.diverse_rows, replace=False)
        elif self.resolved_sampling == "with_replacement":
            indices = rng.integers(0, self.cache_rows, size=self.diverse_rows)
        else:
            extra = rng.integers(0, self.cache_rows, size=self.diverse_rows - self.cache_rows)
            indices = np.concatenate((np.arange(self.cache_rows), extra))
        return np.sort(indices.astype(np.int64))


def diverse_row_count(ratio: float, downstream_rows: int) -> int:
    """round(ratio x downstream rows), halves rounding up."""
    return int(math.floor(check_diverse_ratio(ratio) * downstream_rows + 0.5))


def plan_mixture(downstream_rows: int, cache_rows: int, ratio: float, seed: int, sampling: str = "auto") -> MixturePlan:
    """Decide the diverse row count and the sampling mode; raise if the cache cannot supply them."""
    sampling = check_diverse_sampling(sampling)
    wanted = diverse_row_count(ratio, downstream_rows)
    if wanted == 0:
        resolved = "none"
    elif cache_rows == 0:
        raise ValueError(f"the diverse cache is empty, but ratio {ratio:g} asks for {wanted} diverse rows")
    elif sampling == "with_replacement":
        resolved = "with_replacement"
    elif wanted <= cache_rows:
        resolved = "without_replacement"
    elif sampling == "without_replacement":
        raise ValueError(
            f"diverse_sampling='without_replacement' needs {wanted} diverse rows (ratio {ratio:g} x "
            f"{downstream_rows} downstream rows), but the cache has only {cache_rows}; use a larger cache, a "
            "smaller diverse_ratio, or diverse_sampling='auto' / 'with_replacement'"
        )
    else:
        resolved = "every_row_then_with_replacement"
    return MixturePlan(downstream_rows, cache_rows, wanted, float(ratio), int(seed), sampling, resolved)


def _conversational(data_format: str) -> bool:
    return data_format in ("messages", "conversational")


def mix_datasets(
    downstream: Any,
    diverse: Any | None,
    ratio: float = 100.0,
    seed: int = 0,
    sampling: str = "auto",
) -> Dataset:
    """Mix `round(ratio x len(downstream))` rows of the diverse cache into the downstream rows, shuffled with `seed`.

    `downstream` and `diverse` are Datasets or anything `load_conversations` reads. The result has the columns
    `prompt`, `completion` (TRL's conversational prompt/completion form) and `source` ("downstream" or "diverse").
    The draw and the shuffle depend only on `seed`, so every process of a distributed run builds the same mixture.
    """
    mixed, _ = build_mixture(downstream, diverse, ratio, seed, sampling)
    return mixed


def build_mixture(
    downstream: Any, diverse: Any | None, ratio: float, seed: int, sampling: str
) -> tuple[Dataset, MixturePlan]:
    """`mix_datasets`, also returning the plan it followed (row counts and sampling mode), for the mixture record."""
    ratio = check_diverse_ratio(ratio)
    sampling = check_diverse_sampling(sampling)
    down, down_format, down_name = read_conversations(downstream, "downstream dataset")
    parts = [to_prompt_completion(down, down_format, "downstream")]
    if diverse is None or diverse_row_count(ratio, len(down)) == 0:
        plan = plan_mixture(len(down), 0, 0.0, seed, sampling)
    else:
        cache, cache_format, cache_name = read_conversations(diverse, "diverse dataset")
        if _conversational(down_format) != _conversational(cache_format):
            kinds = {True: "conversational (message lists)", False: "standard (prompt/completion strings)"}
            down_what = "the downstream dataset" + ("" if down_name == "downstream dataset" else f" {down_name}")
            cache_what = "the diverse dataset" + ("" if cache_name == "diverse dataset" else f" {cache_name}")
            raise DataFormatError(
                f"mismatched formats: {down_what} is {kinds[_conversational(down_format)]}, "
                f"but {cache_what} is {kinds[_conversational(cache_format)]}; both must have the "
                f"same form, conversational as in {EXPECTED_ROW}"
            )
        plan = plan_mixture(len(down), len(cache), ratio, seed, sampling)
        if plan.resolved_sampling == "every_row_then_with_replacement":
            warnings.warn(
                f"The diverse cache has {plan.cache_rows} rows, but ratio {ratio:g} x {plan.downstream_rows} "
                f"downstream rows asks for {plan.diverse_rows}: using every cache row once plus "
                f"{plan.diverse_rows - plan.cache_rows} drawn with replacement.",
                UserWarning,
                stacklevel=3,
            )
        drawn = cache.select(plan.draw(), keep_in_memory=True)
        parts.append(to_prompt_completion(drawn, cache_format, "diverse"))
    mixed = concatenate_datasets(parts).shuffle(seed=seed)
    logger.info(
        "DELIA mixture: %d downstream + %d diverse rows (cache of %d, sampling %s, seed %d)",
        plan.downstream_rows,
        plan.diverse_rows,
        plan.cache_rows,
        plan.resolved_sampling,
        seed,
    )
    return mixed, plan
