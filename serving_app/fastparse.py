"""The common scoring-protocol bodies parsed without MLflow's general parser.

MLflow's scoring parser builds a pandas DataFrame from every `dataframe_split` / `dataframe_records`
body, then casts it column by column against the signature (milliseconds per request); `inputs` and
`instances` go through its generic tensor casting. For the shapes clients send most, with values that
already have the signature's JSON types, the model input MLflow would hand the model can be built in
one step: an array of the tensor's dtype (no DataFrame at all for a tensor signature, whichever
format the body uses), or one DataFrame from typed columns for a column signature.

Everything here is pure and answers `None` when it does not know the body for certain (a missing,
extra or reordered column, a value of another JSON type, a shape off the signature, `params`, an
index, optional or non-scalar columns, ...): the caller then runs MLflow's parser, which coerces what
it accepts and refuses the rest with its own message. So every bad body takes MLflow's path, and
every body taken here gives what MLflow's parser and signature enforcement give (tested against them).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from mlflow.models.signature import ModelSignature
from mlflow.types.schema import ColSpec, DataType, TensorSpec

# The scoring protocol's input keys that this module reads; anything else falls back.
_FORMATS = frozenset({"dataframe_split", "dataframe_records", "inputs", "instances"})

# Column type → (numpy dtype, the JSON value types accepted as they are). bool is not an int here,
# and int is a double only because MLflow's enforcement widens it exactly (tested).
_COLUMNS: dict[DataType, tuple[Any, tuple[type, ...]]] = {
    DataType.double: (np.float64, (float, int)),
    DataType.float: (np.float32, (float, int)),
    DataType.long: (np.int64, (int,)),
    DataType.integer: (np.int32, (int,)),
    DataType.boolean: (np.bool_, (bool,)),
    DataType.string: (None, (str,)),  # pandas' own string dtype, as MLflow's parser leaves it
}


@dataclass(frozen=True)
class TensorPlan:
    """One unnamed tensor: its dtype, the JSON leaf types it takes, and its shape (-1 = any)."""

    dtype: np.dtype[Any]
    leaf_types: tuple[type, ...]
    shape: tuple[int, ...]


@dataclass(frozen=True)
class ColumnsPlan:
    """Required scalar columns in signature order."""

    names: tuple[str, ...]
    dtypes: tuple[Any, ...]
    leaf_types: tuple[tuple[type, ...], ...]


FastPlan = TensorPlan | ColumnsPlan


@dataclass(frozen=True)
class FastInput:
    data: Any  # what MLflow's parser + signature enforcement would hand the model
    rows: int


def plan_for(signature: ModelSignature | None) -> FastPlan | None:
    """The fast plan for a signature, or None when every body must go through MLflow's parser."""
    if signature is None or signature.inputs is None or signature.params is not None:
        return None
    if getattr(signature, "_is_signature_from_type_hint", False):
        return None  # MLflow does not parse those bodies at all
    specs = signature.inputs.inputs
    if signature.inputs.is_tensor_spec():
        return _tensor_plan(specs)
    return _columns_plan(specs)


def _tensor_plan(specs: Sequence[Any]) -> TensorPlan | None:
    if len(specs) != 1 or not isinstance(specs[0], TensorSpec) or specs[0].name:
        return None
    spec = specs[0]
    kind = spec.type.kind
    leaf_types: tuple[type, ...]
    if kind == "f":
        leaf_types = (float, int)
    elif kind in "iu":
        leaf_types = (int,)
    elif kind == "b":
        leaf_types = (bool,)
    else:
        return None
    shape = tuple(spec.shape)
    if not shape or any(dim == -1 for dim in shape[1:]):
        return None  # variable inner dimensions: leave ragged checks to MLflow
    return TensorPlan(np.dtype(spec.type), leaf_types, shape)


