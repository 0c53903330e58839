"""An inference request: its JSON (and Triton's binary tensor data), decoded and checked, then put in the
MLflow scoring protocol's `inputs` form so that MLflow's own parser and schema enforcement (the ones
`/invocations` runs) coerce and check the values.

What the protocol itself can check (names, shapes, datatypes against the signature) is checked here
first, with field-level detail as `/serve` gives it.
"""

from __future__ import annotations

import base64
import json
import math
import struct
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from mlflow.types.schema import AnyType, Array, ColSpec, DataType, Map, Object, Schema, TensorSpec

from serving_app.errors import BodyTooLarge, InvalidInput, UnsupportedMediaType
from serving_app.oip.datatypes import (
    COLUMN_DATATYPES,
    DATATYPES,
    column_datatype,
    column_form,
    fits_dtype,
    flatten,
    nest,
    numpy_datatype,
    values_problem,
)

HEADER_LENGTH = "inference-header-content-length"
# Request parameters about transport and scheduling (Triton's and KServe's), never the model's params.
TRANSPORT_PARAMETERS = frozenset(
    {"binary_data_output", "sequence_id", "sequence_start", "sequence_end", "priority", "timeout", "headers"}
)
# numpy's own limit is 64; no model input needs more, and each level costs a pass when nesting.
MAX_RANK = 32
PROTOCOL_MISMATCH = "request body does not follow the Open Inference Protocol"
SCHEMA_MISMATCH = "request body does not match the model's input schema"


@dataclass(frozen=True)
class Tensor:
    """One request input: values flat in row-major order."""

    name: str
    datatype: str
    shape: tuple[int, ...]
    values: list[Any]

    @property
    def rows(self) -> int:
        return self.shape[0] if self.shape else 1


@dataclass(frozen=True)
class RequestedOutput:
    name: str
    binary: bool | None  # None: as the request's `binary_data_output` says


@dataclass(frozen=True)
class InferRequest:
    id: str | None
    inputs: tuple[Tensor, ...]
    outputs: tuple[RequestedOutput, ...]
    params: dict[str, Any] | None  # the model's params: request parameters less the transport ones
    binary_output: bool


@dataclass(frozen=True)
class ScoringInput:
    """A request in the MLflow scoring protocol's form, ready for MLflow's parser."""

    payload: dict[str, Any]
    rows: int


def problem(loc: Sequence[str | int], msg: str, kind: str = "value_error") -> dict[str, Any]:
    """One field-level finding, shaped as `/serve` reports them."""
    return {"loc": list(loc), "msg": msg, "type": kind}


def refuse(message: str, problems: list[dict[str, Any]]) -> InvalidInput:
    return InvalidInput(message, detail=problems)


