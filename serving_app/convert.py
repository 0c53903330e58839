"""Validated request records → model input, and model predictions → one JSON item per record."""

from __future__ import annotations

import base64
import datetime as dt
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from serving_app.schema import InputShape


def normalise_records(payload: Any, shape: InputShape) -> list[Any]:
    """A validated `/serve` body (one record or a list of them) as a list of records."""
    if shape.record_is_list:
        # A record is itself a list: nesting one deeper than a record means a list of records.
        return list(payload) if _depth(payload) > shape.record_depth else [payload]
    return list(payload) if isinstance(payload, list) else [payload]


def _depth(value: Any) -> int:
    depth = 0
    while isinstance(value, list | tuple) and value:
        depth, value = depth + 1, value[0]
    return depth


def records_to_model_input(records: Sequence[Any], shape: InputShape) -> Any:
    if shape.kind == "tensor":
        return np.asarray(records, dtype=np.dtype(shape.dtypes[0]))
    if shape.kind == "named_tensors":
        return {
            name: np.asarray([record[name] for record in records], dtype=np.dtype(dtype))
            for name, dtype in zip(shape.names, shape.dtypes, strict=True)
        }
    if shape.kind == "unnamed_columns":
        return pd.DataFrame([list(record) for record in records])
    if shape.kind == "columns" and _all_columns(records, shape.names):
        # Every record has exactly the signature's columns: one list per column, a quarter of
        # `from_records`' time, the same frame (tested).
        return pd.DataFrame(
            {
                name: _column([record[name] for record in records], dtype)
                for name, dtype in zip(shape.names, shape.dtypes, strict=True)
            }
        )
    frame = pd.DataFrame.from_records(list(records))
    if shape.kind == "columns":
        present = [name for name in shape.names if name in frame.columns]
        frame = frame[present]
    return frame


def _column(values: list[Any], dtype: str) -> Any:
    """A column of the signature's narrow type (float32, int32) where JSON gave it a wider one."""
    if not dtype or any(value is None for value in values):
        return values  # an optional column's gaps: left to MLflow's enforcement, as before
    return np.asarray(values, dtype=dtype)


def _all_columns(records: Sequence[Any], names: tuple[str, ...]) -> bool:
    expected = set(names)
    return all(isinstance(record, dict) and record.keys() == expected for record in records)


def concat_model_inputs(inputs: Sequence[Any]) -> Any:
    """Join several requests' inputs into one batch (same kind, in order)."""
    first = inputs[0]
    if len(inputs) == 1:
        return first
    if isinstance(first, pd.DataFrame):
        return pd.concat(inputs, ignore_index=True)
    if isinstance(first, np.ndarray):
        return np.concatenate(inputs, axis=0)
    if isinstance(first, dict):
        return {key: np.concatenate([part[key] for part in inputs], axis=0) for key in first}
    raise TypeError(f"cannot batch inputs of type {type(first).__name__}")


def prediction_items(prediction: Any) -> list[Any]:
    """A prediction as one JSON-ready item per input row."""
    if isinstance(prediction, pd.DataFrame):
        if list(prediction.columns) == [0] or prediction.columns.dtype.kind in "iu":
            return [jsonable(row) for row in prediction.to_numpy().tolist()]
        return [
            {str(key): jsonable(value) for key, value in row.items()}
            for row in prediction.to_dict(orient="records")
        ]
    if isinstance(prediction, pd.Series):
        return [jsonable(value) for value in prediction.tolist()]
    if isinstance(prediction, np.ndarray):
        return [jsonable(value) for value in prediction.tolist()]
    if isinstance(prediction, dict):
        columns = {key: prediction_items(value) for key, value in prediction.items()}
        lengths = {len(values) for values in columns.values()}
        if len(lengths) == 1:
            count = lengths.pop()
            return [{key: values[index] for key, values in columns.items()} for index in range(count)]
        return [jsonable(prediction)]
    if isinstance(prediction, list | tuple):
        return [jsonable(item) for item in prediction]
    return [jsonable(prediction)]


def split_items(items: list[Any], counts: Sequence[int]) -> list[list[Any]]:
    if len(items) != sum(counts):
        raise ValueError(f"model returned {len(items)} rows for {sum(counts)} input rows")
    parts, start = [], 0
    for count in counts:
        parts.append(items[start : start + count])
        start += count
    return parts


def jsonable(value: Any) -> Any:
    """Plain JSON types for values numpy, pandas and pipelines hand back."""
    if isinstance(value, dict):
        return {str(key): jsonable(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(item) for item in value]
    if isinstance(value, np.ndarray):
        return jsonable(value.tolist())
    if isinstance(value, np.generic):
        return jsonable(value.item())
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, pd.Timestamp | dt.datetime | dt.date):
        return value.isoformat()
    if isinstance(value, bytes):
        return base64.b64encode(value).decode("ascii")
    if value is pd.NaT:
        return None
    return value