def _columns_plan(specs: Sequence[Any]) -> ColumnsPlan | None:
    names, dtypes, leaves = [], [], []
    for spec in specs:
        if not isinstance(spec, ColSpec) or not spec.name or not spec.required:
            return None
        if not isinstance(spec.type, DataType) or spec.type not in _COLUMNS:
            return None
        dtype, leaf_types = _COLUMNS[spec.type]
        names.append(spec.name)
        dtypes.append(dtype)
        leaves.append(leaf_types)
    if not names or len(set(names)) != len(names):
        return None
    return ColumnsPlan(tuple(names), tuple(dtypes), tuple(leaves))


# ------------------------------------------------------------------------------------------- parsing


def parse(payload: Any, plan: FastPlan) -> FastInput | None:
    """The model input for a decoded scoring-protocol body, or None to use MLflow's parser."""
    if not isinstance(payload, dict) or len(payload) != 1:
        return None  # params, several formats, or not an object: MLflow's parser decides
    (key, value), *_ = payload.items()
    if key not in _FORMATS:
        return None
    try:
        if isinstance(plan, TensorPlan):
            return _tensor(key, value, plan)
        return _columns(key, value, plan)
    except (TypeError, ValueError, OverflowError):
        return None


def _tensor(key: str, value: Any, plan: TensorPlan) -> FastInput | None:
    if key in ("inputs", "instances"):
        rows = value
    elif key == "dataframe_split":
        if not isinstance(value, dict) or set(value) - {"columns", "data"} or "data" not in value:
            return None
        rows = value["data"]
        columns = value.get("columns")
        if len(plan.shape) != 2 or not _names_fit(columns, plan.shape[1]):
            return None
    else:
        return None  # records name their fields: the order MLflow's DataFrame gives them is its own
    if not isinstance(rows, list) or not rows or not _leaves_fit(rows, plan.shape, plan.leaf_types):
        return None
    return FastInput(np.array(rows, dtype=plan.dtype), len(rows))


def _names_fit(columns: Any, width: int) -> bool:
    if columns is None:
        return True
    return isinstance(columns, list) and len(columns) == width and len(set(map(str, columns))) == width


def _leaves_fit(value: Any, shape: tuple[int, ...], leaf_types: tuple[type, ...]) -> bool:
    """`value` is nested lists of exactly `shape` (-1: any length) whose leaves are of `leaf_types`."""
    if not shape:
        return type(value) in leaf_types
    if not isinstance(value, list) or (shape[0] != -1 and len(value) != shape[0]):
        return False
    inner = shape[1:]
    if not inner:
        return all(type(item) in leaf_types for item in value)
    return all(_leaves_fit(item, inner, leaf_types) for item in value)


def _columns(key: str, value: Any, plan: ColumnsPlan) -> FastInput | None:
    names = plan.names
    if key == "dataframe_split":
        if not isinstance(value, dict) or set(value) != {"columns", "data"}:
            return None
        if value["columns"] != list(names):
            return None
        rows = value["data"]
        width = len(names)
        if not isinstance(rows, list) or not all(isinstance(r, list) and len(r) == width for r in rows):
            return None
        columns = [[row[index] for row in rows] for index in range(width)]
    elif key in ("dataframe_records", "instances") or isinstance(value, list):  # records
        expected = set(names)
        if not isinstance(value, list) or not all(
            isinstance(r, dict) and r.keys() == expected for r in value
        ):
            return None
        columns = [[record[name] for record in value] for name in names]
    else:  # "inputs": columns by name
        if not isinstance(value, dict) or value.keys() != set(names):
            return None
        columns = [value[name] for name in names]
        if not all(isinstance(column, list) for column in columns):
            return None
        if len({len(column) for column in columns}) != 1:
            return None
    return _frame(columns, plan)


def _frame(columns: list[list[Any]], plan: ColumnsPlan) -> FastInput | None:
    rows = len(columns[0])
    if rows == 0:
        return None
    data: dict[str, Any] = {}
    for name, dtype, leaf_types, column in zip(
        plan.names, plan.dtypes, plan.leaf_types, columns, strict=True
    ):
        if not all(type(item) in leaf_types for item in column):
            return None
        data[name] = column if dtype is None else np.array(column, dtype=dtype)
    return FastInput(pd.DataFrame(data), rows)
