"""The fast scoring-protocol parser against MLflow's own: every body it takes gives what MLflow's parser
and signature enforcement give, and every body it does not know goes to MLflow's parser.

Table-driven over signatures and bodies (valid, coercible and bad ones), plus hypothesis over column and
tensor values. No server: MLflow's `scoring_server._parse_json_data` + `pyfunc._validate_prediction_input`
are the reference, as `mlflow models serve` runs them.
"""

from __future__ import annotations

import json
import types
import warnings
from typing import Any

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mlflow import pyfunc
from mlflow.exceptions import MlflowException
from mlflow.models.model import Model
from mlflow.models.signature import ModelSignature
from mlflow.pyfunc import scoring_server
from mlflow.types.schema import ColSpec, DataType, ParamSchema, ParamSpec, Schema, TensorSpec

from serving_app import fastparse
from serving_app.convert import concat_model_inputs
from serving_app.invocations import parse_invocation
from serving_app.registry import LoadedVersion
from serving_app.schema import build_api_schema

ROW = [0.5, -1.25, 3.0, 2]
COLUMNS = ["a", "f", "n", "i", "t", "s"]
MIXED = [1.5, 2.25, 3, 4, True, "x"]


def tensor(dtype: str, *shape: int) -> ModelSignature:
    return ModelSignature(inputs=Schema([TensorSpec(np.dtype(dtype), shape)]))


def columns(*specs: tuple[str, DataType]) -> ModelSignature:
    return ModelSignature(inputs=Schema([ColSpec(kind, name) for name, kind in specs]))


SIGNATURES: dict[str, ModelSignature] = {
    "f64x4": tensor("float64", -1, 4),
    "f32x4": tensor("float32", -1, 4),
    "i64x4": tensor("int64", -1, 4),
    "i32x4": tensor("int32", -1, 4),
    "boolx4": tensor("bool", -1, 4),
    "f64": tensor("float64", -1),
    "f64x2x2": tensor("float64", -1, 2, 2),
    "mixed": columns(
        ("a", DataType.double),
        ("f", DataType.float),
        ("n", DataType.long),
        ("i", DataType.integer),
        ("t", DataType.boolean),
        ("s", DataType.string),
    ),
    "prompt": columns(("prompt", DataType.string)),
}

