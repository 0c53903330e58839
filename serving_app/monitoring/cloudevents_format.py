"""KServe's payload logger format: each record as two binary-mode CloudEvents (`ce-type`
`org.kubeflow.serving.inference.request` / `.response`, `ce-id` the request id, the extension
attributes `inferenceservicename`, `namespace`, `component` and `endpoint`), so receivers built for
KServe's payload logger take them unchanged. Our own attributes say more: `modelversion`, `choice`
(default, pinned, canary, shadow) and `statuscode`.

Light on purpose: the sender process imports this and nothing of the model's stack."""

from __future__ import annotations

import datetime
import re
from dataclasses import dataclass
from typing import NamedTuple

REQUEST_TYPE = "org.kubeflow.serving.inference.request"
RESPONSE_TYPE = "org.kubeflow.serving.inference.response"

MAX_HEADERS = 16
MAX_HEADER_VALUE = 4096
_HEADER_NAME = re.compile(r"[A-Za-z0-9!#$%&'*+.^_`|~-]{1,64}")
# Headers the event itself sets: a Secret must not change what the receiver is told.
_RESERVED = ("ce-", "content-type", "content-length", "host", "transfer-encoding", "connection")


class SinkHeadersInvalid(ValueError):
    """The headers text is not `Name: value` lines within the bounds (the text is never quoted)."""


def parse_headers(text: str | None) -> dict[str, str]:
    """Extra headers for the receiver (an `Authorization` line, typically), one `Name: value` per line."""
    headers: dict[str, str] = {}
    for number, line in enumerate((text or "").splitlines(), start=1):
        if not line.strip():
            continue
        name, colon, value = line.partition(":")
        name, value = name.strip(), value.strip()
        if not colon or not _HEADER_NAME.fullmatch(name):
            raise SinkHeadersInvalid(f"line {number}: not `Name: value` with a plain header name")
        if name.lower().startswith(_RESERVED):
            raise SinkHeadersInvalid(f"line {number}: the header {name} is set by the event itself")
        if len(value) > MAX_HEADER_VALUE or any(ord(char) < 32 or ord(char) == 127 for char in value):
            raise SinkHeadersInvalid(f"line {number}: the value is too long or holds control characters")
        headers[name] = value
        if len(headers) > MAX_HEADERS:
            raise SinkHeadersInvalid(f"more than {MAX_HEADERS} headers")
    return headers


class EventPair(NamedTuple):  # a tuple: thousands a batch are pickled to the sender
    """A record's request and response events as the replica hands them to its sender process: the
    bodies encoded, the attributes that differ per record; the sender adds the rest."""

    request_id: str
    at: float
    version: str | None
    choice: str
    status: int
    asked: bytes
    answered: bytes


def _endpoint(choice: str) -> str:
    # KServe's `endpoint` is the predictor that answered: `default` or `canary`.
    return "canary" if choice == "canary" else "shadow" if choice == "shadow" else "default"


@dataclass(frozen=True)
class EventSource:
    """What every event of a resource says about where it comes from."""

    source: str
    resource: str
    namespace: str


def event_headers(pair: EventPair, origin: EventSource) -> tuple[dict[str, str], dict[str, str]]:
    """The request and response events' binary-mode headers."""
    common = {
        "ce-specversion": "1.0",
        "ce-id": pair.request_id,
        "ce-source": origin.source,
        "ce-time": datetime.datetime.fromtimestamp(pair.at, tz=datetime.UTC).isoformat(),
        "ce-inferenceservicename": origin.resource,
        "ce-namespace": origin.namespace,
        "ce-component": "predictor",
        "ce-endpoint": _endpoint(pair.choice),
        "ce-modelversion": pair.version or "",
        "ce-choice": pair.choice,
        "ce-statuscode": str(pair.status),
        "content-type": "application/json",
    }
    return {**common, "ce-type": REQUEST_TYPE}, {**common, "ce-type": RESPONSE_TYPE}
