"""The candidate's smoke test: predict the version's own MLflow input example, or a one-row payload
synthesized from its signature when it has none, before any request may reach it.

`synthesize_input` is pure; `smoke_input` reads the example from the registry (blocking); `run_smoke`
predicts it and says passed or failed in the serving error codes. Nothing here raises.
"""

from __future__ import annotations

import asyncio
import datetime as dt
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from mlflow.models.signature import ModelSignature
from mlflow.types.schema import AnyType, Array, ColSpec, DataType, Map, Object, Schema, TensorSpec

from serving_app.convert import prediction_items
from serving_app.counters import SmokeResult
from serving_app.errors import ServingError
from serving_app.mlmodel import models_uri
from serving_app.mlmodel_client import classify
from serving_app.registry import LoadedVersion, serving_error

_SCALARS: dict[DataType, Any] = {
    DataType.boolean: False,
    DataType.integer: 0,
    DataType.long: 0,
    DataType.float: 0.0,
    DataType.double: 0.0,
    DataType.string: "a",
    DataType.binary: b"a",
    DataType.datetime: dt.datetime(2000, 1, 1),
}


@dataclass(frozen=True)
class SmokeInput:
    data: Any
    params: dict[str, Any] | None
    source: str  # "input_example" or "signature"


def sample_value(kind: Any) -> Any:
    """One value of a column type: scalars, and `Array`/`Object`/`Map`/`AnyType` built from them."""
    if isinstance(kind, DataType):
        return _SCALARS[kind]
    if isinstance(kind, Array):
        return [sample_value(kind.dtype)]
    if isinstance(kind, Object):
        return {prop.name: sample_value(prop.dtype) for prop in kind.properties}
    if isinstance(kind, Map):
        return {"a": sample_value(kind.value_type)}
    if isinstance(kind, AnyType):
        return "a"
    raise ValueError(f"no sample value for column type {kind!r}")


def _column(spec: ColSpec) -> pd.Series:
    value = sample_value(spec.type)
    if isinstance(spec.type, DataType):
        return pd.Series([value], dtype=spec.type.to_pandas())
    return pd.Series([value], dtype=object)


def _tensor(spec: TensorSpec) -> np.ndarray:
    shape = tuple(1 if size == -1 else size for size in spec.shape)
    dtype = np.dtype(spec.type)
    if dtype.kind in "OUS":
        return np.full(shape, "a", dtype=dtype if dtype.kind != "U" else object)
    return np.zeros(shape, dtype=dtype)


def synthesize_input(inputs: Schema) -> Any:
    """One row (one batch item) of type-appropriate values for an input schema: a DataFrame for
    columns, an array for an unnamed tensor, a dict of arrays for named tensors."""
    specs = inputs.inputs
    if inputs.is_tensor_spec():
        tensors = [spec for spec in specs if isinstance(spec, TensorSpec)]
        if not inputs.has_input_names():
            return _tensor(tensors[0])
        return {spec.name: _tensor(spec) for spec in tensors}
    columns = [spec for spec in specs if isinstance(spec, ColSpec)]
    if not inputs.has_input_names():
        return pd.DataFrame({index: _column(spec) for index, spec in enumerate(columns)})
    return pd.DataFrame({spec.name: _column(spec) for spec in columns})


def smoke_input(loaded: LoadedVersion, model_uri: str) -> SmokeInput | None:
    """The version's input example (with its params), else a payload from its signature, else None.
    Blocking: reads the example file through the registry."""
    meta = loaded.model.metadata
    if meta.saved_input_example_info:
        example = meta.load_input_example(model_uri)
        if example is not None:
            return SmokeInput(example, meta.load_input_example_params(model_uri), "input_example")
    signature: ModelSignature | None = loaded.signature
    if signature is not None and signature.inputs is not None:
        return SmokeInput(synthesize_input(signature.inputs), None, "signature")
    return None


def _predict(loaded: LoadedVersion, model_name: str) -> str:
    model_uri = models_uri(model_name, loaded.version)
    try:
        payload = smoke_input(loaded, model_uri)
    except Exception as error:  # reading the example: the registry's outcome, in its codes
        raise serving_error(classify(error, model_uri), model_name, loaded.version) from error
    if payload is None:
        return "nothing to predict: no input example and no signature"
    prediction = loaded.model.predict(payload.data, payload.params)
    prediction_items(prediction)  # the answer must convert to JSON as a client's would
    return f"predicted its {payload.source.replace('_', ' ')}"


async def run_smoke(loaded: LoadedVersion, model_name: str) -> SmokeResult:
    """Predict the candidate's example off the event loop; any failure is a failed result (reading
    the example: `registry_unavailable`, `unknown_version`, `version_load_failed`; predicting it:
    `prediction_failed`)."""
    try:
        note = await asyncio.to_thread(_predict, loaded, model_name)
    except ServingError as error:
        return SmokeResult.failed(loaded.version, error.code, error.message)
    except Exception as error:  # the model's own code, or its example unreadable
        message = f"version {loaded.version} failed its smoke test: {type(error).__name__}: {error}"
        return SmokeResult.failed(loaded.version, "prediction_failed", message)
    return SmokeResult(loaded.version, "passed", None, note)
