"""The Open Inference Protocol's translations, table-driven: routes, request decoding (JSON and Triton's
binary tensor data), tensors → the scoring protocol against every kind of signature, predictions →
output tensors, signatures → metadata, errors."""

from __future__ import annotations

import gzip
import json
import zlib
from types import SimpleNamespace
from typing import Any

import numpy as np
import pandas as pd
import pytest
import tritonclient.http as triton
from mlflow import pyfunc
from mlflow.pyfunc import scoring_server
from mlflow.types.schema import Array, ColSpec, DataType, Map, Schema, TensorSpec
from tritonclient.http._utils import _get_inference_request

from serving_app.errors import InvalidInput, InvalidVersion, ServingError
from serving_app.oip.answers import (
    check_requested_outputs,
    error_body,
    infer_response,
    model_metadata,
    output_tensors,
)
from serving_app.oip.infer_request import InferRequest, Tensor, decode_request, decompressed, scoring_input
from serving_app.oip.routing import Route, check_model_name, match_route, pinned_version
from tests.serving.test_schema import ALL_TYPES

PHRASEBOOK = Schema([ColSpec(DataType.string, "prompt")])
PHRASEBOOK_OUT = Schema([ColSpec(DataType.string, "translation_text")])
FEATURES = Schema([TensorSpec(np.dtype("float64"), (-1, 4))])
LABELS = Schema([TensorSpec(np.dtype("int64"), (-1,))])
NAMED_TENSORS = Schema(
    [TensorSpec(np.dtype("float32"), (-1, 2), "pixels"), TensorSpec(np.dtype("int64"), (-1,), "ids")]
)
# Every column type there is, from the `/serve` schema tests.
COLUMNS = ALL_TYPES
UNNAMED_COLUMNS = Schema([ColSpec(DataType.double), ColSpec(DataType.string)])


ONE_VALUE = b'{"name": "x", "datatype": "FP64", "shape": [1], "data": [1]}'


def tensor(name: str, datatype: str, shape: list[int], data: Any) -> dict[str, Any]:
    return {"name": name, "datatype": datatype, "shape": shape, "data": data}


def split(**columns: list[Any]) -> dict[str, Any]:
    """Named columns as the scoring protocol's split frame."""
    rows = [list(row) for row in zip(*columns.values(), strict=True)]
    return {"dataframe_split": {"columns": list(columns), "data": rows}}


def request(*inputs: dict[str, Any], **extra: Any) -> InferRequest:
    return decode_request(json.dumps({"inputs": list(inputs), **extra}).encode(), None)


def refusal(error: pytest.ExceptionInfo[InvalidInput]) -> tuple[int, list[Any], str]:
    first = error.value.detail[0]
    return error.value.status_code, first["loc"], first["msg"]


# ------------------------------------------------------------------------------------------- routing


@pytest.mark.parametrize(
    ("method", "path", "expected"),
    [
        ("GET", "", Route("server")),
        ("GET", "/", Route("server")),
        ("GET", "/health/live", Route("live")),
        ("GET", "/health/ready", Route("ready")),
        ("GET", "/models/m", Route("metadata", "m")),
        ("GET", "/models/m/ready", Route("model_ready", "m")),
        ("POST", "/models/m/infer", Route("infer", "m")),
        ("GET", "/models/m/versions/3", Route("metadata", "m", "3")),
        ("GET", "/models/m/versions/3/ready", Route("model_ready", "m", "3")),
        ("POST", "/models/m/versions/3/infer", Route("infer", "m", "3")),
        ("POST", "/models/m/versions/latest/infer", Route("infer", "m", "latest")),  # refused on resolve
    ],
)
def test_routes(method: str, path: str, expected: Route) -> None:
    assert match_route(method, path) == expected


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [
        ("GET", "/models", 404),
        ("GET", "/models/m/versions", 404),
        ("GET", "/models/m/versions/3/stats", 404),
        ("GET", "/models/m/config", 404),
        ("GET", "/health", 404),
        ("GET", "xyz", 404),
        ("GET", "/models/m/infer", 405),
        ("POST", "/models/m", 405),
        ("POST", "/health/ready", 405),
    ],
)
def test_unknown_routes_and_methods(method: str, path: str, status: int) -> None:
    with pytest.raises(ServingError) as error:
        match_route(method, path)
    assert error.value.status_code == status


@pytest.mark.parametrize(
    ("path", "header", "expected"),
    [(None, None, None), ("3", None, "3"), (None, "2", "2"), ("3", "3", "3"), ("", "2", "2")],
)
def test_pinned_version(path: str | None, header: str | None, expected: str | None) -> None:
    assert pinned_version(path, header) == expected


