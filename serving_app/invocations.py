"""MLflow's scoring protocol for `/invocations`, parsed by MLflow's own scoring-server code.

Reusing it keeps every input format (`dataframe_split`, `dataframe_records`, `instances`, `inputs`,
`params`, CSV) and its type coercions (ISO datetimes, base64 binary) exactly as `mlflow models serve`
has them, so MLflow clients work unchanged. The common JSON shapes with well-typed values skip it
(`serving_app.fastparse`, tested to give the same model input); everything else still goes through it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from io import StringIO
from typing import Any

import numpy as np
import pandas as pd
from mlflow import pyfunc
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import BAD_REQUEST
from mlflow.pyfunc import scoring_server

from serving_app import fastparse
from serving_app.errors import UnsupportedMediaType
from serving_app.fastparse import FastPlan
from serving_app.registry import LoadedVersion


@dataclass(frozen=True)
class ParsedInvocation:
    data: Any
    params: dict[str, Any] | None
    rows: int
    enforced: bool  # against the default version's signature (CSV bodies are not: predict enforces them)


def parse_invocation(
    body: bytes, content_type: str, default: LoadedVersion, plan: FastPlan | None = None
) -> ParsedInvocation:
    """`plan` (the default version's, from its API schema) lets the common JSON bodies skip MLflow's
    parser (`serving_app.fastparse`); any body it does not take goes through MLflow's."""
    mime = content_type.split(";")[0].strip().lower()
    input_schema = default.signature.inputs if default.signature else None
    if mime == "text/csv":
        try:
            text = body.decode("utf-8")
        except UnicodeDecodeError as error:
            raise MlflowException(f"CSV body is not UTF-8: {error}", error_code=BAD_REQUEST) from error
        data = scoring_server.parse_csv_input(StringIO(text), schema=input_schema)  # type: ignore[arg-type]
        return ParsedInvocation(data, None, _rows(data), enforced=False)
    if mime != "application/json":
        raise UnsupportedMediaType(f"/invocations takes application/json or text/csv, got {content_type!r}")
    if plan is not None:
        try:
            payload = json.loads(body)
        except (RecursionError, ValueError):  # MLflow's parser reports it in its own words
            payload = None
        fast = fastparse.parse(payload, plan)
        if fast is not None:
            return ParsedInvocation(fast.data, None, fast.rows, enforced=True)
        if isinstance(payload, dict):
            body = payload  # type: ignore[assignment]  # decoded once; MLflow takes the object too
    data, params = parse_scoring_json(body, default)
    return ParsedInvocation(data, params, _rows(data), enforced=True)


def parse_scoring_json(json_input: bytes | dict[str, Any], default: LoadedVersion) -> tuple[Any, Any]:
    """A scoring-protocol JSON body (or the object it decodes to) as MLflow's scoring server parses
    it, enforced against the default version's signature: `/invocations` and the Open Inference
    Protocol's `infer` share it."""
    input_schema = default.signature.inputs if default.signature else None
    try:
        parsed = scoring_server._parse_json_data(json_input, default.model.metadata, input_schema)
    except (RecursionError, ValueError) as error:  # nesting too deep for json, or not JSON at all
        raise MlflowException(
            f"the body is not valid JSON input: {type(error).__name__}", BAD_REQUEST
        ) from None
    return enforce_signature(parsed.data, parsed.params, default)


def enforce_signature(data: Any, params: dict[str, Any] | None, default: LoadedVersion) -> tuple[Any, Any]:
    """Check the input against the default version's signature before predicting, so a body off the
    signature is the caller's error (422), not the model's (500). Pinned versions are compatible with
    the default, so its schema holds for them too."""
    signature = default.signature
    if signature is None:
        return data, params
    # MLflow's own enforcement (the one predict() runs), so coercions match exactly.
    return pyfunc._validate_prediction_input(data, params, signature.inputs, signature.params)


def _rows(data: Any) -> int:
    if isinstance(data, pd.DataFrame | pd.Series | np.ndarray | list):
        return len(data)
    if isinstance(data, dict) and data:
        first = next(iter(data.values()))
        return len(first) if hasattr(first, "__len__") and not isinstance(first, str) else 1
    return 1
