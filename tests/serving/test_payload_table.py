"""Payload records as an Arrow table (schema, rows, bounds, a Parquet round trip), and where the MLflow
sink puts the files (partition, run choice, the artifact proxy's path)."""

from __future__ import annotations

import datetime
import io
import json
import math
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from mlflow.models.signature import ModelSignature
from mlflow.types.schema import Array, ColSpec, Object, Property, Schema, TensorSpec

from serving_app.monitoring.mlflow_sink import partition
from serving_app.monitoring.records import PayloadRecord, settled
from serving_app.monitoring.table import (
    REQUEST_FIELDS,
    Columns,
    arrow_schema,
    payload_table,
    plain,
    signature_columns,
)
from serving_app.monitoring.tracking import RunInfo, SinkRefused, oldest, proxied_path

AT = 1_700_000_000.25  # 2023-11-14 22:13:20.250 UTC
REQUEST_NAMES = [name for name, _ in REQUEST_FIELDS]
ROOMY = 1_000_000  # a record budget nothing here reaches

COLUMNS = ModelSignature(
    Schema([ColSpec("double", "x"), ColSpec("long", "n"), ColSpec("string", "s"), ColSpec("boolean", "b")]),
    Schema([ColSpec("double", "score")]),
)
TENSORS = ModelSignature(
    Schema([TensorSpec(np.dtype("float64"), (-1, 3))]), Schema([TensorSpec(np.dtype("float64"), (-1,))])
)
COLUMN_FIELDS = [
    ("input_x", pa.float64()),
    ("input_n", pa.int64()),
    ("input_s", pa.string()),
    ("input_b", pa.bool_()),
    ("inputs_json", pa.string()),
    ("output_score", pa.float64()),
    ("outputs_json", pa.string()),
]
JSON_FIELDS = [("inputs_json", pa.string()), ("outputs_json", pa.string())]


def record(
    model_input: Any = None,
    outputs: list[Any] | None = None,
    *,
    signature: Any = COLUMNS,
    rid: str = "req-1",
    status: int = 200,
    error_code: str | None = None,
) -> PayloadRecord:
    return PayloadRecord(
        request_id=rid,
        at=AT,
        model="iris",
        version="3",
        choice="default",
        route="/invocations",
        status=status,
        error_code=error_code,
        latency_ms=2.5,
        model_input=model_input,
        rows=0 if model_input is None else len(model_input),
        outputs=outputs,
        signature=signature,
    )


def frame(rows: int = 2) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "x": [float(n) + 0.5 for n in range(rows)],
            "n": list(range(rows)),
            "s": [f"s{n}" for n in range(rows)],
            "b": [n % 2 == 0 for n in range(rows)],
        }
    )


def failed(rid: str = "bad-1", signature: Any = COLUMNS) -> PayloadRecord:
    return record(None, None, signature=signature, rid=rid, status=400, error_code="invalid_input")


def table(
    *records: PayloadRecord, inputs: bool = True, outputs: bool = True, budget: int = ROOMY
) -> pa.Table:
    return payload_table(list(records), inputs=inputs, outputs=outputs, max_record_bytes=budget)


def fields(schema: pa.Schema) -> list[tuple[str, pa.DataType]]:
    return [(f.name, f.type) for f in schema]


# ----------------------------------------------------------------------------------------- schema


@pytest.mark.parametrize(
    ("records", "expected"),
    [
        ([record(frame(), [0.1, 0.2])], COLUMN_FIELDS),
        ([failed()], COLUMN_FIELDS),
        ([failed(), failed("bad-2")], COLUMN_FIELDS),
        ([failed(), record(frame(), [0.1, 0.2])], COLUMN_FIELDS),
        ([record(np.zeros((2, 3)), [0.1, 0.2], signature=TENSORS)], JSON_FIELDS),
        ([record(frame(), [0.1, 0.2], signature=None)], JSON_FIELDS),
        ([failed(signature=None)], JSON_FIELDS),
        ([], JSON_FIELDS),
    ],
    ids=[
        "columns",
        "columns-failed-only",
        "columns-failed-only-two",
        "columns-failed-first",
        "tensors",
        "no-signature",
        "no-signature-failed",
        "no-records",
    ],
)
def test_the_schema_is_the_signatures(records: list[PayloadRecord], expected: list[Any]) -> None:
    assert fields(table(*records).schema) == fields(pa.schema(list(REQUEST_FIELDS))) + expected