def test_path_and_header_versions_must_agree() -> None:
    with pytest.raises(InvalidVersion):
        pinned_version("3", "2")


def test_model_name_must_be_the_served_one() -> None:
    check_model_name("translation_model", "translation_model")
    with pytest.raises(ServingError) as error:
        check_model_name("other", "translation_model")
    assert error.value.status_code == 404 and error.value.code == "unknown_model"


# ------------------------------------------------------------------------------------ request (JSON)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (tensor("x", "FP64", [2, 2], [[1, 2.5], [3, 4]]), Tensor("x", "FP64", (2, 2), [1, 2.5, 3, 4])),
        (tensor("x", "FP64", [2, 2], [1, 2.5, 3, 4]), Tensor("x", "FP64", (2, 2), [1, 2.5, 3, 4])),
        (tensor("s", "BYTES", [2], ["a", "b"]), Tensor("s", "BYTES", (2,), ["a", "b"])),
        (tensor("b", "BOOL", [1, 1], [[True]]), Tensor("b", "BOOL", (1, 1), [True])),
        (tensor("n", "UINT8", [2], [0, 255]), Tensor("n", "UINT8", (2,), [0, 255])),
        (tensor("n", "INT64", [], 7), Tensor("n", "INT64", (), [7])),
    ],
)
def test_json_tensors(raw: dict[str, Any], expected: Tensor) -> None:
    assert request(raw).inputs == (expected,)


def test_request_parameters_id_and_outputs() -> None:
    decoded = request(
        tensor("x", "INT64", [1], [1]),
        id="req-1",
        parameters={"binary_data_output": True, "priority": 1, "temperature": 0.5},
        outputs=[{"name": "a"}, {"name": "b", "parameters": {"binary_data": False}}],
    )
    assert decoded.id == "req-1"
    assert decoded.params == {"temperature": 0.5}  # transport parameters are not the model's params
    assert decoded.binary_output is True
    assert [(out.name, out.binary) for out in decoded.outputs] == [("a", None), ("b", False)]
    assert request(tensor("x", "INT64", [1], [1]), parameters={"priority": 1}).params is None


@pytest.mark.parametrize(
    ("body", "loc", "msg"),
    [
        (b"not json", [], "not JSON"),
        (b"[1]", [], "JSON object"),
        (b'{"inputs": []}', ["inputs"], "non-empty"),
        (b'{"inputs": {"x": 1}}', ["inputs"], "non-empty"),
        (b'{"inputs": [1]}', ["inputs", 0, "name"], "name"),
        (
            b'{"inputs": [{"name": "x", "datatype": "FP64", "shape": [1]}]}',
            ["inputs", "x", "data"],
            "required",
        ),
        (
            b'{"inputs": [{"name": "x", "datatype": "BF16", "shape": [1], "data": [1]}]}',
            ["inputs", "x", "datatype"],
            "one of",
        ),
        (
            b'{"inputs": [{"name": "x", "datatype": "FP64", "shape": [-1], "data": [1]}]}',
            ["inputs", "x", "shape"],
            "non-negative",
        ),
        (
            b'{"inputs": [{"name": "x", "datatype": "FP64", "shape": "2", "data": [1]}]}',
            ["inputs", "x", "shape"],
            "non-negative",
        ),
        (
            b'{"inputs": [{"name": "x", "datatype": "FP64", "shape": [2, 2], "data": [1, 2, 3]}]}',
            ["inputs", "x", "shape"],
            "holds 4 values, data has 3",
        ),
        (
            b'{"inputs": [{"name": "x", "datatype": "FP64", "shape": [1], "data": [true]}]}',
            ["inputs", "x", "data"],
            "cannot hold True",
        ),
        (
            b'{"inputs": [{"name": "x", "datatype": "INT64", "shape": [1], "data": [1.5]}]}',
            ["inputs", "x", "data"],
            "cannot hold 1.5",
        ),
        (
            b'{"inputs": [{"name": "x", "datatype": "INT8", "shape": [1], "data": [300]}]}',
            ["inputs", "x", "data"],
            "[-128, 127]",
        ),
        (
            b'{"inputs": [{"name": "x", "datatype": "BOOL", "shape": [1], "data": [1]}]}',
            ["inputs", "x", "data"],
            "cannot hold 1",
        ),
        (
            b'{"inputs": [{"name": "x", "datatype": "BYTES", "shape": [1], "data": [1]}]}',
            ["inputs", "x", "data"],
            "cannot hold 1",
        ),
        (
            b'{"inputs": [{"name": "x", "datatype": "BYTES", "shape": [1], "data": [null]}]}',
            ["inputs", "x", "data"],
            "cannot hold None",
        ),
        (
            b'{"inputs": [{"name": "x", "datatype": "FP64", "shape": [1], "data": [{}]}]}',
            ["inputs", "x", "data"],
            "cannot hold",
        ),
        (
            b'{"inputs": [' + ONE_VALUE + b", " + ONE_VALUE + b"]}",
            ["inputs"],
            "unique",
        ),
        (
            b'{"inputs": [{"name": "x", "datatype": "FP64", "shape": [1], "data": [1]}], "id": 5}',
            ["id"],
            "string",
        ),
        (
            b'{"inputs": [{"name": "x", "datatype": "FP64", "shape": [1], "data": [1]}], "parameters": []}',
            ["parameters"],
            "JSON object",
        ),
        (
            b'{"inputs": [{"name": "x", "datatype": "FP64", "shape": [1], "data": [1]}], "outputs": [{}]}',
            ["outputs", 0],
            "name",
        ),
        (
            b'{"inputs": [{"name": "x", "datatype": "FP64", "shape": [1], "data": [1]}], "outputs": "y"}',
            ["outputs"],
            "list",
        ),
        (
            b'{"inputs": [{"name": "x", "datatype": "FP64", "shape": [' + b"1," * 40 + b'1], "data": [1]}]}',
            ["inputs", "x", "shape"],
            "at most 32",
        ),
        (b"[" * 100_000 + b"]" * 100_000, [], "not JSON"),
        (b"\xff\xfe", [], "not JSON"),
    ],
)
def test_malformed_requests_are_422_naming_the_field(body: bytes, loc: list[Any], msg: str) -> None:
    with pytest.raises(InvalidInput) as error:
        decode_request(body, None)
    status, found_loc, found_msg = refusal(error)
    assert status == 422
    assert found_loc == loc
    assert msg in found_msg


