"""TRL's dataset forms, and the few conversions DELIA needs between them.

SFTTrainer accepts language-modeling rows (`text`, or `dataset_text_field`), prompt/completion rows (strings, or
message lists), conversations (`messages`, or ShareGPT-style `conversations` with from/value keys) and pre-tokenized
rows (`input_ids`). DELIA changes a dataset only where it must:

- `split_final_reply`: a conversation becomes prompt = every message but the last, completion = the final assistant
  reply, so the loss falls on that reply whatever the chat template (DELIA's recipe; `final_reply_only`);
- `conform`: a diverse cache is rewritten in the downstream rows' Arrow schema (columns it lacks become empty, columns
  only it has are dropped), so the two can be concatenated and every column of the user's rows survives mixing.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from datasets import Dataset, Features, IterableDataset, Value

from .reading import DataFormatError, DatasetOrigin

LANGUAGE_MODELING = "language modeling text"
PROMPT_COMPLETION = "prompt/completion strings"
CONVERSATIONAL_PROMPT_COMPLETION = "conversational prompt/completion"
MESSAGES = "conversations (messages)"
FROM_VALUE = "conversations (from/value)"
TOKENIZED = "pre-tokenized input_ids"

KNOWN_FORMS_HINT = (
    "{'text': ...}, {'prompt': ..., 'completion': ...} (strings or message lists), {'messages': [...]}, "
    "{'conversations': [{'from': ..., 'value': ...}]} or {'input_ids': [...]}"
)


def _first_row(dataset: Dataset | IterableDataset) -> dict[str, Any]:
    return next(iter(dataset)) if isinstance(dataset, IterableDataset) else dataset[0]


def detect_form(
    dataset: Dataset | IterableDataset, text_field: str = "text", origin: DatasetOrigin | None = None
) -> str:
    """Which of TRL's forms `dataset` is in, decided as SFTTrainer decides it (pre-tokenized rows first)."""
    columns = dataset.column_names or list(_first_row(dataset))
    if "input_ids" in columns:
        return TOKENIZED
    if "prompt" in columns and "completion" in columns:
        feature = dataset.features["prompt"] if dataset.features else None
        if isinstance(feature, Value) or (feature is None and isinstance(_first_row(dataset)["prompt"], str)):
            return PROMPT_COMPLETION
        return CONVERSATIONAL_PROMPT_COMPLETION
    if "messages" in columns:
        return MESSAGES
    if "conversations" in columns:
        return FROM_VALUE
    if text_field in columns:
        return LANGUAGE_MODELING
    where = origin.label if origin else "dataset"
    found = ", ".join(map(repr, columns)) or "none"
    raise DataFormatError(
        f"{where}: no column SFTTrainer can train on (fields found: {found}); expected {KNOWN_FORMS_HINT}"
    )


def is_conversational_form(form: str) -> bool:
    return form in (MESSAGES, FROM_VALUE, CONVERSATIONAL_PROMPT_COMPLETION)


# ----------------------------------------------------------------------------------------------------------------------
# Conversations -> prompt / final reply
# ----------------------------------------------------------------------------------------------------------------------


def check_ends_with_assistant(dataset: Dataset, origin: DatasetOrigin) -> None:
    """Every conversation must end with an assistant reply to be split on it; else name the first row that does not."""
    offset = 0
    for batch in dataset.select_columns(["messages"]).with_format("arrow").iter(batch_size=65_536):
        messages = batch.column("messages").combine_chunks()
        if not _is_message_list(messages.type):  # a layout Arrow cannot read roles from: check each row
            for row, conversation in enumerate(messages.to_pylist(), start=offset):
                _check_last_role(conversation, row, origin)
        else:
            lengths = pc.fill_null(pc.list_value_length(messages), 0).to_numpy(zero_copy_only=False)
            last_role = np.full(len(messages), None, dtype=object)
            has_any = lengths > 0
            if has_any.any():
                ends = pa.array(np.cumsum(lengths)[has_any] - 1)
                last_role[has_any] = pc.struct_field(pc.list_flatten(messages), "role").take(ends).to_pylist()
            bad = np.flatnonzero(last_role != "assistant")
            if len(bad):
                _check_last_role(messages[int(bad[0])].as_py(), offset + int(bad[0]), origin)
        offset += batch.num_rows