@pytest.mark.parametrize(
    ("mlflow_type", "arrow_type"),
    [
        ("boolean", pa.bool_()),
        ("integer", pa.int32()),
        ("long", pa.int64()),
        ("float", pa.float32()),
        ("double", pa.float64()),
        ("string", pa.string()),
        ("binary", pa.binary()),
        ("datetime", pa.timestamp("us")),
        (Array("double"), pa.string()),
    ],
    ids=["boolean", "integer", "long", "float", "double", "string", "binary", "datetime", "array-as-json"],
)
def test_signature_column_types(mlflow_type: Any, arrow_type: pa.DataType) -> None:
    signature = ModelSignature(Schema([ColSpec(mlflow_type, "c")]), Schema([ColSpec(mlflow_type, "o")]))
    assert signature_columns(signature) == Columns((("c", arrow_type),), (("o", arrow_type),))


@pytest.mark.parametrize(
    "signature",
    [None, TENSORS, ModelSignature(Schema([ColSpec("double")])), object()],
    ids=["none", "tensors", "unnamed-columns", "not-a-signature"],
)
def test_no_columns_without_named_column_specs(signature: Any) -> None:
    assert signature_columns(signature) == Columns((), ())


@pytest.mark.parametrize(
    ("inputs", "outputs", "extra"),
    [
        (True, True, ["input_a", "inputs_json", "output_o", "outputs_json"]),
        (True, False, ["input_a", "inputs_json"]),
        (False, True, ["output_o", "outputs_json"]),
        (False, False, []),
    ],
    ids=["both", "inputs-only", "outputs-only", "neither"],
)
def test_include_decides_the_payload_columns(inputs: bool, outputs: bool, extra: list[str]) -> None:
    columns = Columns((("a", pa.float64()),), (("o", pa.int64()),))
    assert arrow_schema(columns, inputs=inputs, outputs=outputs).names == REQUEST_NAMES + extra


@pytest.mark.parametrize(
    ("inputs", "outputs"), [(True, False), (False, True), (False, False)], ids=["no-out", "no-in", "neither"]
)
def test_a_table_without_inputs_or_outputs_keeps_its_rows(inputs: bool, outputs: bool) -> None:
    built = table(record(frame(3), [0.1, 0.2, 0.3]), inputs=inputs, outputs=outputs)
    assert built.num_rows == 3
    assert built.column("row").to_pylist() == [0, 1, 2]
    assert any(name.startswith("input") for name in built.schema.names) is inputs
    assert any(name.startswith("output") for name in built.schema.names) is outputs


# ------------------------------------------------------------------------------------------- rows


def test_one_row_per_input_row_with_the_request_repeated() -> None:
    rows = table(record(frame(3), [0.1, 0.2, 0.3])).to_pylist()
    moment = datetime.datetime(2023, 11, 14, 22, 13, 20, 250000, tzinfo=datetime.UTC)
    request = {
        "request_id": "req-1",
        "time": moment,
        "model": "iris",
        "version": "3",
        "choice": "default",
        "route": "/invocations",
        "status": 200,
        "error_code": None,
        "latency_ms": 2.5,
        "truncated": False,
        "inputs_json": None,
        "outputs_json": None,
    }
    values = [(0.5, 0, "s0", True, 0.1), (1.5, 1, "s1", False, 0.2), (2.5, 2, "s2", True, 0.3)]
    assert rows == [
        {**request, "row": n, "input_x": x, "input_n": i, "input_s": t, "input_b": b, "output_score": score}
        for n, (x, i, t, b, score) in enumerate(values)
    ]


def test_a_failed_request_without_inputs_is_one_row_of_nulls() -> None:
    (row,) = table(failed()).to_pylist()
    assert (row["request_id"], row["status"], row["error_code"]) == ("bad-1", 400, "invalid_input")
    assert row["row"] is None
    assert row["truncated"] is False
    payload = {k: v for k, v in row.items() if k.startswith(("input", "output"))}
    assert payload and set(payload.values()) == {None}


def test_records_of_a_batch_follow_each_other() -> None:
    built = table(record(frame(2), [0.1, 0.2], rid="a"), failed("b"), record(frame(1), [0.3], rid="c"))
    assert built.column("request_id").to_pylist() == ["a", "a", "b", "c"]
    assert built.column("row").to_pylist() == [0, 1, None, 0]


