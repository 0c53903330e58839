"""MLflow's scoring protocol for `/invocations`, parsed by MLflow's own scoring-server code.

Reusing it keeps every input format (`dataframe_split`, `dataframe_records`, `instances`, `inputs`,
`params`, CSV) and its type coercions (ISO datetimes, base64 binary) exactly as `mlflow models serve`
has them, so MLflow clients work unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass
from io import StringIO
from typing import Any

import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import BAD_REQUEST
from mlflow.pyfunc import scoring_server

from serving_app.errors import UnsupportedMediaType
from serving_app.registry import LoadedVersion


@dataclass(frozen=True)
class ParsedInvocation:
    data: Any
    params: dict[str, Any] | None
    rows: int


def parse_invocation(body: bytes, content_type: str, default: LoadedVersion) -> ParsedInvocation:
    mime = content_type.split(";")[0].strip().lower()
    input_schema = default.signature.inputs if default.signature else None
    if mime == "text/csv":
        try:
            text = body.decode("utf-8")
        except UnicodeDecodeError as error:
            raise MlflowException(f"CSV body is not UTF-8: {error}", error_code=BAD_REQUEST) from error
        data = scoring_server.parse_csv_input(StringIO(text), schema=input_schema)  # type: ignore[arg-type]
        return ParsedInvocation(data, None, _rows(data))
    if mime != "application/json":
        raise UnsupportedMediaType(f"/invocations takes application/json or text/csv, got {content_type!r}")
    parsed = scoring_server._parse_json_data(body, default.model.metadata, input_schema)
    return ParsedInvocation(parsed.data, parsed.params, _rows(parsed.data))


def _rows(data: Any) -> int:
    if isinstance(data, pd.DataFrame | pd.Series | np.ndarray | list):
        return len(data)
    if isinstance(data, dict) and data:
        first = next(iter(data.values()))
        return len(first) if hasattr(first, "__len__") and not isinstance(first, str) else 1
    return 1