def _check_last_role(conversation: Any, row: int, origin: DatasetOrigin) -> None:
    if not isinstance(conversation, list) or not conversation:
        raise DataFormatError(
            f"{origin.where(row)}: field 'messages': expected a non-empty list of messages, got "
            f"{'an empty list' if isinstance(conversation, list) else type(conversation).__name__}"
        )
    last = conversation[-1]
    role = last.get("role") if isinstance(last, dict) else None
    if role != "assistant":
        raise DataFormatError(
            f"{origin.where(row)}: field 'messages'[{len(conversation) - 1}].role: expected the conversation to end "
            f"with the assistant's reply, got {role!r}; final_reply_only=True trains on that reply (set "
            "final_reply_only=False to train on the conversation as SFTTrainer does)"
        )


def _is_message_list(column_type: pa.DataType) -> bool:
    return (
        (pa.types.is_list(column_type) or pa.types.is_large_list(column_type))
        and pa.types.is_struct(column_type.value_type)
        and column_type.value_type.get_field_index("role") >= 0
    )


def _split_table(table: pa.Table) -> pa.Table:
    """prompt = messages[:-1], completion = messages[-1:], as Arrow list slices; other columns unchanged."""
    index = table.column_names.index("messages")
    messages = table.column("messages").combine_chunks()
    lengths = pc.list_value_length(messages).to_numpy(zero_copy_only=False).astype(np.int64)
    flat = pc.list_flatten(messages)
    is_last = np.zeros(len(flat), dtype=bool)
    is_last[np.cumsum(lengths) - 1] = True
    prompt_offsets = pa.array(np.concatenate(([0], np.cumsum(lengths - 1))), type=pa.int32())
    completion_offsets = pa.array(np.arange(len(lengths) + 1), type=pa.int32())
    prompt = pa.ListArray.from_arrays(prompt_offsets, flat.filter(pa.array(~is_last)))
    completion = pa.ListArray.from_arrays(completion_offsets, flat.filter(pa.array(is_last)))
    table = table.remove_column(index)
    return table.add_column(index, "prompt", prompt).add_column(index + 1, "completion", completion)


def _split_rows(batch: dict[str, list]) -> dict[str, list]:
    """The row-by-row `_split_table`, for layouts Arrow cannot slice (and for streaming datasets, checked as they go)."""
    batch = dict(batch)
    conversations = batch.pop("messages")
    for row, conversation in enumerate(conversations):
        _check_last_role(conversation, row, DatasetOrigin("streaming dataset (row within its batch)"))
    return {
        "prompt": [messages[:-1] for messages in conversations],
        "completion": [messages[-1:] for messages in conversations],
        **batch,
    }


def split_final_reply(dataset: Dataset | IterableDataset) -> Dataset | IterableDataset:
    """`messages` rows -> conversational prompt/completion on the final reply; every other column is kept as is.

    The result stays in memory (it is a cheap rewrite of list offsets, and caching it would leave a file per run).
    """
    if isinstance(dataset, IterableDataset):
        return dataset.map(_split_rows, batched=True, remove_columns=["messages"])
    if _is_message_list(dataset.data.schema.field("messages").type):
        message = dataset.features["messages"]
        features = Features(
            {
                **{name: feature for name, feature in dataset.features.items() if name != "messages"},
                "prompt": message,
                "completion": message,
            }
        )
        order = [name for name in dataset.column_names if name != "messages"]
        at = dataset.column_names.index("messages")
        features = Features({name: features[name] for name in order[:at] + ["prompt", "completion"] + order[at:]})
        return (
            dataset.with_format("arrow")
            .map(
                _split_table,
                batched=True,
                batch_size=10_000,
                features=features,
                keep_in_memory=True,
                desc="Splitting off the final replies",
            )
            .with_format(None)
        )
    return dataset.map(
        _split_rows,
        batched=True,
        remove_columns=["messages"],
        keep_in_memory=True,
        desc="Splitting off the final replies",
    )


def join_prompt_completion(dataset: Dataset) -> Dataset:
    """Conversational prompt/completion rows -> `messages` = prompt + completion (other columns kept)."""

    def join(batch: dict[str, list]) -> dict[str, list]:
        batch = dict(batch)
        prompts, completions = batch.pop("prompt"), batch.pop("completion")
        return {"messages": [p + c for p, c in zip(prompts, completions, strict=True)], **batch}

    return dataset.map(join, batched=True, remove_columns=["prompt", "completion"], keep_in_memory=True)


# ----------------------------------------------------------------------------------------------------------------------
# Conforming a cache to the downstream schema
# ----------------------------------------------------------------------------------------------------------------------