@pytest.mark.parametrize(
    ("outputs", "score", "as_json"),
    [
        ([0.1, 0.2], [0.1, 0.2], [None, None]),
        ([{"score": 0.1}, {"score": 0.2}], [0.1, 0.2], [None, None]),
        ([np.float32(0.5), np.float64(0.25)], [0.5, 0.25], [None, None]),
        ([float("nan"), float("inf")], [None, None], [None, None]),
        ([np.float64("nan"), np.int64(3)], [None, 3.0], [None, None]),
        ([[0.1, 0.9], {"other": 1}], [None, None], ["[0.1,0.9]", '{"other":1}']),
        ([[float("nan")], [np.float32(0.5)]], [None, None], ["[null]", "[0.5]"]),
    ],
    ids=["scalars", "dicts", "numpy-scalars", "nan-inf", "numpy-nan-int", "not-columns", "json-made-plain"],
)
def test_outputs_by_column_or_as_json(outputs: list[Any], score: list[Any], as_json: list[Any]) -> None:
    built = table(record(frame(2), outputs))
    assert built.column("output_score").to_pylist() == score
    assert built.column("outputs_json").to_pylist() == as_json


def test_inputs_made_plain_nan_as_null_and_unknown_columns_left_out_as_queued_or_settled() -> None:
    model_input = pd.DataFrame(
        {
            "x": np.array([np.nan, 1.0]),
            "n": np.array([7, 8], dtype=np.int64),
            "b": np.array([True, False]),
            "extra": ["not", "in the signature"],
        }
    )
    for logged in (record(model_input, [0.0, 1.0]), settled(record(model_input, [0.0, 1.0]))):
        assert_plain_inputs(table(logged))


def assert_plain_inputs(built: pa.Table) -> None:
    assert built.column("input_x").to_pylist() == [None, 1.0]
    assert built.column("input_n").to_pylist() == [7, 8]
    assert built.column("input_s").to_pylist() == [None, None]  # the signature's, not in the frame
    assert built.column("input_b").to_pylist() == [True, False]
    assert "input_extra" not in built.schema.names


@pytest.mark.parametrize(
    ("model_input", "inputs_json"),
    [
        (np.arange(6.0).reshape(2, 3), "[[0.0,1.0,2.0],[3.0,4.0,5.0]]"),
        ({"a": np.array([1, 2]), "b": np.float32(0.5)}, '{"a":[1,2],"b":0.5}'),
        (pd.DataFrame({"x": [1.0, np.nan]}), '{"x":[1.0,null]}'),
        ([b"\x00\xff", "text"], '["00ff","text"]'),
    ],
    ids=["ndarray", "dict-of-arrays", "frame", "bytes-as-hex"],
)
def test_inputs_without_columns_go_in_as_json_on_the_first_row(model_input: Any, inputs_json: str) -> None:
    built = table(record(model_input, [1.0, 2.0], signature=TENSORS))
    assert built.column("inputs_json").to_pylist() == [inputs_json, None]
    assert built.column("outputs_json").to_pylist() == ["1.0", "2.0"]
    assert built.column("row").to_pylist() == [0, 1]


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (np.int64(3), 3),
        (np.float32(0.5), 0.5),
        (np.bool_(True), True),
        (float("nan"), None),
        (float("-inf"), None),
        (np.float64("nan"), None),
        (np.array([[1, 2], [3, 4]]), [[1, 2], [3, 4]]),
        (np.array([np.nan, 1.0]), [None, 1.0]),
        ((1, np.int8(2)), [1, 2]),
        ({1: np.float64(0.5)}, {"1": 0.5}),
        (pd.DataFrame({"a": [1, 2]}), {"a": [1, 2]}),
        (b"\x01\x02", "0102"),
        ("text", "text"),
        (None, None),
    ],
    ids=[
        "int64",
        "float32",
        "bool",
        "nan",
        "neg-inf",
        "numpy-nan",
        "ndarray",
        "ndarray-nan",
        "tuple",
        "dict-keys-as-text",
        "frame",
        "bytes",
        "str",
        "none",
    ],
)
def test_plain(value: Any, expected: Any) -> None:
    made = plain(value)
    assert made == expected
    assert json.loads(json.dumps(made, allow_nan=False)) == expected


# ----------------------------------------------------------------------------------------- bounds


