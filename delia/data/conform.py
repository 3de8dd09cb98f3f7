"""Conforming a diverse cache to the downstream rows' Arrow schema, so the two can be concatenated.

Columns the cache lacks become empty, columns only it has are dropped, struct fields are matched by name, and every
column of the user's rows survives mixing. A column stored as datasets' `Json` type on one side and as plain Arrow
on the other (see `json_type`) is rewritten through Python: decoded, then encoded in the downstream type.
"""

from __future__ import annotations

import json
import warnings

import pyarrow as pa
import pyarrow.compute as pc
from datasets import Dataset, Features

from .errors import DataFormatError
from .json_type import from_python, is_json, to_python


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
    if is_json(array.type) or is_json(target):
        return from_python(to_python(array), target)
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
    if is_json(target):  # any value is JSON text
        return True
    if is_json(source):  # decided per value: a value of another type is an error naming the column
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


def _conform_column(table: pa.Table, field: pa.Field) -> pa.Array:
    try:
        return conform_array(table.column(field.name).combine_chunks(), field.type)
    except (pa.ArrowException, TypeError, json.JSONDecodeError) as error:  # only Json values get here (see _castable)
        raise DataFormatError(
            f"column {field.name!r}: a diverse row's value (stored as Json) does not fit the downstream rows' type "
            f"{field.type} ({error})"
        ) from None


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
                columns[field.name] = _conform_column(table, field)
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