# ---------------------------------------------------------------------------------- request (binary)


def triton_body(
    inputs: list[triton.InferInput], outputs: list[Any] | None = None
) -> tuple[bytes, str | None]:
    body, json_size = _get_inference_request(inputs, "", outputs, 0, False, False, 0, None, None)
    return body, None if json_size is None else str(json_size)


def triton_input(name: str, array: np.ndarray[Any, Any], datatype: str, *, binary: bool) -> triton.InferInput:
    infer_input = triton.InferInput(name, list(array.shape), datatype)
    infer_input.set_data_from_numpy(array, binary_data=binary)
    return infer_input


@pytest.mark.parametrize("binary", [True, False])
@pytest.mark.parametrize(
    ("array", "datatype"),
    [
        (np.arange(8, dtype=np.float64).reshape(2, 4) / 3, "FP64"),
        (np.arange(6, dtype=np.float32).reshape(3, 2), "FP32"),
        (np.array([-5, 2**40], dtype=np.int64), "INT64"),
        (np.array([0, 65535], dtype=np.uint16), "UINT16"),
        (np.array([True, False, True]), "BOOL"),
        (np.array([["Hello"], ["Grüße"], [""]], dtype=object), "BYTES"),
    ],
)
def test_tritonclient_requests_decode_to_the_same_values(
    array: np.ndarray[Any, Any], datatype: str, binary: bool
) -> None:
    body, header_length = triton_body([triton_input("x", array, datatype, binary=binary)])
    (decoded,) = decode_request(body, header_length).inputs
    assert decoded.shape == array.shape
    expected = array.flatten().tolist()
    if datatype == "BYTES" and binary:  # binary BYTES are raw bytes; JSON carries text
        expected = [value.encode() for value in expected]
    assert decoded.values == expected


def test_binary_and_json_inputs_mix_in_order() -> None:
    first = triton_input("a", np.array([1.5, 2.5]), "FP64", binary=True)
    second = triton_input("b", np.array(["x", "y"], dtype=object), "BYTES", binary=False)
    third = triton_input("c", np.array([7, 8], dtype=np.int32), "INT32", binary=True)
    body, header_length = triton_body([first, second, third])
    decoded = decode_request(body, header_length)
    assert [t.values for t in decoded.inputs] == [[1.5, 2.5], ["x", "y"], [7, 8]]
    assert decoded.binary_output is True  # tritonclient asks for binary outputs when it names none


@pytest.mark.parametrize(
    ("cut", "header", "msg"),
    [
        (-1, None, "past the body's end"),  # a byte short
        (0, "abc", "JSON part's length"),
        (0, "999999", "JSON part's length"),
    ],
)
def test_broken_binary_bodies_are_422(cut: int, header: str | None, msg: str) -> None:
    body, header_length = triton_body([triton_input("a", np.array([1.5, 2.5]), "FP64", binary=True)])
    body = body[: len(body) + cut] if cut else body
    with pytest.raises(InvalidInput) as error:
        decode_request(body, header or header_length)
    assert msg in refusal(error)[2]


