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
    messages = dataset.data.column("messages")
    if not _is_message_list(messages.type):
        for row, conversation in enumerate(dataset["messages"]):
            _check_last_role(conversation, row, origin)
        return
    offset = 0
    for chunk in messages.chunks:
        lengths = pc.fill_null(pc.list_value_length(chunk), 0).to_numpy(zero_copy_only=False)
        last_role = np.full(len(chunk), None, dtype=object)
        has_any = lengths > 0
        if has_any.any():
            ends = np.cumsum(lengths)[has_any] - 1
            roles = pc.struct_field(pc.list_flatten(chunk), "role").take(pa.array(ends)).to_pylist()
            last_role[has_any] = roles
        bad = np.flatnonzero(last_role != "assistant")
        if len(bad):
            row = offset + int(bad[0])
            _check_last_role(dataset[row]["messages"], row, origin)
        offset += len(chunk)


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
    """The row-by-row `_split_table`, for layouts Arrow cannot slice (and for streaming datasets)."""
    batch = dict(batch)
    conversations = batch.pop("messages")
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


def conform(dataset: Dataset, features: Features, constants: dict[str, str] | None = None) -> Dataset:
    """`dataset` in the schema `features` (missing columns empty, extra ones dropped), plus constant string columns."""
    schema = features.arrow_schema
    constants = constants or {}

    def rewrite(table: pa.Table) -> pa.Table:
        columns = {}
        for field in schema:
            if field.name in constants:
                columns[field.name] = pa.array([constants[field.name]] * table.num_rows, type=field.type)
            elif field.name in table.column_names:
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