def wide_frame(rows: int, width: int = 1000) -> pd.DataFrame:
    return pd.DataFrame({"s": [f"{n}" + "x" * (width - 1) for n in range(rows)]})


@pytest.mark.parametrize(
    ("rows", "budget", "kept", "truncated"),
    [
        (5, 10_000, 5, False),
        (5, 3_500, 3, True),  # each row is a little over 1,000 bytes
        (5, 1_500, 1, True),
        (1, 1_500, 1, False),
    ],
    ids=["fits", "three-fit", "one-fits", "the-one-fits"],
)
def test_rows_past_the_budget_are_left_out(rows: int, budget: int, kept: int, truncated: bool) -> None:
    built = table(record(wide_frame(rows), [0.5] * rows), failed("other"), budget=budget)
    mine = built.filter(pc.equal(built.column("request_id"), "req-1"))
    assert mine.column("row").to_pylist() == list(range(kept))
    assert mine.column("truncated").to_pylist() == [truncated] * kept
    assert [len(s) for s in mine.column("input_s").to_pylist()] == [1000] * kept
    other = built.filter(pc.equal(built.column("request_id"), "other"))
    assert other.column("truncated").to_pylist() == [False]  # a bound per record, not per batch


@pytest.mark.parametrize(
    "model_input",
    [wide_frame(1, width=5000), wide_frame(3, width=5000)],
    ids=["one-huge-row", "every-row-huge"],
)
def test_a_first_row_past_the_budget_leaves_the_request_fields_only(model_input: pd.DataFrame) -> None:
    (row,) = table(record(model_input, [0.5] * len(model_input)), budget=1000).to_pylist()
    assert (row["request_id"], row["status"], row["row"], row["truncated"]) == ("req-1", 200, 0, True)
    assert all(v is None for k, v in row.items() if k.startswith(("input", "output")))


def test_json_inputs_past_the_budget_are_left_out() -> None:
    big = np.arange(2000.0)
    (row, *_) = table(record(big, [1.0], signature=TENSORS), budget=1000).to_pylist()
    assert row["inputs_json"] is None
    assert row["truncated"] is True


def test_json_inputs_within_the_budget_are_kept() -> None:
    # Counted once against the budget (not once more as part of the first row).
    big = np.arange(100.0)  # 491 bytes of JSON
    (row,) = table(record(big, [1.0], signature=TENSORS), budget=700).to_pylist()
    assert row["inputs_json"] == json.dumps(big.tolist(), separators=(",", ":"))
    assert row["truncated"] is False


def test_array_and_object_columns_go_in_as_json_text() -> None:
    signature = ModelSignature(
        Schema([ColSpec(Array("double"), "v"), ColSpec(Object([Property("a", "long")]), "o")]),
        Schema([ColSpec(Array("string"), "labels")]),
    )
    model_input = pd.DataFrame({"v": [[1.0, 2.0], np.array([3.0, np.nan])], "o": [{"a": 1}, None]})
    built = table(record(model_input, [["x", "y"], []], signature=signature))
    assert fields(built.schema)[len(REQUEST_FIELDS) :][:2] == [
        ("input_v", pa.string()),
        ("input_o", pa.string()),
    ]
    assert built.column("input_v").to_pylist() == ["[1.0,2.0]", "[3.0,null]"]
    assert built.column("input_o").to_pylist() == ['{"a":1}', None]
    # A list answer per row is not one output column's value: the answer as JSON.
    assert built.column("outputs_json").to_pylist() == ['["x","y"]', "[]"]


MISMATCHED = {
    # A CSV body or a pinned version's input is enforced in predict: a request refused there is
    # recorded with the input as it came.
    "text-in-double-input": (
        pd.DataFrame({"x": ["abc"], "n": [1], "s": ["a"], "b": [True]}),
        None,
        "input_x",
        None,
    ),
    "int-in-string-input": (
        pd.DataFrame({"x": [1.0], "n": [1], "s": [5], "b": [True]}),
        None,
        "input_s",
        "5",
    ),
    "text-in-boolean-input": (
        pd.DataFrame({"x": [1.0], "n": [1], "s": ["a"], "b": ["yes"]}),
        None,
        "input_b",
        None,
    ),
    "int-past-long-input": (
        pd.DataFrame({"x": [1.0], "n": [2**70], "s": ["a"], "b": [True]}),
        None,
        "input_n",
        None,
    ),
    # MLflow does not enforce output signatures: a model may answer labels where it declared scores.
    "text-for-double-output": (frame(1), ["label"], "output_score", None),
    "text-in-output-dict": (frame(1), [{"score": "high"}], "output_score", None),
}


