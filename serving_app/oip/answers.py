"""Predictions as output tensors (JSON or Triton's binary tensor data, which Triton's clients ask
for by default), signatures as model metadata, and errors in the protocol's form."""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from mlflow.types.schema import Schema, TensorSpec

from serving_app.oip.datatypes import (
    DATATYPES,
    column_datatype,
    column_form,
    flatten,
    is_number,
    numpy_datatype,
    values_problem,
)
from serving_app.oip.infer_request import SCHEMA_MISMATCH, InferRequest, problem, refuse

# How tensors a signature leaves unnamed are called (MLServer's convention): input-0, output-0, ...
INPUT_PREFIX = "input-"
OUTPUT_PREFIX = "output-"
DEFAULT_OUTPUT_NAME = f"{OUTPUT_PREFIX}0"
EXTENSIONS = ("binary_tensor_data",)


@dataclass(frozen=True)
class OutputTensor:
    name: str
    datatype: str
    shape: list[int]
    data: list[Any]  # flat, row-major


def output_tensors(items: Sequence[Any], schema: Schema | None) -> list[OutputTensor]:
    """Predictions (one JSON-ready item per input row) as output tensors: one per named output
    (dict items), or one tensor whose rows are the items."""
    specs = _output_specs(schema)
    if items and all(isinstance(item, dict) for item in items):
        names = list(dict.fromkeys(name for item in items for name in item))
        return [_output(name, [item.get(name) for item in items], specs.get(name)) for name in names]
    name = next(iter(specs)) if len(specs) == 1 else DEFAULT_OUTPUT_NAME
    return [_output(name, list(items), specs.get(name))]


def _output_specs(schema: Schema | None) -> dict[str, str]:
    """Each signature output's published datatype, by the name it answers under."""
    if schema is None:
        return {}
    return {entry["name"]: entry["datatype"] for entry in tensor_metadata(schema, OUTPUT_PREFIX)}


def _output(name: str, rows: list[Any], declared: str | None) -> OutputTensor:
    shape = _rectangular_shape(rows)
    if shape is None:  # ragged or structured rows: one JSON text per row
        texts = [row if isinstance(row, str) else json.dumps(row) for row in rows]
        return OutputTensor(name, "BYTES", [len(rows)], texts)
    flat = flatten(rows)
    datatype = declared if declared and _values_fit_output(flat, declared) else _inferred_datatype(flat)
    if datatype == "BYTES":
        flat = [value if isinstance(value, str) else json.dumps(value) for value in flat]
    return OutputTensor(name, datatype, shape, flat)


def _rectangular_shape(rows: list[Any]) -> list[int] | None:
    shape = [len(rows)]
    level = rows
    while level and isinstance(level[0], list):
        width = len(level[0])
        if not all(isinstance(item, list) and len(item) == width for item in level):
            return None
        shape.append(width)
        level = [value for item in level for value in item]
    if any(isinstance(value, list | dict) for value in level):
        return None
    return shape


def _values_fit_output(values: list[Any], datatype: str) -> bool:
    if datatype == "BYTES":
        return all(isinstance(value, str) for value in values)
    if datatype.startswith("FP"):  # NaN travels as null: numpy reads it back as nan
        return all(value is None or is_number(value) for value in values)
    return values_problem(values, datatype) is None


def _inferred_datatype(values: list[Any]) -> str:
    if values and all(isinstance(value, bool) for value in values):
        return "BOOL"
    if values and all(is_number(value) and isinstance(value, int) for value in values):
        return "INT64"
    if values and all(value is None or is_number(value) for value in values):
        return "FP64"
    return "BYTES"


