"""MLflow signature → request/response types, built once per default version.

Records are `TypedDict`s rather than `BaseModel`s: validation hands back plain dicts keyed by the
signature's own column names (no per-request model instances to dump), and any column name works
as a key — leading underscores, `model_config`, `schema`, spaces — with no aliasing needed.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Annotated, Any, NotRequired, Required

import numpy as np
from annotated_types import Len
from mlflow.models.signature import ModelSignature
from mlflow.types.schema import AnyType, Array, DataType, Map, Object, ParamSchema, Schema
from pydantic import ConfigDict, TypeAdapter
from typing_extensions import TypedDict

from serving_app.fastparse import FastPlan, plan_for

_COLUMN_TYPES: dict[DataType, Any] = {
    DataType.boolean: bool,
    DataType.integer: int,
    DataType.long: int,
    DataType.float: float,
    DataType.double: float,
    DataType.string: str,
    # JSON carries binary as base64 text, as MLflow's scoring server expects.
    DataType.binary: str,
    # DataType.to_python() maps datetime to date, which loses the time of day.
    DataType.datetime: dt.datetime,
}


@dataclass(frozen=True)
class InputShape:
    """How a request record maps onto the model's input."""

    kind: str  # "columns" | "unnamed_columns" | "tensor" | "named_tensors" | "free"
    names: tuple[str, ...] = ()  # column or tensor names, in signature order
    # numpy dtype per tensor; per column, the narrow ones JSON values do not give ("" for the others)
    dtypes: tuple[str, ...] = ()
    record_is_list: bool = False  # a single record is itself a JSON list (tensor rows, unnamed columns)
    record_depth: int = 0  # list nesting of one record, to tell one record from a list of them


@dataclass(frozen=True)
class ApiSchema:
    """Everything the routes need to validate requests for one default version."""

    record_type: Any
    request_type: Any  # one record or a list of records
    request_adapter: TypeAdapter[Any]
    response_item_type: Any
    params_type: Any | None
    params_adapter: TypeAdapter[Any] | None
    params_defaults: dict[str, Any]
    input_shape: InputShape
    fast_plan: FastPlan | None = None  # `/invocations` bodies parsed without MLflow's parser

    def request_json_schema(self) -> dict[str, Any]:
        return self.request_adapter.json_schema(ref_template="#/components/schemas/{model}")

    def response_json_schema(self) -> dict[str, Any]:
        return TypeAdapter(list[self.response_item_type]).json_schema(  # type: ignore[name-defined]
            ref_template="#/components/schemas/{model}"
        )


def build_api_schema(signature: ModelSignature | None, *, title: str = "Model") -> ApiSchema:
    """Types for `/serve` requests and answers derived from `signature` (None: free-form JSON)."""
    inputs = signature.inputs if signature else None
    record_type, shape = _record_type(inputs, title=f"{title}Input")
    request_type = record_type | list[record_type]  # type: ignore[valid-type]
    response_item_type = _response_item_type(signature.outputs if signature else None, title=f"{title}Output")
    params_type, defaults = _params_type(signature.params if signature else None, title=f"{title}Params")
    return ApiSchema(
        record_type=record_type,
        request_type=request_type,
        request_adapter=TypeAdapter(request_type),
        response_item_type=response_item_type,
        params_type=params_type,
        params_adapter=TypeAdapter(params_type) if params_type is not None else None,
        params_defaults=defaults,
        input_shape=shape,
        fast_plan=plan_for(signature),
    )


# --------------------------------------------------------------------------------------------- inputs


def _record_type(schema: Schema | None, *, title: str) -> tuple[Any, InputShape]:
    if schema is None:
        return dict[str, Any], InputShape(kind="free")
    if schema.is_tensor_spec():
        return _tensor_record_type(schema.inputs, title=title)
    specs = schema.inputs
    if not all(spec.name for spec in specs):
        item_types = tuple(_value_type(spec.type, title=f"{title}Item") for spec in specs)
        return tuple[item_types], InputShape(kind="unnamed_columns", record_is_list=True, record_depth=1)  # type: ignore[valid-type]
    fields = {
        spec.name: _field(_value_type(spec.type, title=f"{title}_{spec.name}"), required=spec.required)
        for spec in specs
    }
    record = _typed_dict(title, fields)
    return record, InputShape(
        kind="columns",
        names=tuple(str(spec.name) for spec in specs),
        dtypes=tuple(
            _NARROW_COLUMNS.get(spec.type, "") if isinstance(spec.type, DataType) else "" for spec in specs
        ),
    )