def test_bytes_left_after_the_last_tensor_are_422() -> None:
    body, header_length = triton_body([triton_input("a", np.array([1.5]), "FP64", binary=True)])
    with pytest.raises(InvalidInput) as error:
        decode_request(body + b"\x00", header_length)
    assert "after the last binary tensor" in refusal(error)[2]


@pytest.mark.parametrize(
    ("chunk", "datatype", "msg"),
    [
        (b"\x01\x02\x03", "FP64", "whole number"),
        (b"\x05\x00\x00\x00ab", "BYTES", "runs past its tensor"),
        (b"\x05\x00", "BYTES", "cut short"),
    ],
)
def test_malformed_binary_tensors_are_422(chunk: bytes, datatype: str, msg: str) -> None:
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": "x",
                    "datatype": datatype,
                    "shape": [1],
                    "parameters": {"binary_data_size": len(chunk)},
                }
            ]
        }
    ).encode()
    with pytest.raises(InvalidInput) as error:
        decode_request(header + chunk, str(len(header)))
    assert msg in refusal(error)[2]


@pytest.mark.parametrize(
    ("encoding", "compress"),
    [(None, lambda b: b), ("identity", lambda b: b), ("gzip", gzip.compress), ("deflate", zlib.compress)],
)
def test_compressed_bodies(encoding: str | None, compress: Any) -> None:
    assert decompressed(compress(b'{"a": 1}'), encoding, 1024) == b'{"a": 1}'


@pytest.mark.parametrize(
    ("body", "encoding", "status"),
    [
        (b"abc", "br", 415),
        (b"not gzip", "gzip", 422),
        (gzip.compress(b"0" * 10_000), "gzip", 413),  # small on the wire, over the limit unpacked
    ],
)
def test_bad_compressed_bodies(body: bytes, encoding: str, status: int) -> None:
    with pytest.raises(ServingError) as error:
        decompressed(body, encoding, 1024)
    assert error.value.status_code == status


# --------------------------------------------------------------------- request → the scoring protocol


ALL_COLUMNS = [
    tensor("i", "INT32", [2], [1, 2]),
    tensor("l", "INT64", [2, 1], [[3], [4]]),
    tensor("f", "FP32", [2], [1.5, 2.5]),
    tensor("d", "INT16", [2], [5, 6]),  # widens safely
    tensor("b", "BOOL", [2], [True, False]),
    tensor("s", "BYTES", [2], ["a", "b"]),
    tensor("bin", "BYTES", [2], ["xy", "z"]),
    tensor("ts", "BYTES", [2], ["2024-01-01T10:00:00", "2024-01-02T00:00:00"]),
    tensor("arr", "INT64", [2, 2], [[1, 2], [3, 4]]),
    tensor("map", "BYTES", [2], ['{"k": 1.5}', "{}"]),
    tensor("obj", "BYTES", [2], ['{"x": 1}', '{"x": 2}']),
    tensor("anything", "FP64", [2], [0.5, 1]),
    tensor("extra", "FP64", [2], [9, 9]),  # not in the signature: ignored, as MLflow ignores it
]


@pytest.mark.parametrize(
    ("schema", "inputs", "payload", "rows"),
    [
        (PHRASEBOOK, [tensor("prompt", "BYTES", [1], ["Hello"])], split(prompt=["Hello"]), 1),
        (PHRASEBOOK, [tensor("prompt", "BYTES", [2, 1], [["a"], ["b"]])], split(prompt=["a", "b"]), 2),
        (FEATURES, [tensor("input-0", "FP64", [1, 4], [1, 2, 3, 4])], {"inputs": [[1, 2, 3, 4]]}, 1),
        (
            FEATURES,
            [tensor("any name", "FP32", [2, 4], list(range(8)))],
            {"inputs": [[0, 1, 2, 3], [4, 5, 6, 7]]},
            2,
        ),
        (
            NAMED_TENSORS,
            [tensor("ids", "INT32", [1], [7]), tensor("pixels", "FP16", [1, 2], [0.5, 1])],
            {"inputs": {"pixels": [[0.5, 1]], "ids": [7]}},
            1,
        ),
        (
            UNNAMED_COLUMNS,
            [tensor("a", "FP64", [2], [1, 2]), tensor("b", "BYTES", [2], ["x", "y"])],
            {"dataframe_split": {"data": [[1, "x"], [2, "y"]]}},
            2,
        ),
        (None, [tensor("x", "FP64", [2], [1, 2])], {"inputs": [1, 2]}, 2),
        (
            None,
            [tensor("x", "FP64", [1], [1]), tensor("y", "BYTES", [1], ["a"])],
            {"inputs": {"x": [1], "y": ["a"]}},
            1,
        ),
        (
            COLUMNS,
            ALL_COLUMNS,
            split(
                i=[1, 2],
                l=[3, 4],
                f=[1.5, 2.5],
                d=[5, 6],
                b=[True, False],
                s=["a", "b"],
                bin=["eHk=", "eg=="],  # base64, as the scoring protocol carries binary
                ts=["2024-01-01T10:00:00", "2024-01-02T00:00:00"],
                arr=[[1, 2], [3, 4]],
                map=[{"k": 1.5}, {}],
                obj=[{"x": 1}, {"x": 2}],
                anything=[0.5, 1],
            ),
            2,
        ),
    ],
)
def test_tensors_become_scoring_inputs(
    schema: Schema | None, inputs: list[dict[str, Any]], payload: Any, rows: int
) -> None:
    scoring = scoring_input(request(*inputs), schema)
    assert scoring.payload == payload
    assert scoring.rows == rows


