"""`/serve` records → the model's DataFrame: the per-column build gives what `from_records` gives."""

from __future__ import annotations

import datetime as dt
from typing import Any

import pandas as pd
import pytest
from mlflow.models.signature import ModelSignature
from mlflow.types.schema import Array, ColSpec, DataType, Schema

from serving_app.convert import records_to_model_input
from serving_app.schema import build_api_schema

SIGNATURE = ModelSignature(
    inputs=Schema(
        [
            ColSpec(DataType.double, "a"),
            ColSpec(DataType.long, "n"),
            ColSpec(DataType.boolean, "t"),
            ColSpec(DataType.string, "s"),
            ColSpec(DataType.datetime, "at"),
            ColSpec(Array(DataType.double), "xs"),
            ColSpec(DataType.double, "maybe", required=False),
        ]
    )
)
FULL = {"a": 1.5, "n": 3, "t": True, "s": "x", "at": "2024-01-02T03:04:05", "xs": [1.0], "maybe": 2.0}

RECORDS: list[list[dict[str, Any]]] = [
    [FULL],
    [FULL, {**FULL, "a": -2, "s": "", "maybe": None}],
    [{**FULL, "extra": 1}],
    [{k: v for k, v in FULL.items() if k != "maybe"}],
    [FULL, {k: v for k, v in FULL.items() if k != "maybe"}],
    [{**FULL, "a": float("nan")}],
    [{**FULL, "xs": []}, {**FULL, "xs": [1.0, 2.0]}],
]


def reference(records: list[dict[str, Any]], names: tuple[str, ...]) -> pd.DataFrame:
    frame = pd.DataFrame.from_records(list(records))
    return frame[[name for name in names if name in frame.columns]]


@pytest.mark.parametrize("body", RECORDS, ids=range(len(RECORDS)))
def test_column_records_build_the_frame_from_records_builds(body: list[dict[str, Any]]) -> None:
    api = build_api_schema(SIGNATURE)
    records = api.request_adapter.validate_python(body)
    assert isinstance(records[0]["at"], dt.datetime)
    frame = records_to_model_input(records, api.input_shape)
    pd.testing.assert_frame_equal(frame, reference(records, api.input_shape.names), check_exact=True)
