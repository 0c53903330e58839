"""Payload records as an Arrow table: one row per input row, the request's fields repeated, the inputs
and outputs as the signature's columns with the signature's types (so every file of a version has
the same schema and a partitioned dataset reads back with pandas, DuckDB or Spark as it is).
Inputs the signature does not describe as columns (tensors, no signature) go in as JSON text."""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from serving_app.monitoring.records import ColumnArrays, PayloadRecord, compact

_ARROW_TYPES: dict[str, pa.DataType] = {
    "boolean": pa.bool_(),
    "integer": pa.int32(),
    "long": pa.int64(),
    "float": pa.float32(),
    "double": pa.float64(),
    "string": pa.string(),
    "binary": pa.binary(),
    "datetime": pa.timestamp("us"),
}

REQUEST_FIELDS: tuple[tuple[str, pa.DataType], ...] = (
    ("request_id", pa.string()),
    ("time", pa.timestamp("ms", tz="UTC")),
    ("model", pa.string()),
    ("version", pa.string()),
    ("choice", pa.string()),
    ("route", pa.string()),
    ("status", pa.int32()),
    ("error_code", pa.string()),
    ("latency_ms", pa.float64()),
    ("row", pa.int32()),  # the row's place in its request; null when the request had no rows
    ("truncated", pa.bool_()),
)


@dataclass(frozen=True)
class Columns:
    """A version's input and output columns with their Arrow types (empty: not column-shaped)."""

    inputs: tuple[tuple[str, pa.DataType], ...]
    outputs: tuple[tuple[str, pa.DataType], ...]


def signature_columns(signature: Any) -> Columns:
    return Columns(
        _schema_columns(getattr(signature, "inputs", None)),
        _schema_columns(getattr(signature, "outputs", None)),
    )


def _schema_columns(schema: Any) -> tuple[tuple[str, pa.DataType], ...]:
    if schema is None or schema.is_tensor_spec() or not schema.has_input_names():
        return ()
    columns = []
    for name, mlflow_type in zip(schema.input_names(), schema.input_types(), strict=True):
        # Arrays, objects and maps have no flat column type: JSON text.
        arrow_type = _ARROW_TYPES.get(getattr(mlflow_type, "name", ""), pa.string())
        columns.append((str(name), arrow_type))
    return tuple(columns)


def arrow_schema(columns: Columns, *, inputs: bool, outputs: bool) -> pa.Schema:
    fields = [pa.field(name, kind) for name, kind in REQUEST_FIELDS]
    if inputs:
        fields += [pa.field(f"input_{name}", kind) for name, kind in columns.inputs]
        fields.append(pa.field("inputs_json", pa.string()))
    if outputs:
        fields += [pa.field(f"output_{name}", kind) for name, kind in columns.outputs]
        fields.append(pa.field("outputs_json", pa.string()))
    return pa.schema(fields)