def empty_value(data_type: pa.DataType, rows: int) -> pa.Array:
    """What a row lacking a column holds: null, or a struct of nulls (TRL unpacks `chat_template_kwargs` with **)."""
    if pa.types.is_struct(data_type):
        return pa.StructArray.from_arrays(
            [empty_value(data_type.field(i).type, rows) for i in range(data_type.num_fields)],
            fields=list(data_type),
        )
    return pa.nulls(rows, type=data_type)


def conform_array(array: pa.Array, target: pa.DataType) -> pa.Array:
    """`array` rewritten as `target`: struct fields it lacks become empty, extra fields go, lists recurse."""
    if array.type == target:
        return array
    if pa.types.is_struct(target) and pa.types.is_struct(array.type):
        names = [array.type.field(i).name for i in range(array.type.num_fields)]
        children = [
            conform_array(pc.struct_field(array, field.name), field.type)
            if field.name in names
            else empty_value(field.type, len(array))
            for field in target
        ]
        return pa.StructArray.from_arrays(
            children, fields=list(target), mask=array.is_null() if array.null_count else None
        )
    if (pa.types.is_list(target) or pa.types.is_large_list(target)) and (
        pa.types.is_list(array.type) or pa.types.is_large_list(array.type)
    ):
        values = conform_array(array.values.slice(array.offsets[0].as_py(), None), target.value_type)
        offsets = pc.subtract(array.offsets, array.offsets[0])
        list_class = pa.LargeListArray if pa.types.is_large_list(target) else pa.ListArray
        return list_class.from_arrays(offsets, values, mask=array.is_null() if array.null_count else None)
    return array.cast(target)


def _castable(source: pa.DataType, target: pa.DataType) -> bool:
    """Whether `conform_array` rewrites `source` as `target` for any values (decided on the types alone)."""
    if source == target or pa.types.is_null(source):
        return True
    if pa.types.is_struct(source) and pa.types.is_struct(target):
        names = {source.field(i).name: source.field(i).type for i in range(source.num_fields)}
        return all(_castable(names[field.name], field.type) for field in target if field.name in names)
    lists = (pa.types.is_list, pa.types.is_large_list)
    if any(check(source) for check in lists) and any(check(target) for check in lists):
        return _castable(source.value_type, target.value_type)
    numbers = (pa.types.is_integer, pa.types.is_floating)
    if pa.types.is_integer(source) and any(check(target) for check in numbers):
        return True
    strings = (pa.types.is_string, pa.types.is_large_string)
    return any(check(source) for check in strings) and any(check(target) for check in strings)


def _clashing_columns(dataset: Dataset, schema: pa.Schema) -> list[str]:
    """Columns of `dataset` whose type `conform_array` cannot rewrite in `schema`'s (e.g. a string `id` vs an int one)."""
    source = dataset.features.arrow_schema
    return [
        field.name
        for field in schema
        if field.name in source.names and not _castable(source.field(field.name).type, field.type)
    ]


def conform(dataset: Dataset, features: Features, constants: dict[str, str] | None = None) -> Dataset:
    """`dataset` in the schema `features` (missing columns empty, extra ones dropped), plus constant string columns."""
    schema = features.arrow_schema
    constants = constants or {}
    clashing = _clashing_columns(dataset, schema)
    if clashing:
        warnings.warn(
            "Columns the downstream rows and the diverse cache hold in types that cannot be reconciled are left empty "
            "in the cache rows: "
            + "; ".join(f"{name!r} ({dataset.features[name]} vs {features[name]})" for name in clashing),
            UserWarning,
            stacklevel=4,
        )

    def rewrite(table: pa.Table) -> pa.Table:
        columns = {}
        for field in schema:
            if field.name in constants:
                columns[field.name] = pa.array([constants[field.name]] * table.num_rows, type=field.type)
            elif field.name in table.column_names and field.name not in clashing:
                columns[field.name] = conform_array(table.column(field.name).combine_chunks(), field.type)
            else:
                columns[field.name] = empty_value(field.type, table.num_rows)
        return pa.table(columns, schema=schema)

    return (
        dataset.with_format("arrow")
        .map(
            rewrite,
            batched=True,
            batch_size=10_000,
            features=features,
            remove_columns=[name for name in dataset.column_names if name not in features],
            keep_in_memory=True,
            desc="Aligning columns",
        )
        .with_format(None)
    )
