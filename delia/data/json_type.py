"""datasets' `Json` type in Arrow: recognising it, and moving values in and out of it.

datasets (4.7 and later) stores a column, a struct field or list items whose values mix types as `Json`: pyarrow's
JSON extension type, one JSON text per value (`on_mixed_types="use_json"`, the default of its JSON loader and of
`Dataset.map`; TRL's tool-calling test datasets are stored so). A `messages` column may then be `Json()` (each row one
JSON text), `List(Json())` (one per message) or `List({"role": Value("string"), "content": Json(), ...})`. Rows read
through datasets arrive decoded, as SFTTrainer reads them; Arrow arrays hold the text, so code that works on Arrow
either recognises the layout or goes through Python with these functions.
"""

from __future__ import annotations

import json
from typing import Any

import pyarrow as pa


def is_json(data_type: pa.DataType) -> bool:
    """Whether `data_type` is the Json type itself (not a list or struct holding it)."""
    return isinstance(data_type, pa.JsonType)


def holds_json(data_type: pa.DataType) -> bool:
    """Whether `data_type` is the Json type or a list or struct with one somewhere inside."""
    if is_json(data_type):
        return True
    if pa.types.is_struct(data_type):
        return any(holds_json(field.type) for field in data_type)
    if pa.types.is_list(data_type) or pa.types.is_large_list(data_type):
        return holds_json(data_type.value_type)
    return False


def _decode(value: Any, data_type: pa.DataType) -> Any:
    if value is None:
        return None
    if is_json(data_type):
        return json.loads(value)
    if pa.types.is_struct(data_type):
        return {field.name: _decode(value.get(field.name), field.type) for field in data_type}
    if pa.types.is_list(data_type) or pa.types.is_large_list(data_type):
        return [_decode(item, data_type.value_type) for item in value]
    return value


def to_python(array: pa.Array | pa.ChunkedArray) -> list[Any]:
    """The values of `array` as Python objects, Json text decoded (what datasets gives for the same rows)."""
    return [_decode(value, array.type) for value in array.to_pylist()]


def _encode(value: Any, data_type: pa.DataType) -> Any:
    if value is None:
        return None
    if is_json(data_type):
        return json.dumps(value, ensure_ascii=False)
    if pa.types.is_struct(data_type):
        if not isinstance(value, dict):
            raise TypeError(f"expected an object for {data_type}, got {type(value).__name__}")
        return {field.name: _encode(value.get(field.name), field.type) for field in data_type}
    if pa.types.is_list(data_type) or pa.types.is_large_list(data_type):
        if not isinstance(value, list):
            raise TypeError(f"expected a list for {data_type}, got {type(value).__name__}")
        return [_encode(item, data_type.value_type) for item in value]
    return value


def _storage(data_type: pa.DataType) -> pa.DataType:
    """`data_type` with every Json part replaced by the strings it is stored as (pa.array cannot build it nested)."""
    if is_json(data_type):
        return data_type.storage_type
    if pa.types.is_struct(data_type):
        return pa.struct([pa.field(field.name, _storage(field.type), field.nullable) for field in data_type])
    if pa.types.is_large_list(data_type):
        return pa.large_list(_storage(data_type.value_type))
    if pa.types.is_list(data_type):
        return pa.list_(_storage(data_type.value_type))
    return data_type


def from_python(values: list[Any], data_type: pa.DataType) -> pa.Array:
    """Python values as an Arrow array of `data_type`: Json parts JSON-encoded, struct fields a value lacks null and
    fields it has beyond the type dropped; a value of another type raises (TypeError or pyarrow's ArrowException)."""
    encoded = [_encode(value, data_type) for value in values]
    return pa.array(encoded, type=_storage(data_type)).cast(data_type)
