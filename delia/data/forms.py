"""TRL's dataset forms: what a row is, read in one place, and the few conversions DELIA needs between forms.

SFTTrainer accepts language-modeling rows (`text`, or `dataset_text_field`), prompt/completion rows (strings, or
message lists), conversations (`messages`, or ShareGPT-style `conversations` with from/value keys) and pre-tokenized
rows (`input_ids`), in plain Arrow columns or in datasets' `Json` type (see `json_type`). Every caller asks here:

- `detect_form` (a dataset) and `row_form` (one row) say which form, in SFTTrainer's order (`closest_form` also names
  the form a broken row comes closest to, for error messages);
- `conversation_of`, `user_turns`, `first_user_turn` and `last_user_turn` read a row's messages whatever its form;
- `is_message_list` says whether an Arrow column is a message list the vectorised paths can read.

DELIA changes a dataset only where it must: `split_final_reply` turns a conversation into prompt = every message but
the last, completion = the final assistant reply, so the loss falls on that reply whatever the chat template (DELIA's
recipe; `final_reply_only`); `conform` (in `conform.py`) rewrites a cache in the downstream rows' schema.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from datasets import Dataset, Features, IterableDataset, Json, Value

from .conform import conform  # noqa: F401  (re-exported: callers outside data/ name it forms.conform)
from .errors import DataFormatError
from .json_type import holds_json, to_python
from .reading import DatasetOrigin

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


# ----------------------------------------------------------------------------------------------------------------------
# Which form: a dataset, or one row
# ----------------------------------------------------------------------------------------------------------------------


def _form_of(columns: list[str], prompt_is_text: Callable[[], bool], text_field: str) -> str | None:
    """The one decision, in SFTTrainer's order (pre-tokenized rows first); None if no column says."""
    if "input_ids" in columns:
        return TOKENIZED
    if "prompt" in columns and "completion" in columns:
        return PROMPT_COMPLETION if prompt_is_text() else CONVERSATIONAL_PROMPT_COMPLETION
    if "messages" in columns:
        return MESSAGES
    if "conversations" in columns:
        return FROM_VALUE
    if text_field in columns:
        return LANGUAGE_MODELING
    return None


def _first_row(dataset: Dataset | IterableDataset) -> dict[str, Any]:
    return next(iter(dataset)) if isinstance(dataset, IterableDataset) else dataset[0]


def detect_form(
    dataset: Dataset | IterableDataset, text_field: str = "text", origin: DatasetOrigin | None = None
) -> str:
    """Which of TRL's forms `dataset` is in, decided as SFTTrainer decides it (pre-tokenized rows first)."""
    columns = dataset.column_names or list(_first_row(dataset))

    def prompt_is_text() -> bool:  # a Json prompt column may hold either: SFTTrainer looks at the first row
        feature = dataset.features["prompt"] if dataset.features else None
        if feature is None or isinstance(feature, Json):
            return isinstance(_first_row(dataset)["prompt"], str)
        return isinstance(feature, Value)

    form = _form_of(columns, prompt_is_text, text_field)
    if form is None:
        where = origin.label if origin else "dataset"
        found = ", ".join(map(repr, columns)) or "none"
        raise DataFormatError(
            f"{where}: no column SFTTrainer can train on (fields found: {found}); expected {KNOWN_FORMS_HINT}"
        )
    return form


def row_form(row: dict[str, Any], text_field: str = "text") -> str | None:
    """Which form one (decoded) row is in, as `detect_form` decides it for a dataset; fields holding None do not
    count (a row of a dataset that mixes forms has them). None if no field says."""
    fields = [name for name, value in row.items() if value is not None]
    return _form_of(fields, lambda: isinstance(row.get("prompt"), str), text_field)


def closest_form(row: dict[str, Any]) -> str:
    """The conversational form a row is in (messages, or prompt/completion as strings or message lists) or, in none,
    the one it comes closest to: prompt/completion when it has a prompt and no messages, else messages."""
    form = row_form(row)
    if form in (MESSAGES, PROMPT_COMPLETION, CONVERSATIONAL_PROMPT_COMPLETION):
        return form
    if "prompt" in row and "messages" not in row:
        return PROMPT_COMPLETION if isinstance(row["prompt"], str) else CONVERSATIONAL_PROMPT_COMPLETION
    return MESSAGES


def is_conversational_form(form: str) -> bool:
    return form in (MESSAGES, FROM_VALUE, CONVERSATIONAL_PROMPT_COMPLETION)