def test_params_travel_as_scoring_params() -> None:
    scoring = scoring_input(request(tensor("prompt", "BYTES", [1], ["a"]), parameters={"k": 1}), PHRASEBOOK)
    assert scoring.payload["params"] == {"k": 1}


@pytest.mark.parametrize(
    ("schema", "inputs", "loc", "msg"),
    [
        (PHRASEBOOK, [tensor("promt", "BYTES", [1], ["a"])], ["inputs", "prompt"], "missing"),
        (
            PHRASEBOOK,
            [tensor("prompt", "INT64", [1], [1])],
            ["inputs", "prompt", "datatype"],
            "expected BYTES, got INT64",
        ),
        (
            PHRASEBOOK,
            [tensor("prompt", "BYTES", [1, 2], ["a", "b"])],
            ["inputs", "prompt", "shape"],
            "[n] or [n, 1]",
        ),
        (PHRASEBOOK, [tensor("prompt", "BYTES", [], "a")], ["inputs", "prompt", "shape"], "[n] or [n, 1]"),
        (PHRASEBOOK, [tensor("prompt", "BYTES", [0], [])], ["inputs", "prompt"], "no values"),
        (
            FEATURES,
            [tensor("x", "FP64", [1, 3], [1, 2, 3])],
            ["inputs", "x", "shape"],
            "expected shape [-1, 4]",
        ),
        (
            FEATURES,
            [tensor("x", "FP64", [4], [1, 2, 3, 4])],
            ["inputs", "x", "shape"],
            "expected shape [-1, 4]",
        ),
        (FEATURES, [tensor("x", "BYTES", [1, 4], ["a"] * 4)], ["inputs", "x", "datatype"], "expected FP64"),
        (
            Schema([ColSpec(DataType.long, "n")]),
            [tensor("n", "UINT64", [1], [1])],
            ["inputs", "n", "datatype"],
            "expected INT64",
        ),
        (
            FEATURES,
            [tensor("x", "FP64", [1, 4], [1] * 4), tensor("y", "FP64", [1, 4], [1] * 4)],
            ["inputs"],
            "one tensor",
        ),
        (
            NAMED_TENSORS,
            [tensor("pixels", "FP64", [1, 2], [1, 2]), tensor("ids", "INT64", [1], [1])],
            ["inputs", "pixels", "datatype"],
            "expected FP32",
        ),
        (NAMED_TENSORS, [tensor("pixels", "FP32", [1, 2], [1, 2])], ["inputs", "ids"], "missing"),
        (
            NAMED_TENSORS,
            [tensor("pixels", "FP32", [2, 2], [1, 2, 3, 4]), tensor("ids", "INT64", [1], [1])],
            ["inputs"],
            "as many rows",
        ),
        (UNNAMED_COLUMNS, [tensor("a", "FP64", [1], [1])], ["inputs"], "2 unnamed columns"),
        (
            Schema([ColSpec(DataType.integer, "i")]),
            [tensor("i", "INT64", [1], [1])],
            ["inputs", "i", "datatype"],
            "expected INT32",
        ),
        (
            Schema([ColSpec(DataType.float, "f")]),
            [tensor("f", "FP64", [1], [1])],
            ["inputs", "f", "datatype"],
            "expected FP32",
        ),
        (
            Schema([ColSpec(DataType.string, "s", required=False)]),
            [tensor("t", "BYTES", [1], ["a"])],
            ["inputs"],
            "none of the model's inputs",
        ),
        (
            Schema([ColSpec(Array(DataType.long), "a")]),
            [tensor("a", "INT64", [2], [1, 2])],
            ["inputs", "a", "shape"],
            "2 dimensions",
        ),
        (
            Schema([ColSpec(Map(DataType.long), "m")]),
            [tensor("m", "BYTES", [1], ["{"])],
            ["inputs", "m", "data"],
            "JSON text",
        ),
        (
            Schema([ColSpec(Map(DataType.long), "m")]),
            [tensor("m", "INT64", [1], [1])],
            ["inputs", "m", "datatype"],
            "expected BYTES",
        ),
        (
            Schema([ColSpec(DataType.string, "a"), ColSpec(DataType.string, "b")]),
            [tensor("a", "BYTES", [1], ["x"]), tensor("b", "BYTES", [2], ["x", "y"])],
            ["inputs"],
            "as many rows",
        ),
    ],
)
def test_tensors_off_the_signature_are_422_naming_the_input(
    schema: Schema | None, inputs: list[dict[str, Any]], loc: list[Any], msg: str
) -> None:
    with pytest.raises(InvalidInput) as error:
        scoring_input(request(*inputs), schema)
    status, found_loc, found_msg = refusal(error)
    assert (status, found_loc) == (422, loc)
    assert msg in found_msg