# (signature, body, the fast path takes it)
CASES: list[tuple[str, Any, bool]] = [
    # tensors: every format with the tensor's own row shape
    ("f64x4", {"inputs": [ROW]}, True),
    ("f64x4", {"instances": [ROW, ROW]}, True),
    ("f64x4", {"inputs": [[1, 2, 3, 4]]}, True),
    ("f64x4", {"dataframe_split": {"data": [ROW]}}, True),
    ("f64x4", {"dataframe_split": {"columns": ["a", "b", "c", "d"], "data": [ROW, ROW]}}, True),
    ("f64x4", {"dataframe_split": {"columns": [0, 1, 2, 3], "data": [[1, 2, 3, 4]]}}, True),
    ("f32x4", {"inputs": [ROW]}, True),
    ("f32x4", {"instances": [[0.1, 0.2, 0.3, 0.4]]}, True),
    ("f32x4", {"dataframe_split": {"data": [[0.1, 0.2, 0.3, 0.4]]}}, True),
    ("i64x4", {"inputs": [[1, 2, 3, 4]]}, True),
    ("i64x4", {"dataframe_split": {"data": [[1, 2, 3, 4]]}}, True),
    ("i32x4", {"inputs": [[1, 2, 3, 4]]}, True),
    ("i32x4", {"dataframe_split": {"data": [[1, 2, 3, 4]]}}, True),
    ("boolx4", {"inputs": [[True, False, True, True]]}, True),
    ("f32x4", {"inputs": [[float("nan"), 1e300, float("-inf"), 4]]}, True),  # NaN, overflow to inf
    ("f64", {"inputs": [1.0, 2.5]}, True),
    ("f64x2x2", {"inputs": [[[1.0, 2.0], [3.0, 4.0]]]}, True),
    # tensors: coercions and refusals left to MLflow
    ("f64x4", {"inputs": [[True, 2.0, 3.0, 4.0]]}, False),
    ("f64x4", {"inputs": [["1.5", 2.0, 3.0, 4.0]]}, False),
    ("f64x4", {"inputs": [[1.0, 2.0, 3.0]]}, False),
    ("f64x4", {"inputs": [1.0, 2.0, 3.0, 4.0]}, False),
    ("f64x4", {"inputs": [[1.0, 2.0, 3.0, None]]}, False),
    ("f64x4", {"inputs": []}, False),
    ("f64x4", {"inputs": [ROW], "params": {"k": 1}}, False),
    ("f64x4", {"inputs": [ROW], "instances": [ROW]}, False),
    ("f64x4", {"dataframe_records": [{"a": 1.0, "b": 2.0, "c": 3.0, "d": 4.0}]}, False),
    ("f64x4", {"dataframe_split": {"columns": ["a", "b"], "data": [ROW]}}, False),
    ("f64x4", {"dataframe_split": {"index": [0], "data": [ROW]}}, False),
    ("f64x4", {"dataframe_split": [ROW]}, False),
    ("f64x4", {"tensor": [ROW]}, False),
    ("f64x4", [ROW], False),
    ("i64x4", {"inputs": [[1.0, 2, 3, 4]]}, False),
    ("i64x4", {"inputs": [[1.5, 2, 3, 4]]}, False),
    ("i32x4", {"inputs": [[2**40, 2, 3, 4]]}, False),
    ("i64x4", {"inputs": [[2**70, 2, 3, 4]]}, False),
    ("f64x2x2", {"inputs": [[[1.0, 2.0], [3.0]]]}, False),
    # columns: every format with the signature's own columns and JSON types
    ("mixed", {"dataframe_split": {"columns": COLUMNS, "data": [MIXED, MIXED]}}, True),
    ("mixed", {"dataframe_records": [dict(zip(COLUMNS, MIXED, strict=True))]}, True),
    ("mixed", {"instances": [dict(zip(COLUMNS, MIXED, strict=True))] * 3}, True),
    ("mixed", {"inputs": [dict(zip(COLUMNS, MIXED, strict=True))]}, True),
    ("mixed", {"inputs": {name: [value, value] for name, value in zip(COLUMNS, MIXED, strict=True)}}, True),
    ("mixed", {"dataframe_split": {"columns": COLUMNS, "data": [[1, 2, 3, 4, False, ""]]}}, True),
    (
        "mixed",
        {
            "dataframe_records": [
                dict(zip(COLUMNS, [float("nan"), float("inf"), 3, 4, True, "x"], strict=True))
            ]
        },
        True,
    ),
    ("prompt", {"dataframe_records": [{"prompt": "Hello world"}]}, True),
    ("prompt", {"dataframe_split": {"columns": ["prompt"], "data": [["Hello"], ["world"]]}}, True),
    ("prompt", {"inputs": {"prompt": ["Hello"]}}, True),
    # columns: coercions and refusals left to MLflow
    ("mixed", {"dataframe_records": [dict(zip(COLUMNS, [1.5, 2.0, 3.0, 4, True, "x"], strict=True))]}, False),
    ("mixed", {"dataframe_records": [dict(zip(COLUMNS, [1.5, 2.0, 3.5, 4, True, "x"], strict=True))]}, False),
    ("mixed", {"dataframe_records": [dict(zip(COLUMNS, [1.5, 2.0, 3, 4, 1, "x"], strict=True))]}, False),
    ("mixed", {"dataframe_records": [dict(zip(COLUMNS, [1.5, 2.0, 3, 4, True, 7], strict=True))]}, False),
    ("mixed", {"dataframe_records": [dict(zip(COLUMNS, [None, 2.0, 3, 4, True, "x"], strict=True))]}, False),
    ("mixed", {"dataframe_records": [{**dict(zip(COLUMNS, MIXED, strict=True)), "extra": 1}]}, False),
    ("mixed", {"dataframe_records": [dict(zip(COLUMNS[:-1], MIXED, strict=False))]}, False),
    ("mixed", {"dataframe_records": []}, False),
    ("mixed", {"dataframe_records": {"a": 1}}, False),
    (
        "mixed",
        {"dataframe_split": {"columns": list(reversed(COLUMNS)), "data": [list(reversed(MIXED))]}},
        False,
    ),
    ("mixed", {"dataframe_split": {"data": [MIXED]}}, False),
    ("mixed", {"dataframe_split": {"columns": COLUMNS, "data": [MIXED[:-1]]}}, False),
    ("mixed", {"dataframe_split": {"columns": COLUMNS, "data": [MIXED], "index": [7]}}, False),
    ("mixed", {"dataframe_split": {"columns": COLUMNS, "data": [MIXED]}, "params": {}}, False),
    (
        "mixed",
        {"dataframe_records": [dict(zip(COLUMNS, [1.5, 2.0, 2**70, 4, True, "x"], strict=True))]},
        False,
    ),
    ("mixed", {"inputs": {name: [value] for name, value in zip(COLUMNS[:-1], MIXED, strict=False)}}, False),
    (
        "mixed",
        {"inputs": {**{name: [value] for name, value in zip(COLUMNS, MIXED, strict=True)}, "a": [1.0, 2.0]}},
        False,
    ),
    ("prompt", {"dataframe_records": [{"prompt": ["Hello"]}]}, False),
    ("prompt", {"messages": [{"role": "user", "content": "hi"}]}, False),
]