# JSON numbers arrive as int64 and float64 columns, which MLflow's enforcement refuses to narrow (its
# own parser casts them to the signature's type first, as `records_to_model_input` does with these).
_NARROW_COLUMNS = {DataType.float: "float32", DataType.integer: "int32"}


def _tensor_record_type(specs: list[Any], *, title: str) -> tuple[Any, InputShape]:
    dtypes = tuple(spec.type.str for spec in specs)
    if len(specs) == 1 and not specs[0].name:
        item = _tensor_row_type(specs[0])
        depth = len(specs[0].shape) - 1
        return item, InputShape(kind="tensor", dtypes=dtypes, record_is_list=depth > 0, record_depth=depth)
    fields = {spec.name: _field(_tensor_row_type(spec), required=True) for spec in specs}
    return _typed_dict(title, fields), InputShape(
        kind="named_tensors", names=tuple(spec.name for spec in specs), dtypes=dtypes
    )


def _tensor_row_type(spec: Any) -> Any:
    """One row of a tensor whose first dimension is the batch: nested lists with fixed lengths checked."""
    leaf = _dtype_python_type(spec.type)
    row_shape = spec.shape[1:] if spec.shape and spec.shape[0] == -1 else spec.shape
    item: Any = leaf
    for dim in reversed(row_shape):
        item = Annotated[list[item], Len(dim, dim)] if dim != -1 else list[item]
    return item


def _dtype_python_type(dtype: np.dtype[Any]) -> Any:
    kind = dtype.kind
    if kind == "b":
        return bool
    if kind in "iu":
        return int
    if kind == "f":
        return float
    if kind in "US":
        return str
    if kind == "M":
        return dt.datetime
    return Any


def _value_type(value_type: Any, *, title: str) -> Any:
    if isinstance(value_type, DataType):
        return _COLUMN_TYPES[value_type]
    if isinstance(value_type, Array):
        return list[_value_type(value_type.dtype, title=f"{title}Item")]  # type: ignore[misc]
    if isinstance(value_type, Map):
        return dict[str, _value_type(value_type.value_type, title=f"{title}Value")]  # type: ignore[misc]
    if isinstance(value_type, Object):
        fields = {
            prop.name: _field(_value_type(prop.dtype, title=f"{title}_{prop.name}"), required=prop.required)
            for prop in value_type.properties
        }
        return _typed_dict(title, fields)
    if isinstance(value_type, AnyType):
        return Any
    raise TypeError(f"unsupported signature type {value_type!r}")


def _field(python_type: Any, *, required: bool) -> Any:
    return Required[python_type] if required else NotRequired[python_type | None]


def _typed_dict(title: str, fields: dict[Any, Any]) -> Any:
    # Extra keys are ignored, as MLflow's own schema enforcement does.
    record = TypedDict(_identifier(title), fields)  # type: ignore[misc]
    setattr(record, "__pydantic_config__", ConfigDict(extra="ignore", title=title))  # noqa: B010
    return record


def _identifier(text: str) -> str:
    cleaned = "".join(char if char.isalnum() else "_" for char in text)
    return cleaned if cleaned and not cleaned[0].isdigit() else f"T_{cleaned}"


# -------------------------------------------------------------------------------------------- outputs


def _response_item_type(schema: Schema | None, *, title: str) -> Any:
    if schema is None:
        return Any
    if schema.is_tensor_spec():
        if len(schema.inputs) == 1 and not schema.inputs[0].name:
            return _tensor_row_type(schema.inputs[0])
        fields = {spec.name: _field(_tensor_row_type(spec), required=True) for spec in schema.inputs}
        return _typed_dict(title, fields)
    specs = schema.inputs
    if len(specs) == 1 and not specs[0].name:
        return _value_type(specs[0].type, title=title)
    if not all(spec.name for spec in specs):
        return list[Any]
    fields = {
        spec.name: _field(_value_type(spec.type, title=f"{title}_{spec.name}"), required=spec.required)
        for spec in specs
    }
    return _typed_dict(title, fields)


# --------------------------------------------------------------------------------------------- params


def _params_type(schema: ParamSchema | None, *, title: str) -> tuple[Any | None, dict[str, Any]]:
    if schema is None or not schema.params:
        return None, {}
    fields: dict[str, Any] = {}
    defaults: dict[str, Any] = {}
    for spec in schema.params:
        python_type: Any = _COLUMN_TYPES[spec.dtype] if isinstance(spec.dtype, DataType) else dict[str, Any]
        if spec.shape is not None:
            python_type = list[python_type]
        fields[spec.name] = NotRequired[python_type]
        defaults[spec.name] = spec.default
    return _typed_dict(title, fields), defaults
