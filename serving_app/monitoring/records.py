"""One request's payload record: its id, whether it is sampled, and what the replica learns while
answering it. Cheap on the request path: references only; the writer encodes them later."""

from __future__ import annotations

import dataclasses
import hashlib
import re
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import pandas as pd

REQUEST_ID_HEADER = "X-Request-Id"
# What a client's request id may be: echoed in a header and written to the sink, so a bounded token.
_REQUEST_ID_RE = re.compile(r"[A-Za-z0-9._:/+=@-]{1,128}")
# Sampling decisions are made on a grid of 1,000,000 points.
_GRID = 1_000_000

Choice = Literal["default", "pinned", "canary", "shadow"]


def request_id(sent: str | None) -> str:
    """The client's `X-Request-Id` when it is a plain bounded token, else a new one."""
    if sent is not None and _REQUEST_ID_RE.fullmatch(sent):
        return sent
    return uuid.uuid4().hex


def sampled(request_id: str, rate: float) -> bool:
    """Whether a request is logged, fixed by its id: one decision per request, the same on every
    replica and for its shadow answer (a hash of the id, not a draw)."""
    if rate <= 0.0:
        return False
    if rate >= 1.0:
        return True
    digest = hashlib.blake2b(request_id.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") % _GRID < rate * _GRID


@dataclass
class PayloadCapture:
    """Filled in while one sampled request is answered."""

    request_id: str
    route: str
    started_at: float = field(default_factory=time.time)
    model_input: Any = None  # what the model was given (a DataFrame, ndarray or dict of them)
    rows: int = 0
    outputs: list[Any] | None = None
    signature: Any = None  # the answering version's MLflow signature: the columns' names and types
    error_code: str | None = None
    sampled: bool = True  # logged as a payload record (the window figures count every request)
    model: Any = field(
        default=None, repr=False
    )  # the answering version's model (its reference is profiled with it)


@dataclass(frozen=True)
class ColumnArrays:
    """A frame's columns as arrays: what a queued record keeps of a DataFrame input. A DataFrame is
    dozens of objects the garbage collector walks on every pass while thousands wait in the queue;
    its arrays are not tracked at all."""

    arrays: Mapping[str, np.ndarray]
    rows: int

    def records(self) -> list[dict[str, Any]]:
        lists = {name: array.tolist() for name, array in self.arrays.items()}
        return [{name: values[i] for name, values in lists.items()} for i in range(self.rows)]


def compact(model_input: Any) -> Any:
    """A DataFrame input as `ColumnArrays` (views of one array: a mixed frame's is of objects); anything
    else as it is."""
    if isinstance(model_input, pd.DataFrame):
        values = model_input.to_numpy()
        names = [str(name) for name in model_input.columns]
        if values.ndim == 2 and values.shape[1] == len(names):
            return ColumnArrays({name: values[:, i] for i, name in enumerate(names)}, len(model_input))
        return ColumnArrays(
            {str(name): column.to_numpy() for name, column in model_input.items()}, len(model_input)
        )
    return model_input


def settled(record: PayloadRecord) -> PayloadRecord:
    """What a queued record keeps: its input compacted (done by the writer, off the request path)."""
    compacted = compact(record.model_input)
    return record if compacted is record.model_input else dataclasses.replace(record, model_input=compacted)


@dataclass(frozen=True)
class PayloadRecord:
    request_id: str
    at: float  # seconds since the epoch, when the request arrived
    model: str
    version: str | None
    choice: Choice
    route: str
    status: int
    error_code: str | None
    latency_ms: float
    model_input: Any
    rows: int
    outputs: list[Any] | None
    signature: Any = None


def record_of(
    capture: PayloadCapture,
    *,
    model: str,
    version: str | None,
    choice: Choice,
    status: int,
    latency_ms: float,
) -> PayloadRecord:
    return PayloadRecord(
        request_id=capture.request_id,
        at=capture.started_at,
        model=model,
        version=version,
        choice=choice,
        route=capture.route,
        status=status,
        error_code=capture.error_code,
        latency_ms=latency_ms,
        model_input=capture.model_input,
        rows=capture.rows,
        outputs=capture.outputs,
        signature=capture.signature,
    )