def test_every_finding_is_reported_at_once() -> None:
    schema = Schema(
        [ColSpec(DataType.string, "a"), ColSpec(DataType.long, "b"), ColSpec(DataType.double, "c")]
    )
    with pytest.raises(InvalidInput) as error:
        scoring_input(request(tensor("a", "FP64", [1], [1]), tensor("c", "FP64", [1], [1])), schema)
    assert [item["loc"] for item in error.value.detail] == [["inputs", "a", "datatype"], ["inputs", "b"]]


def test_binary_bytes_reach_text_columns_as_text_and_binary_columns_as_bytes() -> None:
    text = triton_input("s", np.array([b"Gr\xc3\xbc\xc3\x9fe"], dtype=object), "BYTES", binary=True)
    raw = triton_input("bin", np.array([b"\x00\xff"], dtype=object), "BYTES", binary=True)
    body, header_length = triton_body([text, raw])
    schema = Schema([ColSpec(DataType.string, "s"), ColSpec(DataType.binary, "bin")])
    scoring = scoring_input(decode_request(body, header_length), schema)
    assert scoring.payload == split(s=["Grüße"], bin=["AP8="])
    bad = triton_input("s", np.array([b"\xff"], dtype=object), "BYTES", binary=True)
    body, header_length = triton_body([bad, raw])
    with pytest.raises(InvalidInput) as error:
        scoring_input(decode_request(body, header_length), schema)
    assert "UTF-8" in refusal(error)[2]


# The scoring input is what MLflow's parser makes of `/invocations` bodies: same frame, same coercions.
AS_RECORDS = [
    (
        PHRASEBOOK,
        [tensor("prompt", "BYTES", [2], ["Hello", "Bye"])],
        {"dataframe_records": [{"prompt": "Hello"}, {"prompt": "Bye"}]},
    ),
    (
        Schema([ColSpec(DataType.double, "x"), ColSpec(DataType.long, "n"), ColSpec(DataType.datetime, "t")]),
        [
            tensor("x", "INT32", [2], [1, 2]),
            tensor("n", "INT64", [2], [3, 4]),
            tensor("t", "BYTES", [2], ["2024-01-01T10:00:00", "2024-01-02T00:00:00"]),
        ],
        {
            "dataframe_records": [
                {"x": 1, "n": 3, "t": "2024-01-01T10:00:00"},
                {"x": 2, "n": 4, "t": "2024-01-02T00:00:00"},
            ]
        },
    ),
    (FEATURES, [tensor("input-0", "FP64", [2, 4], list(range(8)))], {"inputs": [[0, 1, 2, 3], [4, 5, 6, 7]]}),
    (
        UNNAMED_COLUMNS,
        [tensor("a", "FP32", [2], [1, 2]), tensor("b", "BYTES", [2], ["x", "y"])],
        {"dataframe_records": [[1, "x"], [2, "y"]]},
    ),
    (
        COLUMNS,
        ALL_COLUMNS,
        {
            "dataframe_records": [
                {
                    **{"i": 1, "l": 3, "f": 1.5, "d": 5, "b": True, "s": "a", "bin": "eHk="},
                    **{"ts": "2024-01-01T10:00:00", "arr": [1, 2], "map": {"k": 1.5}, "obj": {"x": 1}},
                    "anything": 0.5,
                },
                {
                    **{"i": 2, "l": 4, "f": 2.5, "d": 6, "b": False, "s": "b", "bin": "eg=="},
                    **{"ts": "2024-01-02T00:00:00", "arr": [3, 4], "map": {}, "obj": {"x": 2}},
                    "anything": 1,
                },
            ]
        },
    ),
    (
        NAMED_TENSORS,
        [tensor("pixels", "FP32", [1, 2], [0.5, 1]), tensor("ids", "INT32", [1], [7])],
        {"inputs": {"pixels": [[0.5, 1]], "ids": [7]}},
    ),
]