def is_message_list(column_type: pa.DataType, *, plain: bool = False) -> bool:
    """list<struct<role: string, ...>>: messages whose roles Arrow can read (the vectorised check and split); `plain`
    also asks for string contents, the layout the vectorised validation reads. Json layouts are neither."""
    if not (pa.types.is_list(column_type) or pa.types.is_large_list(column_type)):
        return False
    item = column_type.value_type
    if not pa.types.is_struct(item) or item.get_field_index("role") < 0:
        return False
    strings = (pa.types.is_string, pa.types.is_large_string)
    fields = ("role", "content") if plain else ("role",)
    return all(
        item.get_field_index(name) >= 0 and any(check(item.field(name).type) for check in strings) for name in fields
    )


# ----------------------------------------------------------------------------------------------------------------------
# A row's messages, whatever its form
# ----------------------------------------------------------------------------------------------------------------------


def conversation_of(row: dict[str, Any]) -> list[dict[str, Any]]:
    """A row's messages as plain role/content dicts: from prompt + completion (strings or message lists), `messages`,
    or ShareGPT `conversations` (from/value, renamed as SFTTrainer renames them); other message keys are dropped."""
    form = row_form(row)
    if form in (PROMPT_COMPLETION, CONVERSATIONAL_PROMPT_COMPLETION):
        prompt, completion = row["prompt"], row["completion"]
        prompt = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
        completion = [{"role": "assistant", "content": completion}] if isinstance(completion, str) else list(completion)
        messages = prompt + completion
    elif form == MESSAGES:
        messages = row["messages"]
    elif form == FROM_VALUE:
        messages = [{"role": m.get("from"), "content": m.get("value")} for m in row["conversations"]]
    else:
        found = ", ".join(repr(name) for name, value in row.items() if value is not None) or "none"
        raise DataFormatError(
            f"expected a conversation: 'messages', 'conversations' or 'prompt' + 'completion' (fields found: {found})"
        )
    return [{"role": message.get("role"), "content": message.get("content")} for message in messages]


def user_turns(row: dict[str, Any]) -> list[Any]:
    """The contents of a row's user messages, in order, whatever its form (a prompt string is one user turn)."""
    return [message["content"] for message in conversation_of(row) if message["role"] == "user"]


def first_user_turn(row: dict[str, Any]) -> str:
    """The content of a row's first user message (what a query is); DataFormatError if it has none."""
    return _one_turn(row, 0)


def last_user_turn(row: dict[str, Any]) -> str:
    """The content of a row's last user message (the one a final reply answers); DataFormatError if it has none."""
    return _one_turn(row, -1)


def _one_turn(row: dict[str, Any], index: int) -> Any:
    turns = user_turns(row)
    if not turns:
        raise DataFormatError("expected a conversation with a user message, found none")
    return turns[index]


# ----------------------------------------------------------------------------------------------------------------------
# Conversations -> prompt / final reply
# ----------------------------------------------------------------------------------------------------------------------


def check_ends_with_assistant(dataset: Dataset, origin: DatasetOrigin) -> None:
    """Every conversation must end with an assistant reply to be split on it; else name the first row that does not."""
    offset = 0
    for batch in dataset.select_columns(["messages"]).with_format("arrow").iter(batch_size=65_536):
        messages = batch.column("messages").combine_chunks()
        if not is_message_list(messages.type):  # a layout Arrow cannot read roles from (Json): check each row
            for row, conversation in enumerate(to_python(messages), start=offset):
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


def split_rows(batch: dict[str, list]) -> dict[str, list]:
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
        return dataset.map(split_rows, batched=True, remove_columns=["messages"])
    column_type = dataset.data.schema.field("messages").type
    if is_message_list(column_type):
        return (
            dataset.with_format("arrow")
            .map(
                _split_table,
                batched=True,
                batch_size=10_000,
                features=_split_features(dataset),
                keep_in_memory=True,
                desc="Splitting off the final replies",
            )
            .with_format(None)
        )
    return dataset.map(
        split_rows,
        batched=True,
        remove_columns=["messages"],
        features=_split_features(dataset) if holds_json(column_type) else None,  # Json stays Json, as TRL reads it
        keep_in_memory=True,
        desc="Splitting off the final replies",
    )


def _split_features(dataset: Dataset) -> Features:
    """The dataset's features with `messages` replaced, where it stood, by `prompt` and `completion` of its type."""
    features = {}
    for name, feature in dataset.features.items():
        if name == "messages":
            features.update(prompt=feature, completion=feature)
        else:
            features[name] = feature
    return Features(features)


def join_prompt_completion(dataset: Dataset) -> Dataset:
    """Conversational prompt/completion rows -> `messages` = prompt + completion (other columns kept)."""

    def join(batch: dict[str, list]) -> dict[str, list]:
        batch = dict(batch)
        prompts, completions = batch.pop("prompt"), batch.pop("completion")
        return {"messages": [p + c for p, c in zip(prompts, completions, strict=True)], **batch}

    return dataset.map(join, batched=True, remove_columns=["prompt", "completion"], keep_in_memory=True)