@pytest.mark.parametrize(
    ("model_input", "outputs", "column", "value"), MISMATCHED.values(), ids=MISMATCHED.keys()
)
def test_a_value_not_of_its_columns_type_costs_only_that_value(
    model_input: Any, outputs: Any, column: str, value: Any
) -> None:
    status = 400 if outputs is None else 200
    good = record(frame(1), [0.5], rid="good")
    built = table(good, record(model_input, outputs, rid="odd", status=status), good)
    assert built.column("request_id").to_pylist() == ["good", "odd", "good"]
    assert built.column(column).to_pylist()[1] == value
    for name in ("input_x", "input_n", "input_s", "input_b", "output_score"):
        kept = built.column(name).to_pylist()
        assert kept[0] == kept[2] is not None  # the batch's other records whole
        if name.startswith("input") and name != column:
            assert kept[1] is not None  # ... and the odd record's other inputs


def test_a_fraction_in_an_integer_column_is_not_recorded_as_another_number() -> None:
    model_input = pd.DataFrame({"x": [1.0], "n": [1.5], "s": ["a"], "b": [True]})
    built = table(record(model_input, None, status=400, error_code="invalid_input"))
    assert built.column("input_n").to_pylist() in ([None], [1.5])


# ------------------------------------------------------------------------------------ round trips


def parquet_bytes(built: pa.Table) -> bytes:
    buffer = io.BytesIO()
    pq.write_table(built, buffer)
    return buffer.getvalue()


@pytest.mark.parametrize(
    "records",
    [
        [record(frame(3), [0.1, 0.2, 0.3]), failed(), record(frame(1), [np.float32(0.5)], rid="r2")],
        [record(np.arange(6.0).reshape(2, 3), [1.0, 2.0], signature=TENSORS), failed(signature=TENSORS)],
    ],
    ids=["columns", "tensors"],
)
def test_the_table_round_trips_through_parquet_and_pandas(records: list[PayloadRecord]) -> None:
    built = table(*records)
    content = parquet_bytes(built)
    back = pq.read_table(io.BytesIO(content))
    assert back.schema.equals(built.schema)
    assert back.equals(built)
    read = pd.read_parquet(io.BytesIO(content))
    assert list(read.columns) == built.schema.names
    assert len(read) == built.num_rows
    assert str(read["time"].dt.tz) == "UTC"
    assert read["time"].iloc[0] == pd.Timestamp(AT, unit="s", tz="UTC")
    assert read["request_id"].tolist() == built.column("request_id").to_pylist()


def test_a_versions_files_read_back_as_one_dataset(tmp_path: Any) -> None:
    # Files with answered requests and with failed requests only: one schema, one dataset.
    batches = [
        [record(frame(2), [0.1, 0.2], rid="a")],
        [failed("b"), failed("c")],
        [record(frame(1), [0.3], rid="d")],
    ]
    for number, records in enumerate(batches):
        where = tmp_path / partition(AT + 3600 * number)
        where.mkdir(parents=True)
        pq.write_table(table(*records), where / f"w-{number:06d}.parquet")
    read = pd.read_parquet(tmp_path / "payloads")
    assert sorted(read["request_id"]) == ["a", "a", "b", "c", "d"]
    places = {(str(date), int(hour)) for date, hour in zip(read["date"], read["hour"], strict=True)}
    assert places == {("2023-11-14", 22), ("2023-11-14", 23), ("2023-11-15", 0)}
    assert read.loc[read["request_id"] == "d", "input_x"].tolist() == [0.5]
    assert math.isnan(read.loc[read["request_id"] == "b", "input_x"].iloc[0])


# ------------------------------------------------------------------------ where the sink puts files