def decompressed(body: bytes, encoding: str | None, limit: int) -> bytes:
    """The body as sent before `Content-Encoding` (Triton's clients may gzip or deflate it), held to
    the same size limit as an uncompressed body."""
    if not encoding or encoding.lower() == "identity":
        return body
    wbits = {"gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}.get(encoding.lower())
    if wbits is None:
        raise UnsupportedMediaType(f"content-encoding {encoding!r} is not gzip, deflate or identity")
    decompressor = zlib.decompressobj(wbits)
    try:
        data = decompressor.decompress(body, limit + 1)
    except zlib.error:
        raise refuse(PROTOCOL_MISMATCH, [problem([], f"the body is not valid {encoding} data")]) from None
    if len(data) > limit:
        raise BodyTooLarge(f"request body exceeds the limit of {limit} bytes once decompressed")
    return data


def decode_request(body: bytes, header_length: str | None) -> InferRequest:
    """An inference request's JSON (and binary tensor data, when the header splits the body)."""
    document, binary = _split_body(body, header_length)
    if not isinstance(document, dict):
        raise refuse(PROTOCOL_MISMATCH, [problem([], "the body must be a JSON object")])
    raw_inputs = document.get("inputs")
    if not isinstance(raw_inputs, list) or not raw_inputs:
        raise refuse(PROTOCOL_MISMATCH, [problem(["inputs"], "a non-empty list of tensors is required")])
    reader = _BinaryReader(binary)
    inputs = tuple(_decode_tensor(raw, index, reader) for index, raw in enumerate(raw_inputs))
    reader.finish()
    names = [tensor.name for tensor in inputs]
    if len(set(names)) != len(names):
        raise refuse(PROTOCOL_MISMATCH, [problem(["inputs"], "input names must be unique")])
    parameters = _mapping(document.get("parameters"), ["parameters"])
    params = {key: value for key, value in parameters.items() if key not in TRANSPORT_PARAMETERS}
    return InferRequest(
        id=_request_id(document.get("id")),
        inputs=inputs,
        outputs=_requested_outputs(document.get("outputs")),
        params=params or None,
        binary_output=parameters.get("binary_data_output") is True,
    )


def _split_body(body: bytes, header_length: str | None) -> tuple[Any, bytes]:
    length = len(body)
    if header_length is not None:
        if not header_length.isdigit() or int(header_length) > len(body):
            raise refuse(
                PROTOCOL_MISMATCH,
                [problem(["headers", HEADER_LENGTH], "must be the JSON part's length in bytes")],
            )
        length = int(header_length)
    try:
        return json.loads(body[:length]), body[length:]
    except (RecursionError, UnicodeDecodeError, ValueError) as error:
        raise refuse(PROTOCOL_MISMATCH, [problem([], f"not JSON: {type(error).__name__}")]) from None


def _mapping(value: Any, loc: list[str | int]) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise refuse(PROTOCOL_MISMATCH, [problem(loc, "must be a JSON object")])
    return value


def _request_id(value: Any) -> str | None:
    if value is None or isinstance(value, str):
        return value
    raise refuse(PROTOCOL_MISMATCH, [problem(["id"], "must be a string")])


def _requested_outputs(value: Any) -> tuple[RequestedOutput, ...]:
    if value is None:
        return ()
    if not isinstance(value, list):
        raise refuse(PROTOCOL_MISMATCH, [problem(["outputs"], "must be a list")])
    outputs = []
    for index, raw in enumerate(value):
        if not isinstance(raw, dict) or not isinstance(raw.get("name"), str):
            raise refuse(PROTOCOL_MISMATCH, [problem(["outputs", index], "each needs a name")])
        binary = _mapping(raw.get("parameters"), ["outputs", index, "parameters"]).get("binary_data")
        outputs.append(RequestedOutput(raw["name"], binary if isinstance(binary, bool) else None))
    return tuple(outputs)


def _decode_tensor(raw: Any, index: int, reader: _BinaryReader) -> Tensor:
    name, datatype, shape, parameters = _tensor_header(raw, index)
    loc: list[str | int] = ["inputs", name]
    size = parameters.get("binary_data_size")
    if size is not None:
        if not _is_count(size) or "data" in raw:
            raise refuse(
                PROTOCOL_MISMATCH,
                [problem([*loc, "parameters"], "binary_data_size: a byte count, and no data beside it")],
            )
        values = _from_binary(reader.take(size, loc), datatype, loc)
    else:
        if "data" not in raw:
            raise refuse(PROTOCOL_MISMATCH, [problem([*loc, "data"], "data is required", "missing")])
        values = flatten(raw["data"])
        if message := values_problem(values, datatype):
            raise refuse(PROTOCOL_MISMATCH, [problem([*loc, "data"], message, "type_error")])
    if len(values) != math.prod(shape):
        message = f"shape {list(shape)} holds {math.prod(shape)} values, data has {len(values)}"
        raise refuse(PROTOCOL_MISMATCH, [problem([*loc, "shape"], message)])
    return Tensor(name, datatype, shape, values)


def _tensor_header(raw: Any, index: int) -> tuple[str, str, tuple[int, ...], dict[str, Any]]:
    if not isinstance(raw, dict) or not isinstance(raw.get("name"), str) or not raw["name"]:
        raise refuse(PROTOCOL_MISMATCH, [problem(["inputs", index, "name"], "each input needs a name")])
    name = raw["name"]
    datatype = raw.get("datatype")
    if datatype not in DATATYPES:
        message = f"datatype must be one of {', '.join(DATATYPES)}; got {datatype!r}"
        raise refuse(PROTOCOL_MISMATCH, [problem(["inputs", name, "datatype"], message)])
    shape = raw.get("shape")
    if not isinstance(shape, list) or len(shape) > MAX_RANK or not all(_is_count(dim) for dim in shape):
        message = f"shape must be a list of at most {MAX_RANK} non-negative integers"
        raise refuse(PROTOCOL_MISMATCH, [problem(["inputs", name, "shape"], message)])
    return name, datatype, tuple(shape), _mapping(raw.get("parameters"), ["inputs", name, "parameters"])


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


class _BinaryReader:
    """Binary tensor data after the JSON part, taken in input order."""

    def __init__(self, data: bytes):
        self._data = memoryview(data)
        self._offset = 0

    def take(self, size: int, loc: list[str | int]) -> bytes:
        if self._offset + size > len(self._data):
            raise refuse(PROTOCOL_MISMATCH, [problem(loc, "binary_data_size runs past the body's end")])
        chunk = bytes(self._data[self._offset : self._offset + size])
        self._offset += size
        return chunk

    def finish(self) -> None:
        if self._offset != len(self._data):
            left = len(self._data) - self._offset
            raise refuse(PROTOCOL_MISMATCH, [problem([], f"{left} bytes after the last binary tensor")])


def _from_binary(chunk: bytes, datatype: str, loc: list[str | int]) -> list[Any]:
    if datatype == "BYTES":
        return _bytes_elements(chunk, loc)
    dtype = DATATYPES[datatype].newbyteorder("<")
    if len(chunk) % dtype.itemsize:
        message = f"{len(chunk)} bytes are not a whole number of {datatype} values"
        raise refuse(PROTOCOL_MISMATCH, [problem(loc, message)])
    values: list[Any] = np.frombuffer(chunk, dtype=dtype).tolist()
    return values


def _bytes_elements(chunk: bytes, loc: list[str | int]) -> list[Any]:
    """BYTES elements in binary form: each a little-endian uint32 length, then that many bytes."""
    elements, offset = [], 0
    while offset < len(chunk):
        if offset + 4 > len(chunk):
            raise refuse(PROTOCOL_MISMATCH, [problem(loc, "BYTES element length cut short")])
        (length,) = struct.unpack_from("<I", chunk, offset)
        offset += 4
        if offset + length > len(chunk):
            raise refuse(PROTOCOL_MISMATCH, [problem(loc, "BYTES element runs past its tensor")])
        elements.append(bytes(chunk[offset : offset + length]))
        offset += length
    return elements


def scoring_input(request: InferRequest, schema: Schema | None) -> ScoringInput:
    """The request's tensors in the scoring protocol's form (plus `params`), checked against the
    signature's names, shapes and datatypes; types are then coerced and enforced by MLflow."""
    empty = [tensor.name for tensor in request.inputs if math.prod(tensor.shape) == 0]
    if empty:
        raise refuse(SCHEMA_MISMATCH, [problem(["inputs", empty[0]], "the tensor holds no values")])
    payload, rows = _scoring_payload(request.inputs, schema)
    if request.params:
        payload["params"] = request.params
    return ScoringInput(payload, rows)


def _scoring_payload(tensors: Sequence[Tensor], schema: Schema | None) -> tuple[dict[str, Any], int]:
    if schema is None:
        inputs, rows = _free_inputs(tensors)
    elif schema.is_tensor_spec():
        inputs, rows = _tensor_inputs(tensors, schema.inputs)
    else:
        # Columns travel as a split frame: MLflow's columnar `inputs` form wants names and converts
        # neither arrays, maps and objects nor base64 binary.
        return _columns(tensors, schema.inputs)
    return {"inputs": inputs}, rows


def _columns(tensors: Sequence[Tensor], specs: Sequence[Any]) -> tuple[dict[str, Any], int]:
    if all(spec.name for spec in specs):
        columns, rows = _named_columns(tensors, specs)
        frame = {"columns": list(columns), "data": _rows_of(list(columns.values()))}
        return {"dataframe_split": frame}, rows
    values, rows = _unnamed_columns(tensors, specs)
    return {"dataframe_split": {"data": _rows_of(values)}}, rows


def _rows_of(columns: list[list[Any]]) -> list[list[Any]]:
    return [list(row) for row in zip(*columns, strict=True)]


def _free_inputs(tensors: Sequence[Tensor]) -> tuple[Any, int]:
    """No signature: one tensor as itself, several by name."""
    if len(tensors) == 1:
        return _nested(tensors[0]), tensors[0].rows
    return {tensor.name: _nested(tensor) for tensor in tensors}, tensors[0].rows


def _tensor_inputs(tensors: Sequence[Tensor], specs: Sequence[Any]) -> tuple[Any, int]:
    if len(specs) == 1 and not specs[0].name:
        if len(tensors) != 1:
            message = f"the model takes one tensor, got {len(tensors)}"
            raise refuse(SCHEMA_MISMATCH, [problem(["inputs"], message)])
        _check_all([_tensor_problem(tensors[0], specs[0])])
        return _nested(tensors[0]), tensors[0].rows
    by_name = {tensor.name: tensor for tensor in tensors}
    _check_all(
        _tensor_problem(by_name[str(spec.name)], spec) if spec.name in by_name else _missing(str(spec.name))
        for spec in specs
    )
    chosen = [by_name[str(spec.name)] for spec in specs]
    _check_all([_same_rows(chosen)])
    return {tensor.name: _nested(tensor) for tensor in chosen}, chosen[0].rows


def _named_columns(tensors: Sequence[Tensor], specs: Sequence[Any]) -> tuple[dict[str, list[Any]], int]:
    by_name = {tensor.name: tensor for tensor in tensors}
    findings = []
    for spec in specs:
        tensor = by_name.get(str(spec.name))
        if tensor is not None:
            findings.append(_column_problem(tensor, spec.type))
        elif spec.required:
            findings.append(_missing(str(spec.name)))
    _check_all(findings)
    chosen = [by_name[str(spec.name)] for spec in specs if str(spec.name) in by_name]
    if not chosen:
        names = [str(spec.name) for spec in specs]
        raise refuse(SCHEMA_MISMATCH, [problem(["inputs"], f"none of the model's inputs {names} given")])
    _check_all([_same_rows(chosen)])
    columns = {tensor.name: _column_values(tensor, spec.type) for tensor, spec in _paired(chosen, specs)}
    return columns, chosen[0].rows


def _unnamed_columns(tensors: Sequence[Tensor], specs: Sequence[Any]) -> tuple[list[list[Any]], int]:
    """Columns the signature leaves unnamed are taken by position, one tensor each."""
    if len(tensors) != len(specs):
        message = f"the model takes {len(specs)} unnamed columns, one tensor each; got {len(tensors)}"
        raise refuse(SCHEMA_MISMATCH, [problem(["inputs"], message)])
    _check_all([_column_problem(tensor, spec.type) for tensor, spec in zip(tensors, specs, strict=True)])
    _check_all([_same_rows(tensors)])
    columns = [_column_values(tensor, spec.type) for tensor, spec in zip(tensors, specs, strict=True)]
    return columns, tensors[0].rows


def _paired(tensors: Sequence[Tensor], specs: Sequence[ColSpec]) -> list[tuple[Tensor, ColSpec]]:
    by_name = {str(spec.name): spec for spec in specs}
    return [(tensor, by_name[tensor.name]) for tensor in tensors]


def _missing(name: str) -> dict[str, Any]:
    return problem(["inputs", name], "required input is missing", "missing")


def _check_all(findings: Iterable[dict[str, Any] | None]) -> None:
    problems = [finding for finding in findings if finding is not None]
    if problems:
        raise refuse(SCHEMA_MISMATCH, problems)


def _same_rows(tensors: Sequence[Tensor]) -> dict[str, Any] | None:
    rows = {tensor.name: tensor.rows for tensor in tensors}
    if len(set(rows.values())) > 1:
        return problem(["inputs"], f"inputs must have as many rows each; got {rows}")
    return None


def _tensor_problem(tensor: Tensor, spec: TensorSpec) -> dict[str, Any] | None:
    loc = ["inputs", tensor.name]
    if not fits_dtype(tensor.datatype, spec.type):
        return problem([*loc, "datatype"], f"expected {numpy_datatype(spec.type)}, got {tensor.datatype}")
    expected = tuple(spec.shape)
    fits = len(expected) == len(tensor.shape) and all(
        want in (-1, got) for want, got in zip(expected, tensor.shape, strict=True)
    )
    if not fits:
        return problem([*loc, "shape"], f"expected shape {list(expected)}, got {list(tensor.shape)}")
    return None


def _column_problem(tensor: Tensor, column_type: Any) -> dict[str, Any] | None:
    """A column is one tensor of shape [n] or [n, 1]; an Array column's rows are its tensor's rows."""
    loc = ["inputs", tensor.name]
    depth, leaf = column_form(column_type)
    if not _column_accepts(leaf, tensor.datatype):
        return problem([*loc, "datatype"], f"expected {column_datatype(leaf)}, got {tensor.datatype}")
    scalar_shape = len(tensor.shape) == 1 or (len(tensor.shape) == 2 and tensor.shape[1] == 1)
    if depth == 0 and not scalar_shape:
        return problem([*loc, "shape"], f"a column is shaped [n] or [n, 1], got {list(tensor.shape)}")
    if depth > 0 and len(tensor.shape) != depth + 1:
        message = f"an array column of depth {depth} is shaped with {depth + 1} dimensions"
        return problem([*loc, "shape"], f"{message}, got {list(tensor.shape)}")
    return None


def _column_accepts(leaf: Any, datatype: str) -> bool:
    if isinstance(leaf, AnyType):
        return True
    if isinstance(leaf, Object | Map | Array):
        return datatype == "BYTES"  # JSON text, one element per row
    if isinstance(leaf, DataType):
        expected = COLUMN_DATATYPES.get(leaf)
        if expected == "BYTES" or datatype == "BYTES":
            return expected == datatype
        return expected is not None and fits_dtype(datatype, DATATYPES[expected])
    return False


def _column_values(tensor: Tensor, column_type: Any) -> list[Any]:
    depth, leaf = column_form(column_type)
    values = [_text_or_bytes(value, leaf, tensor.name) for value in tensor.values]
    if isinstance(leaf, Object | Map | Array):
        values = [_json_element(value, tensor.name) for value in values]
    return nest(values, tensor.shape) if depth else values


def _text_or_bytes(value: Any, leaf: Any, name: str) -> Any:
    """BYTES elements as the column wants them: binary columns take the raw bytes (JSON text as its
    UTF-8), in the base64 a scoring-protocol frame carries them in; the rest take text."""
    if leaf == DataType.binary:
        return base64.b64encode(value.encode() if isinstance(value, str) else value).decode("ascii")
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            raise refuse(SCHEMA_MISMATCH, [problem(["inputs", name, "data"], "text is not UTF-8")]) from None
    return value


def _json_element(value: Any, name: str) -> Any:
    try:
        return json.loads(value)
    except (RecursionError, ValueError):
        message = "each element of an object column is JSON text"
        raise refuse(SCHEMA_MISMATCH, [problem(["inputs", name, "data"], message)]) from None


def _nested(tensor: Tensor) -> Any:
    values = [_as_text(value) for value in tensor.values] if tensor.datatype == "BYTES" else tensor.values
    return nest(values, tensor.shape)


def _as_text(value: Any) -> Any:
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            return value
    return value