def plain(value: Any) -> Any:
    """A value as JSON has it: numpy scalars and arrays, pandas frames and NaN made plain."""
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, np.ndarray):
        if value.dtype.kind in "biu" or (value.dtype.kind == "f" and np.isfinite(value).all()):
            return value.tolist()  # plain already: no item needs a look
        return [plain(item) for item in value.tolist()]
    if isinstance(value, dict):
        return {str(key): plain(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [plain(item) for item in value]
    if hasattr(value, "to_dict") and hasattr(value, "columns"):  # a DataFrame
        return plain(value.to_dict(orient="list"))
    if isinstance(value, ColumnArrays):
        return {name: plain(array) for name, array in value.arrays.items()}
    if isinstance(value, bytes | bytearray):
        return value.hex()
    return value


_JSON = json.JSONEncoder(default=str, separators=(",", ":"))  # holds settings only: safe to share


def _json(value: Any) -> str:
    return _JSON.encode(plain(value))


@dataclass(frozen=True)
class InputColumns:
    """A request's input as the signature's columns (by name, one value per row), or as JSON text when
    it has none."""

    values: dict[str, list[Any]]
    rows: int
    as_json: str | None = None

    def row(self, index: int) -> dict[str, Any]:
        return {name: column[index] for name, column in self.values.items()}


def _input_columns(record: PayloadRecord, columns: Columns) -> InputColumns:
    frame = record.model_input
    if frame is None:
        return InputColumns({}, 0)
    if columns.inputs and isinstance(frame, ColumnArrays):
        names = [name for name, _ in columns.inputs if name in frame.arrays]
        return InputColumns({name: frame.arrays[name].tolist() for name in names}, frame.rows)
    if columns.inputs and hasattr(frame, "columns"):
        names = [name for name, _ in columns.inputs if name in frame.columns]
        return InputColumns({name: plain(frame[name].tolist()) for name in names}, len(frame))
    return InputColumns({}, 0, _json(frame))


def _output_fields(answer: Any, columns: Columns) -> tuple[dict[str, Any], str | None]:
    if columns.outputs:
        if isinstance(answer, dict) and all(name in answer for name, _ in columns.outputs):
            return {name: plain(answer[name]) for name, _ in columns.outputs}, None
        if len(columns.outputs) == 1 and not isinstance(answer, dict | list):
            return {columns.outputs[0][0]: plain(answer)}, None
    return {}, _json(answer)


def _rows_of(
    record: PayloadRecord, columns: Columns, inputs: InputColumns, max_bytes: int
) -> Iterable[dict[str, Any]]:
    request = dict(zip(_REQUEST_NAMES, _request_values(record), strict=True))
    inputs_json = inputs.as_json
    outputs = record.outputs or []
    count = max(inputs.rows, len(outputs), 1)
    # Sized row by row only when the whole record may not fit (most are far below the bound).
    budget = max_bytes if _may_exceed(record, inputs_json, max_bytes) else None
    truncated = len(inputs_json or "") > max_bytes
    if truncated:
        inputs_json = None
    rows: list[dict[str, Any]] = []
    for index in range(count):
        row: dict[str, Any] = {**request, "row": index if (inputs.rows or outputs) else None}
        if index < inputs.rows:
            row.update({f"input_{name}": value for name, value in inputs.row(index).items()})
        if index == 0:
            row["inputs_json"] = inputs_json
        if index < len(outputs):
            fields, as_json = _output_fields(outputs[index], columns)
            row.update({f"output_{name}": value for name, value in fields.items()})
            row["outputs_json"] = as_json
        if budget is not None:
            budget -= _size(row)
        if budget is not None and budget < 0:
            truncated = True
            if not rows:  # not even one row fits: the request's fields alone
                rows.append({k: v for k, v in row.items() if not k.startswith(("input", "output"))})
            break
        rows.append(row)
    for row in rows:
        row["truncated"] = truncated
    return rows


_NUMBERS = (int, float, np.number, np.bool_)


def _may_exceed(record: PayloadRecord, inputs_json: str | None, max_bytes: int) -> bool:
    """An upper bound of the record's size against `max_bytes`, cheaply: numbers as 24 characters."""
    size = len(inputs_json or "")
    frame = compact(record.model_input)
    if isinstance(frame, ColumnArrays):
        for array in frame.arrays.values():
            if array.dtype.kind in "biuf":
                size += 24 * array.size
            else:
                size += sum(len(str(value)) + 8 for value in array.tolist())
    outputs = record.outputs or []
    if all(isinstance(value, _NUMBERS) for value in outputs):
        size += 24 * len(outputs)
    else:
        size += len(_json(outputs))
    return size > max_bytes


def _size(row: dict[str, Any]) -> int:
    """What a row's inputs and outputs take: text by its length, anything else as JSON."""
    values = [v for k, v in row.items() if k.startswith(("input", "output")) and v is not None]
    return sum(len(v) if isinstance(v, str) else len(_json(v)) for v in values)


def _column(values: list[Any], kind: pa.DataType) -> pa.Array:
    """`values` as an Arrow column of `kind`. Text columns take anything else as JSON text (arrays and
    objects of a signature); a value that is not of the column's type becomes null, costing that value
    only (MLflow enforces no output types, and a pinned version's input is enforced later)."""
    if pa.types.is_string(kind):
        values = [v if v is None or isinstance(v, str) else _json(v) for v in values]
    elif pa.types.is_integer(kind):
        # Arrow would truncate 1.5 to 1: a number nobody sent. Not a whole number: null.
        values = [None if isinstance(v, float) and not v.is_integer() else v for v in values]
    try:
        return pa.array(values, type=kind, from_pandas=True)  # NaN as null, as `plain` has it
    except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError, TypeError, ValueError):
        return pa.array([_scalar(v, kind) for v in values], type=kind)


def _scalar(value: Any, kind: pa.DataType) -> Any:
    try:
        pa.array([value], type=kind)
    except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError, TypeError, ValueError):
        return None
    return value


