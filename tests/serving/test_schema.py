"""Signature → request/answer types, table-driven over every kind of MLflow signature."""

from __future__ import annotations

import datetime as dt
import json
from typing import Any

import numpy as np
import pandas as pd
import pytest
from mlflow.models.signature import ModelSignature
from mlflow.types.schema import (
    AnyType,
    Array,
    ColSpec,
    DataType,
    Map,
    Object,
    ParamSchema,
    ParamSpec,
    Property,
    Schema,
    TensorSpec,
)
from pydantic import ValidationError

from serving_app.convert import normalise_records, prediction_items, records_to_model_input, split_items
from serving_app.schema import build_api_schema

AWKWARD = [
    ColSpec(DataType.string, "_private"),
    ColSpec(DataType.long, "model_config"),
    ColSpec(DataType.double, "schema"),
    ColSpec(DataType.boolean, "with space"),
    ColSpec(DataType.datetime, "at", required=False),
]
ALL_TYPES = Schema(
    [
        ColSpec(DataType.integer, "i"),
        ColSpec(DataType.long, "l"),
        ColSpec(DataType.float, "f"),
        ColSpec(DataType.double, "d"),
        ColSpec(DataType.boolean, "b"),
        ColSpec(DataType.string, "s"),
        ColSpec(DataType.binary, "bin"),
        ColSpec(DataType.datetime, "ts"),
        ColSpec(Array(DataType.long), "arr"),
        ColSpec(Map(DataType.double), "map"),
        ColSpec(
            Object([Property("x", DataType.long), Property("y", DataType.string, required=False)]), "obj"
        ),
        ColSpec(AnyType(), "anything"),
        ColSpec(DataType.string, "opt", required=False),
    ]
)
GOOD_ALL_TYPES = {
    "i": 1,
    "l": 2,
    "f": 1.5,
    "d": 2.5,
    "b": True,
    "s": "text",
    "bin": "aGVsbG8=",
    "ts": "2026-11-21T10:30:00",
    "arr": [1, 2],
    "map": {"a": 1.0},
    "obj": {"x": 3},
    "anything": {"free": ["form"]},
}
TENSOR = Schema([TensorSpec(np.dtype("float64"), (-1, 2, 3))])
NAMED_TENSORS = Schema(
    [TensorSpec(np.dtype("int64"), (-1, 2), "ids"), TensorSpec(np.dtype("float32"), (-1,), "w")]
)

VALID = [
    # (id, inputs schema, body)
    ("all column types, one record", ALL_TYPES, GOOD_ALL_TYPES),
    ("all column types, a list", ALL_TYPES, [GOOD_ALL_TYPES, {**GOOD_ALL_TYPES, "opt": None}]),
    (
        "awkward column names",
        Schema(AWKWARD),
        {"_private": "a", "model_config": 1, "schema": 2.0, "with space": False},
    ),
    ("tensor row", TENSOR, [[1, 2, 3], [4, 5, 6]]),
    ("tensor rows", TENSOR, [[[1, 2, 3], [4, 5, 6]], [[1, 2, 3], [4, 5, 6]]]),
    ("named tensors", NAMED_TENSORS, {"ids": [1, 2], "w": 0.5}),
    ("extra keys ignored", Schema([ColSpec(DataType.string, "prompt")]), {"prompt": "hi", "other": 1}),
]

INVALID = [
    # (id, inputs schema, body, location of the error)
    ("missing required", ALL_TYPES, {k: v for k, v in GOOD_ALL_TYPES.items() if k != "l"}, "l"),
    ("wrong scalar type", ALL_TYPES, {**GOOD_ALL_TYPES, "i": "one"}, "i"),
    ("bad timestamp", ALL_TYPES, {**GOOD_ALL_TYPES, "ts": "yesterday"}, "ts"),
    ("array item type", ALL_TYPES, {**GOOD_ALL_TYPES, "arr": ["x"]}, "arr"),
    ("object property missing", ALL_TYPES, {**GOOD_ALL_TYPES, "obj": {"y": "no x"}}, "obj"),
    ("tensor row too short", TENSOR, [[1, 2, 3], [4, 5]], None),
    ("tensor rank wrong", TENSOR, [1, 2, 3], None),
    ("named tensor shape", NAMED_TENSORS, {"ids": [1, 2, 3], "w": 0.5}, "ids"),
]