def infer_response(
    outputs: Sequence[OutputTensor], request: InferRequest, *, model_name: str, version: str
) -> tuple[bytes, int | None]:
    """The response body, and the JSON part's length when binary tensor data follows it."""
    chosen = _chosen_outputs(outputs, request)
    document: dict[str, Any] = {"model_name": model_name, "model_version": version}
    if request.id is not None:
        document["id"] = request.id
    entries, chunks = [], []
    for output, binary in chosen:
        entry: dict[str, Any] = {"name": output.name, "datatype": output.datatype, "shape": output.shape}
        if binary:
            chunk = _to_binary(output)
            entry["parameters"] = {"binary_data_size": len(chunk)}
            chunks.append(chunk)
        else:
            entry["data"] = output.data
        entries.append(entry)
    document["outputs"] = entries
    header = json.dumps(document, separators=(",", ":"), allow_nan=False).encode()
    if not chunks:
        return header, None
    return header + b"".join(chunks), len(header)


def check_requested_outputs(request: InferRequest, schema: Schema | None) -> None:
    """Refuse outputs the signature does not have before the model runs (without a signature the
    prediction's own outputs decide, afterwards)."""
    known = [entry["name"] for entry in tensor_metadata(schema, OUTPUT_PREFIX)]
    unknown = [wanted.name for wanted in request.outputs if wanted.name not in known]
    if known and unknown:
        message = f"the model has no output {unknown[0]!r}; it has {known}"
        raise refuse(SCHEMA_MISMATCH, [problem(["outputs", unknown[0]], message)])


def _chosen_outputs(
    outputs: Sequence[OutputTensor], request: InferRequest
) -> list[tuple[OutputTensor, bool]]:
    if not request.outputs:
        return [(output, request.binary_output) for output in outputs]
    by_name = {output.name: output for output in outputs}
    unknown = [wanted.name for wanted in request.outputs if wanted.name not in by_name]
    if unknown:
        message = f"the model has no output {unknown[0]!r}; it has {sorted(by_name)}"
        raise refuse(SCHEMA_MISMATCH, [problem(["outputs", unknown[0]], message)])
    return [
        (by_name[wanted.name], request.binary_output if wanted.binary is None else wanted.binary)
        for wanted in request.outputs
    ]


def _to_binary(output: OutputTensor) -> bytes:
    if output.datatype == "BYTES":
        encoded = [value.encode() if isinstance(value, str) else bytes(value) for value in output.data]
        return b"".join(struct.pack("<I", len(value)) + value for value in encoded)
    dtype = DATATYPES[output.datatype].newbyteorder("<")
    data = [math.nan if value is None else value for value in output.data]
    return np.asarray(data, dtype=dtype).tobytes()


def model_metadata(
    model_name: str, inputs: Schema | None, outputs: Schema | None, versions: Sequence[str]
) -> dict[str, Any]:
    """Model metadata as the protocol has it: inputs and outputs with datatype and shape."""
    return {
        "name": model_name,
        "versions": list(versions),
        "platform": "mlflow",
        "inputs": tensor_metadata(inputs, INPUT_PREFIX),
        "outputs": tensor_metadata(outputs, OUTPUT_PREFIX),
    }


def tensor_metadata(schema: Schema | None, unnamed_prefix: str) -> list[dict[str, Any]]:
    """A schema's tensors with datatype and shape: a column is a tensor of shape [-1] (one more -1 per
    Array level); unnamed ones are called by position."""
    if schema is None:
        return []
    entries = []
    for index, spec in enumerate(schema.inputs):
        name = str(spec.name) if spec.name else f"{unnamed_prefix}{index}"
        if isinstance(spec, TensorSpec):
            entries.append({"name": name, "datatype": numpy_datatype(spec.type), "shape": list(spec.shape)})
        else:
            depth, leaf = column_form(spec.type)
            entries.append({"name": name, "datatype": column_datatype(leaf), "shape": [-1] * (depth + 1)})
    return entries


def server_metadata(version: str) -> dict[str, Any]:
    return {"name": "regserve", "version": version, "extensions": list(EXTENSIONS)}


def error_body(app_error: dict[str, Any]) -> dict[str, Any]:
    """An error answer in the protocol's form: `error` is the message clients show; the app's stable
    code moves to `code`, detail and error id stay."""
    rest = {key: value for key, value in app_error.items() if key not in ("error", "message")}
    return {"error": app_error.get("message", app_error.get("error")), "code": app_error.get("error"), **rest}