@pytest.fixture
def far_from_utc(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """A local time zone hours from UTC: partitions must not follow it."""
    monkeypatch.setenv("TZ", "Pacific/Kiritimati")  # UTC+14
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


@pytest.mark.parametrize(
    ("at", "expected"),
    [
        (0.0, "payloads/date=1970-01-01/hour=00"),
        (AT, "payloads/date=2023-11-14/hour=22"),
        (1_704_067_199.999, "payloads/date=2023-12-31/hour=23"),
        (1_704_067_200.0, "payloads/date=2024-01-01/hour=00"),
        (1_709_164_800.0 + 5 * 3600, "payloads/date=2024-02-29/hour=05"),
    ],
    ids=["epoch", "evening", "last-moment-of-year", "new-year", "leap-day"],
)
def test_partition_is_the_utc_date_and_hour(far_from_utc: None, at: float, expected: str) -> None:
    assert partition(at) == expected


def run(run_id: str, start_time: int) -> RunInfo:
    return RunInfo(run_id, start_time, f"mlflow-artifacts:/1/{run_id}/artifacts")


@pytest.mark.parametrize(
    ("runs", "expected"),
    [
        ([run("b", 10)], "b"),
        ([run("b", 20), run("a", 10), run("c", 30)], "a"),
        ([run("b", 10), run("a", 10)], "a"),
        ([run("a", 10), run("b", 10)], "a"),
        ([run("z", 5), run("a", 10)], "z"),
        ([run("b", 0), run("a", 10)], "b"),
    ],
    ids=["one", "earliest", "tie-by-id", "tie-by-id-other-order", "time-before-id", "no-start-time"],
)
def test_oldest_run_by_start_time_then_id(runs: list[RunInfo], expected: str) -> None:
    assert oldest(runs).run_id == expected
    assert oldest(list(reversed(runs))).run_id == expected  # every replica picks the same run


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        (
            {
                "info": {
                    "run_id": "abc",
                    "start_time": 1700,
                    "artifact_uri": "mlflow-artifacts:/1/abc/artifacts",
                }
            },
            RunInfo("abc", 1700, "mlflow-artifacts:/1/abc/artifacts"),
        ),
        ({"info": {"run_id": "abc", "start_time": "1700"}}, RunInfo("abc", 1700, "")),
        ({"info": {"run_id": "abc", "start_time": None}}, RunInfo("abc", 0, "")),
        ({"info": None}, RunInfo("", 0, "")),
        ({}, RunInfo("", 0, "")),
    ],
    ids=["full", "start-time-as-text", "start-time-null", "info-null", "no-info"],
)
def test_run_info_of_a_tracking_answer(answer: dict[str, Any], expected: RunInfo) -> None:
    assert RunInfo.of(answer) == expected


@pytest.mark.parametrize(
    ("artifact_uri", "relative", "expected"),
    [
        (
            "mlflow-artifacts:/1/abc/artifacts",
            "payloads/x.parquet",
            "/api/2.0/mlflow-artifacts/artifacts/1/abc/artifacts/payloads/x.parquet",
        ),
        (
            "mlflow-artifacts://host:5000/1/abc/artifacts",
            "payloads/x.parquet",
            "/api/2.0/mlflow-artifacts/artifacts/1/abc/artifacts/payloads/x.parquet",
        ),
        (
            "mlflow-artifacts:/1/abc/artifacts/",
            "payloads/date=2024-01-02/hour=03/w-000001-0a1b2c3d.parquet",
            "/api/2.0/mlflow-artifacts/artifacts/1/abc/artifacts/payloads/date%3D2024-01-02/hour%3D03/"
            "w-000001-0a1b2c3d.parquet",
        ),
        (
            "mlflow-artifacts:/1/a b/artifacts",
            "x?y#z",
            "/api/2.0/mlflow-artifacts/artifacts/1/a%20b/artifacts/x%3Fy%23z",
        ),
    ],
    ids=["proxied", "proxied-with-host", "partition-quoted", "quoted"],
)
def test_proxied_path(artifact_uri: str, relative: str, expected: str) -> None:
    assert proxied_path(artifact_uri, relative) == expected


@pytest.mark.parametrize(
    "artifact_uri",
    [
        "s3://bucket/1/abc/artifacts",
        "file:///mlruns/1/abc/artifacts",
        "/mlruns/1/abc",
        "",
        "mlflow-artifact:/1",
    ],
    ids=["s3", "file", "plain-path", "empty", "near-miss"],
)
def test_an_unproxied_artifact_store_is_refused(artifact_uri: str) -> None:
    with pytest.raises(SinkRefused) as refused:
        proxied_path(artifact_uri, "payloads/x.parquet")
    assert refused.value.code == "artifacts_not_proxied"
