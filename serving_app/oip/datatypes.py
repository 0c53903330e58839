"""The protocol's datatypes and how they meet numpy dtypes and MLflow column types; flat row-major
values and their nesting."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
from mlflow.types.schema import AnyType, Array, DataType

DATATYPES: dict[str, np.dtype[Any]] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype(np.uint8),
    "UINT16": np.dtype(np.uint16),
    "UINT32": np.dtype(np.uint32),
    "UINT64": np.dtype(np.uint64),
    "INT8": np.dtype(np.int8),
    "INT16": np.dtype(np.int16),
    "INT32": np.dtype(np.int32),
    "INT64": np.dtype(np.int64),
    "FP16": np.dtype(np.float16),
    "FP32": np.dtype(np.float32),
    "FP64": np.dtype(np.float64),
    "BYTES": np.dtype(np.object_),
}


# The datatype a signature column type is published as (metadata) and expected in (requests).
COLUMN_DATATYPES: dict[DataType, str] = {
    DataType.boolean: "BOOL",
    DataType.integer: "INT32",
    DataType.long: "INT64",
    DataType.float: "FP32",
    DataType.double: "FP64",
    DataType.string: "BYTES",
    DataType.binary: "BYTES",
    DataType.datetime: "BYTES",  # ISO 8601 text, as the scoring protocol carries it
}


_END = object()  # what `next` gives for an exhausted level


def flatten(data: Any) -> list[Any]:
    """Row-major values of nested lists (the protocol allows nested or flat data)."""
    if not isinstance(data, list):
        return [data]
    flat: list[Any] = []
    stack: list[Iterator[Any]] = [iter(data)]
    while stack:
        item = next(stack[-1], _END)
        if item is _END:
            stack.pop()
        elif isinstance(item, list):
            stack.append(iter(item))
        else:
            flat.append(item)
    return flat


def json_value_fits(value: Any, datatype: str) -> bool:
    if datatype == "BYTES":
        return isinstance(value, str)
    if datatype == "BOOL":
        return isinstance(value, bool)
    if datatype.startswith("FP"):
        return is_number(value)
    return isinstance(value, int) and not isinstance(value, bool)


def values_problem(values: list[Any], datatype: str) -> str | None:
    """Why JSON values cannot be `datatype` (the first offending value), or None."""
    for value in values:
        if not json_value_fits(value, datatype):
            return f"{datatype} data cannot hold {value!r}"
    if datatype.startswith(("INT", "UINT")):
        limits = np.iinfo(DATATYPES[datatype])
        if values and not limits.min <= min(values) <= max(values) <= limits.max:
            return f"{datatype} values must lie in [{limits.min}, {limits.max}]"
    return None


def is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def fits_dtype(datatype: str, dtype: np.dtype[Any]) -> bool:
    """Whether `datatype` values convert to `dtype` without loss (numpy's safe casting; text to text)."""
    if datatype == "BYTES" or dtype.kind in "OUS":
        return datatype == "BYTES" and dtype.kind in "OUS"
    return bool(np.can_cast(DATATYPES[datatype], dtype, casting="safe"))


def column_form(column_type: Any) -> tuple[int, Any]:
    """How a column travels as a tensor: (array depth, scalar type) for scalars and Arrays of
    scalars, (0, the type) for objects, maps and Arrays of them (one JSON text per row)."""
    depth, leaf = 0, column_type
    while isinstance(leaf, Array):
        depth, leaf = depth + 1, leaf.dtype
    return (depth, leaf) if isinstance(leaf, DataType | AnyType) else (0, column_type)


def column_datatype(leaf: Any) -> str:
    """The datatype a column type is published as; AnyType and objects travel as BYTES (JSON text)."""
    return COLUMN_DATATYPES.get(leaf, "BYTES") if isinstance(leaf, DataType) else "BYTES"


def numpy_datatype(dtype: np.dtype[Any]) -> str:
    if dtype.kind in "OUS":
        return "BYTES"
    for name, candidate in DATATYPES.items():
        if candidate == dtype:
            return name
    return "BYTES"


def nest(values: list[Any], shape: Sequence[int]) -> Any:
    """Flat row-major values as nested lists of `shape` (a scalar for shape []); no dimension is 0."""
    if not shape:
        return values[0]
    nested: list[Any] = values
    for dim in reversed(shape[1:]):
        nested = [nested[start : start + dim] for start in range(0, len(nested), dim)]
    return nested