def loaded(signature: ModelSignature | None) -> LoadedVersion:
    return LoadedVersion("1", types.SimpleNamespace(metadata=Model(signature=signature)), signature, 0.0)


def mlflow_parse(body: Any, signature: ModelSignature) -> Any:
    """What `mlflow models serve` hands the model for `body`: its parser, then its enforcement."""
    raw = json.dumps(body)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        parsed = scoring_server._parse_json_data(raw, Model(signature=signature), signature.inputs)
        data, _ = pyfunc._validate_prediction_input(parsed.data, parsed.params, signature.inputs, None)
    return data


def assert_same(fast: Any, expected: Any) -> None:
    assert type(fast) is type(expected)
    if isinstance(expected, pd.DataFrame):
        pd.testing.assert_frame_equal(fast, expected, check_exact=True)
    else:
        assert fast.dtype == expected.dtype
        assert fast.shape == expected.shape
        np.testing.assert_array_equal(fast, expected)


def reference(body: Any, signature: ModelSignature) -> tuple[str, Any]:
    try:
        return "ok", mlflow_parse(body, signature)
    except MlflowException as error:
        return "refused", error.message


@pytest.mark.parametrize(("name", "body", "fast"), CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_fast_path_gives_what_mlflow_gives(name: str, body: Any, fast: bool) -> None:
    signature = SIGNATURES[name]
    plan = fastparse.plan_for(signature)
    assert plan is not None
    result = fastparse.parse(body, plan)
    assert (result is not None) is fast
    outcome, expected = reference(body, signature)
    if result is not None:
        assert outcome == "ok", expected
        assert_same(result.data, expected)
        assert result.rows == len(expected)
    # Through the route's parser (fast path, else MLflow's): the same input or the same refusal.
    try:
        parsed = parse_invocation(json.dumps(body).encode(), "application/json", loaded(signature), plan)
    except MlflowException as error:
        assert (outcome, expected) == ("refused", error.message)
    else:
        assert outcome == "ok"
        assert_same(parsed.data, expected)
        assert parsed.rows == len(expected)


def test_batches_of_fast_inputs_equal_batches_of_mlflow_inputs() -> None:
    """The batched path concatenates requests' inputs: fast ones must join as MLflow's do."""
    for name, body_a, body_b in [
        (
            "mixed",
            {"dataframe_split": {"columns": COLUMNS, "data": [MIXED, MIXED]}},
            {"inputs": {name: [value, value] for name, value in zip(COLUMNS, MIXED, strict=True)}},
        ),
        ("f64x4", {"inputs": [ROW]}, {"dataframe_split": {"data": [ROW, ROW]}}),
        ("prompt", {"dataframe_records": [{"prompt": "a"}]}, {"inputs": {"prompt": ["b", "c"]}}),
    ]:
        signature = SIGNATURES[name]
        plan = fastparse.plan_for(signature)
        assert plan is not None
        fast = [fastparse.parse(body, plan) for body in (body_a, body_b)]
        assert all(part is not None for part in fast)
        joined = concat_model_inputs([part.data for part in fast if part is not None])
        assert_same(
            joined, concat_model_inputs([mlflow_parse(body_a, signature), mlflow_parse(body_b, signature)])
        )


@pytest.mark.parametrize(
    "signature",
    [
        None,
        ModelSignature(inputs=Schema([ColSpec(DataType.double, "a", required=False)])),
        ModelSignature(inputs=Schema([ColSpec(DataType.datetime, "at")])),
        ModelSignature(inputs=Schema([ColSpec(DataType.binary, "b")])),
        ModelSignature(inputs=Schema([ColSpec(DataType.double)])),
        ModelSignature(inputs=Schema([TensorSpec(np.dtype("float64"), (-1, -1))])),
        ModelSignature(inputs=Schema([TensorSpec(np.dtype("float64"), (-1, 2), "x")])),
        ModelSignature(inputs=Schema([TensorSpec(np.dtype("str"), (-1,))])),
        ModelSignature(
            inputs=Schema([ColSpec(DataType.double, "a")]),
            params=ParamSchema([ParamSpec("k", DataType.long, 1)]),
        ),
    ],
    ids=[
        "none",
        "optional",
        "datetime",
        "binary",
        "unnamed",
        "ragged",
        "named-tensor",
        "str-tensor",
        "params",
    ],
)
def test_signatures_without_a_fast_plan(signature: ModelSignature | None) -> None:
    assert fastparse.plan_for(signature) is None


def test_the_plan_is_built_once_with_the_api_schema() -> None:
    assert build_api_schema(SIGNATURES["mixed"]).fast_plan == fastparse.plan_for(SIGNATURES["mixed"])
    assert build_api_schema(None).fast_plan is None


# --------------------------------------------------------------------------------------- hypothesis

_JSON_SCALARS = (
    st.floats(allow_nan=True, allow_infinity=True)
    | st.integers(min_value=-(2**65), max_value=2**65)
    | st.booleans()
    | st.text(max_size=4)
    | st.none()
)


# Rows of the signature's own JSON types (what the fast path takes), or of any JSON scalars.
_MIXED_ROWS = st.tuples(
    st.floats(allow_nan=False) | st.integers(-(2**53), 2**53),
    st.floats(width=32, allow_nan=False) | st.integers(-(2**24), 2**24),
    st.integers(-(2**63), 2**63 - 1),
    st.integers(-(2**31), 2**31 - 1),
    st.booleans(),
    st.text(max_size=6),
).map(list) | st.lists(_JSON_SCALARS, min_size=6, max_size=6)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    rows=st.lists(_MIXED_ROWS, min_size=1, max_size=4),
    form=st.sampled_from(["dataframe_split", "dataframe_records", "instances", "inputs-columns"]),
)
def test_any_column_values_match_mlflow(rows: list[list[Any]], form: str) -> None:
    signature = SIGNATURES["mixed"]
    body: Any
    if form == "dataframe_split":
        body = {form: {"columns": COLUMNS, "data": rows}}
    elif form == "inputs-columns":
        body = {"inputs": {name: [row[i] for row in rows] for i, name in enumerate(COLUMNS)}}
    else:
        body = {form: [dict(zip(COLUMNS, row, strict=True)) for row in rows]}
    plan = fastparse.plan_for(signature)
    assert plan is not None
    result = fastparse.parse(json.loads(json.dumps(body)), plan)
    if result is not None:
        outcome, expected = reference(body, signature)
        assert outcome == "ok", expected
        assert_same(result.data, expected)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    name=st.sampled_from(["f64x4", "f32x4", "i64x4", "i32x4", "boolx4"]),
    rows=st.lists(
        st.lists(st.floats() | st.integers(-(2**31), 2**31 - 1), min_size=4, max_size=4)
        | st.lists(st.booleans(), min_size=4, max_size=4)
        | st.lists(_JSON_SCALARS, min_size=3, max_size=5),
        min_size=1,
        max_size=3,
    ),
    form=st.sampled_from(["inputs", "instances", "dataframe_split"]),
)
def test_any_tensor_values_match_mlflow(name: str, rows: list[list[Any]], form: str) -> None:
    signature = SIGNATURES[name]
    body = {form: {"data": rows}} if form == "dataframe_split" else {form: rows}
    plan = fastparse.plan_for(signature)
    assert plan is not None
    result = fastparse.parse(json.loads(json.dumps(body)), plan)
    if result is not None:
        outcome, expected = reference(body, signature)
        assert outcome == "ok", expected
        assert_same(result.data, expected)