def mlflow_parse(body: Any, schema: Schema) -> Any:
    metadata = SimpleNamespace(_is_signature_from_type_hint=lambda: False)
    parsed = scoring_server._parse_json_data(body, metadata, schema)
    data, _ = pyfunc._validate_prediction_input(parsed.data, parsed.params, schema, None)
    return data


@pytest.mark.parametrize(("schema", "inputs", "scoring_body"), AS_RECORDS)
def test_mlflow_parses_the_scoring_input_as_it_parses_invocations(
    schema: Schema, inputs: list[dict[str, Any]], scoring_body: dict[str, Any]
) -> None:
    ours = mlflow_parse(scoring_input(request(*inputs), schema).payload, schema)
    theirs = mlflow_parse(json.dumps(scoring_body), schema)
    if isinstance(ours, pd.DataFrame):
        pd.testing.assert_frame_equal(ours, theirs)
    elif isinstance(ours, dict):
        assert ours.keys() == theirs.keys()
        for name in ours:
            np.testing.assert_array_equal(ours[name], theirs[name])
            assert ours[name].dtype == theirs[name].dtype
    else:
        np.testing.assert_array_equal(ours, theirs)
        assert ours.dtype == theirs.dtype


# ------------------------------------------------------------------------------------------ response


@pytest.mark.parametrize(
    ("items", "schema", "expected"),
    [
        (
            [{"translation_text": "Hallo"}, {"translation_text": "Tschüss"}],
            PHRASEBOOK_OUT,
            [("translation_text", "BYTES", [2], ["Hallo", "Tschüss"])],
        ),
        ([1, 0, 1], LABELS, [("output-0", "INT64", [3], [1, 0, 1])]),
        ([1, 0], Schema([TensorSpec(np.dtype("int32"), (-1,))]), [("output-0", "INT32", [2], [1, 0])]),
        ([0.5, None], None, [("output-0", "FP64", [2], [0.5, None])]),
        ([[0.1, 0.9], [0.8, 0.2]], None, [("output-0", "FP64", [2, 2], [0.1, 0.9, 0.8, 0.2])]),
        ([[1, 2], [3]], None, [("output-0", "BYTES", [2], ["[1, 2]", "[3]"])]),
        ([True, False], None, [("output-0", "BOOL", [2], [True, False])]),
        (["a"], Schema([ColSpec(DataType.string, "label")]), [("label", "BYTES", [1], ["a"])]),
        ([1.5], LABELS, [("output-0", "FP64", [1], [1.5])]),  # values the signature cannot hold: inferred
        (
            [{"a": 1, "b": {"x": 1}}, {"a": 2, "b": {"x": 2}}],
            None,
            [("a", "INT64", [2], [1, 2]), ("b", "BYTES", [2], ['{"x": 1}', '{"x": 2}'])],
        ),
    ],
)
def test_predictions_become_output_tensors(
    items: list[Any], schema: Schema | None, expected: list[tuple[str, str, list[int], list[Any]]]
) -> None:
    found = [(out.name, out.datatype, out.shape, out.data) for out in output_tensors(items, schema)]
    assert found == expected


def infer_result(body: bytes, header_length: int | None) -> triton.InferResult:
    return triton.InferResult.from_response_body(body, header_length=header_length)


@pytest.mark.parametrize("binary", [False, True])
def test_responses_read_back_with_tritonclient(binary: bool) -> None:
    outputs = output_tensors([{"label": 1, "score": 0.25, "text": "Grüße"}] * 2, None)
    decoded = request(tensor("x", "FP64", [1], [1]), id="r1", parameters={"binary_data_output": binary})
    body, header_length = infer_response(outputs, decoded, model_name="m", version="3")
    assert (header_length is not None) == binary
    result = infer_result(body, header_length)
    response = result.get_response()
    assert (response["model_name"], response["model_version"], response["id"]) == ("m", "3", "r1")
    np.testing.assert_array_equal(result.as_numpy("label"), np.array([1, 1], dtype=np.int64))
    np.testing.assert_array_equal(result.as_numpy("score"), np.array([0.25, 0.25]))
    text = result.as_numpy("text")
    assert [value.decode() if isinstance(value, bytes) else value for value in text] == ["Grüße"] * 2