def payload_table(
    records: Sequence[PayloadRecord], *, inputs: bool, outputs: bool, max_record_bytes: int
) -> pa.Table:
    """Records of one version (one signature) as one table; each record bounded by `max_record_bytes`
    of inputs and outputs (the rows past it left out and the record's rows marked truncated)."""
    columns = signature_columns(records[0].signature) if records else Columns((), ())
    schema = arrow_schema(columns, inputs=inputs, outputs=outputs)
    row_values: dict[str, list[Any]] = {name: [] for name in schema.names if name not in _REQUEST_NAMES}
    requests = [_request_values(record) for record in records]
    counts = [_append_rows(row_values, record, columns, max_record_bytes) for record in records]
    by_request = dict(zip(_REQUEST_NAMES, zip(*requests, strict=True), strict=True)) if requests else {}
    # The request's fields once per request, then repeated for its rows by Arrow (not in Python).
    repeat = (
        None if all(count == 1 for count in counts) else pa.array(np.repeat(np.arange(len(counts)), counts))
    )
    arrays = []
    for field in schema:
        if field.name in _REQUEST_NAMES:
            array = _column(list(by_request.get(field.name, ())), field.type)
            arrays.append(array if repeat is None else array.take(repeat))
        else:
            arrays.append(_column(row_values[field.name], field.type))
    return pa.Table.from_arrays(arrays, schema=schema)


# The request's own fields: the same on each of its rows.
_REQUEST_NAMES = tuple(name for name, _ in REQUEST_FIELDS if name not in ("row", "truncated"))


def _request_values(record: PayloadRecord) -> tuple[Any, ...]:
    """The request's own fields, in `_REQUEST_NAMES`' order."""
    return (
        record.request_id,
        int(record.at * 1000),
        record.model,
        record.version,
        record.choice,
        record.route,
        record.status,
        record.error_code,
        record.latency_ms,
    )


def _append_rows(
    values: dict[str, list[Any]], record: PayloadRecord, columns: Columns, max_bytes: int
) -> int:
    """The record's rows added to the row columns (`row`, `truncated`, inputs, outputs); how many. A
    record that may not fit its budget is sized row by row (`_rows_of`); the rest, nearly all, go in
    whole."""
    inputs = _input_columns(record, columns)
    if _may_exceed(record, inputs.as_json, max_bytes):
        rows = list(_rows_of(record, columns, inputs, max_bytes))
        for row in rows:
            for name, column in values.items():
                column.append(row.get(name))
        return len(rows)
    outputs = record.outputs or []
    count = max(inputs.rows, len(outputs), 1)
    values["truncated"].extend([False] * count)
    values["row"].extend(range(count) if (inputs.rows or outputs) else [None])
    if "inputs_json" in values:
        values["inputs_json"].extend([inputs.as_json, *[None] * (count - 1)])
        for name, _ in columns.inputs:
            given = inputs.values.get(name, [])
            values[f"input_{name}"].extend(given + [None] * (count - len(given)))
    if "outputs_json" in values:
        answered = [_output_fields(answer, columns) for answer in outputs] + [({}, None)] * (
            count - len(outputs)
        )
        values["outputs_json"].extend([as_json for _, as_json in answered])
        for name, _ in columns.outputs:
            values[f"output_{name}"].extend([fields.get(name) for fields, _ in answered])
    return count