@pytest.mark.parametrize(("schema", "body"), [c[1:] for c in VALID], ids=[c[0] for c in VALID])
def test_valid_bodies_validate_and_convert(schema: Schema, body: Any) -> None:
    api = build_api_schema(ModelSignature(inputs=schema))
    payload = api.request_adapter.validate_json(json.dumps(body))
    records = normalise_records(payload, api.input_shape)
    model_input = records_to_model_input(records, api.input_shape)
    expected_rows = len(body) if isinstance(body, list) and api.input_shape.kind != "tensor" else None
    if api.input_shape.kind == "tensor":
        assert isinstance(model_input, np.ndarray) and model_input.shape[1:] == (2, 3)
    elif api.input_shape.kind == "named_tensors":
        assert model_input["ids"].shape == (1, 2) and model_input["w"].dtype == np.float32
    else:
        assert isinstance(model_input, pd.DataFrame)
        assert len(model_input) == (expected_rows or 1)


@pytest.mark.parametrize(("schema", "body", "field"), [c[1:] for c in INVALID], ids=[c[0] for c in INVALID])
def test_invalid_bodies_name_the_field(schema: Schema, body: Any, field: str | None) -> None:
    api = build_api_schema(ModelSignature(inputs=schema))
    with pytest.raises(ValidationError) as caught:
        api.request_adapter.validate_json(json.dumps(body))
    if field is not None:
        assert any(field in error["loc"] for error in caught.value.errors())


def test_datetime_is_a_datetime_not_a_date() -> None:
    api = build_api_schema(ModelSignature(inputs=ALL_TYPES))
    payload = api.request_adapter.validate_json(json.dumps(GOOD_ALL_TYPES))
    assert payload["ts"] == dt.datetime(2026, 11, 21, 10, 30)


def test_awkward_names_appear_verbatim_in_json_schema() -> None:
    api = build_api_schema(ModelSignature(inputs=Schema(AWKWARD)))
    document = json.dumps(api.request_json_schema())
    for name in ("_private", "model_config", "schema", "with space"):
        assert f'"{name}"' in document
    required = next(iter(api.request_json_schema()["$defs"].values()))["required"]
    assert "at" not in required


def test_unnamed_tensor_output_and_params() -> None:
    signature = ModelSignature(
        inputs=Schema([ColSpec(DataType.double, "x")]),
        outputs=Schema([TensorSpec(np.dtype("int64"), (-1,))]),
        params=ParamSchema(
            [ParamSpec("threshold", DataType.double, 0.5), ParamSpec("tags", DataType.string, ["a"], (-1,))]
        ),
    )
    api = build_api_schema(signature)
    assert api.response_json_schema() == {"items": {"type": "integer"}, "type": "array"}
    assert api.params_defaults == {"threshold": 0.5, "tags": ["a"]}
    assert api.params_adapter is not None
    assert api.params_adapter.validate_python({"threshold": "0.9"}) == {"threshold": 0.9}


def test_no_signature_means_free_form() -> None:
    api = build_api_schema(None)
    assert api.request_adapter.validate_json('{"anything": [1, 2]}') == {"anything": [1, 2]}


PREDICTIONS = [
    ("list of dicts", [{"a": 1}, {"a": 2}], [{"a": 1}, {"a": 2}]),
    ("ndarray", np.array([1, 2]), [1, 2]),
    ("2d ndarray", np.array([[1.0, 2.0], [3.0, 4.0]]), [[1.0, 2.0], [3.0, 4.0]]),
    ("series", pd.Series(["x", "y"]), ["x", "y"]),
    ("dataframe", pd.DataFrame({"a": [1, 2], "b": ["x", "y"]}), [{"a": 1, "b": "x"}, {"a": 2, "b": "y"}]),
    ("dict of columns", {"a": np.array([1, 2]), "b": ["x", "y"]}, [{"a": 1, "b": "x"}, {"a": 2, "b": "y"}]),
    ("nan becomes null", np.array([np.nan, 1.0]), [None, 1.0]),
]


@pytest.mark.parametrize(
    ("prediction", "expected"), [c[1:] for c in PREDICTIONS], ids=[c[0] for c in PREDICTIONS]
)
def test_prediction_items(prediction: Any, expected: list[Any]) -> None:
    items = prediction_items(prediction)
    assert items == expected
    json.dumps(items, allow_nan=False)


def test_split_items_checks_row_count() -> None:
    assert split_items([1, 2, 3], [2, 1]) == [[1, 2], [3]]
    with pytest.raises(ValueError, match="3 rows for 4"):
        split_items([1, 2, 3], [2, 2])