def test_requested_outputs_choose_and_order_and_set_binary_each() -> None:
    outputs = output_tensors([{"a": 1, "b": 2.5}], None)
    decoded = request(
        tensor("x", "FP64", [1], [1]),
        outputs=[{"name": "b", "parameters": {"binary_data": True}}, {"name": "a"}],
    )
    body, header_length = infer_response(outputs, decoded, model_name="m", version="1")
    result = infer_result(body, header_length)
    assert [out["name"] for out in result.get_response()["outputs"]] == ["b", "a"]
    assert "data" not in result.get_output("b") and result.get_output("a")["data"] == [1]
    assert result.as_numpy("b").tolist() == [2.5]


def test_unknown_requested_outputs_are_422() -> None:
    decoded = request(tensor("x", "FP64", [1], [1]), outputs=[{"name": "nope"}])
    with pytest.raises(InvalidInput) as error:
        check_requested_outputs(decoded, PHRASEBOOK_OUT)
    assert refusal(error)[1] == ["outputs", "nope"]
    check_requested_outputs(decoded, None)  # no signature: the prediction decides
    with pytest.raises(InvalidInput):
        infer_response(output_tensors([1], None), decoded, model_name="m", version="1")


# ------------------------------------------------------------------------------------------ metadata


@pytest.mark.parametrize(
    ("inputs", "outputs", "expected_inputs", "expected_outputs"),
    [
        (
            PHRASEBOOK,
            PHRASEBOOK_OUT,
            [{"name": "prompt", "datatype": "BYTES", "shape": [-1]}],
            [{"name": "translation_text", "datatype": "BYTES", "shape": [-1]}],
        ),
        (
            FEATURES,
            LABELS,
            [{"name": "input-0", "datatype": "FP64", "shape": [-1, 4]}],
            [{"name": "output-0", "datatype": "INT64", "shape": [-1]}],
        ),
        (
            NAMED_TENSORS,
            None,
            [
                {"name": "pixels", "datatype": "FP32", "shape": [-1, 2]},
                {"name": "ids", "datatype": "INT64", "shape": [-1]},
            ],
            [],
        ),
        (
            UNNAMED_COLUMNS,
            None,
            [
                {"name": "input-0", "datatype": "FP64", "shape": [-1]},
                {"name": "input-1", "datatype": "BYTES", "shape": [-1]},
            ],
            [],
        ),
        (None, None, [], []),
    ],
)
def test_signatures_become_model_metadata(
    inputs: Schema | None, outputs: Schema | None, expected_inputs: list[Any], expected_outputs: list[Any]
) -> None:
    metadata = model_metadata("m", inputs, outputs, ["1", "3"])
    assert metadata == {
        "name": "m",
        "versions": ["1", "3"],
        "platform": "mlflow",
        "inputs": expected_inputs,
        "outputs": expected_outputs,
    }


def test_every_column_type_has_a_datatype_requests_may_use() -> None:
    published = {entry["name"]: entry for entry in model_metadata("m", COLUMNS, None, [])["inputs"]}
    assert {name: (entry["datatype"], entry["shape"]) for name, entry in published.items()} == {
        "i": ("INT32", [-1]),
        "l": ("INT64", [-1]),
        "f": ("FP32", [-1]),
        "d": ("FP64", [-1]),
        "b": ("BOOL", [-1]),
        "s": ("BYTES", [-1]),
        "bin": ("BYTES", [-1]),
        "ts": ("BYTES", [-1]),
        "arr": ("INT64", [-1, -1]),
        "map": ("BYTES", [-1]),
        "obj": ("BYTES", [-1]),
        "anything": ("BYTES", [-1]),
        "opt": ("BYTES", [-1]),
    }
    # What the metadata publishes is accepted: the table above in request form.
    accepted = {entry["name"]: entry["datatype"] for entry in ALL_COLUMNS}
    assert all(accepted[name] == published[name]["datatype"] for name in ("i", "l", "f", "b", "s", "arr"))


# --------------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("app_error", "expected"),
    [
        (
            {"error": "incompatible_signature", "message": "version 3 is not compatible", "detail": [1]},
            {"error": "version 3 is not compatible", "code": "incompatible_signature", "detail": [1]},
        ),
        (
            {"error": "internal_error", "message": "the server failed", "error_id": "ab"},
            {"error": "the server failed", "code": "internal_error", "error_id": "ab"},
        ),
        ({"error": "unauthorized"}, {"error": "unauthorized", "code": "unauthorized"}),
    ],
)
def test_errors_carry_the_message_in_error_and_the_code_beside_it(
    app_error: dict[str, Any], expected: dict[str, Any]
) -> None:
    assert error_body(app_error) == expected
