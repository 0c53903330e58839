"""The CloudEvents sink: each record as two binary-mode CloudEvents in KServe's logger format (`ce-type`
`org.kubeflow.serving.inference.request` / `.response`, `ce-id` the request id, the extension
attributes `inferenceservicename`, `namespace`, `component` and `endpoint`), so receivers built for
KServe's payload logger take them unchanged. Our own attributes say more: `modelversion`, `choice`
(default, pinned, canary, shadow) and `statuscode`."""

from __future__ import annotations

import asyncio
import datetime
import json
import re
from collections.abc import Mapping, Sequence
from typing import Any

import aiohttp

from serving_app.monitoring.records import ColumnArrays, PayloadRecord
from serving_app.monitoring.table import plain

REQUEST_TYPE = "org.kubeflow.serving.inference.request"
RESPONSE_TYPE = "org.kubeflow.serving.inference.response"
POST_TIMEOUT_S = 10.0
CONCURRENT_POSTS = 8

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


def _endpoint(record: PayloadRecord) -> str:
    # KServe's `endpoint` is the predictor that answered: `default` or `canary`.
    return "canary" if record.choice == "canary" else "shadow" if record.choice == "shadow" else "default"


def request_body(record: PayloadRecord) -> dict[str, Any]:
    """The input in MLflow's scoring format: records for a frame, `inputs` for anything else."""
    model_input = record.model_input
    if isinstance(model_input, ColumnArrays):
        return {"dataframe_records": plain(model_input.records())}
    if hasattr(model_input, "to_dict") and hasattr(model_input, "columns"):
        return {"dataframe_records": plain(model_input.to_dict(orient="records"))}
    return {"inputs": plain(model_input)}


def response_body(record: PayloadRecord) -> dict[str, Any]:
    if record.outputs is not None:
        return {"predictions": plain(record.outputs)}
    return {"error": record.error_code or "error", "status": record.status}


def events(
    record: PayloadRecord, *, source: str, resource: str, namespace: str, include: Sequence[str]
) -> list[tuple[dict[str, str], bytes]]:
    """(headers, body) of the record's request and response events."""
    moment = datetime.datetime.fromtimestamp(record.at, tz=datetime.UTC).isoformat()
    common = {
        "ce-specversion": "1.0",
        "ce-id": record.request_id,
        "ce-source": source,
        "ce-time": moment,
        "ce-inferenceservicename": resource,
        "ce-namespace": namespace,
        "ce-component": "predictor",
        "ce-endpoint": _endpoint(record),
        "ce-modelversion": record.version or "",
        "ce-choice": record.choice,
        "ce-statuscode": str(record.status),
        "content-type": "application/json",
    }
    # A request that failed before its input parsed still gets its request event (an empty body).
    asked = request_body(record) if "inputs" in include and record.model_input is not None else {}
    answered = response_body(record) if "outputs" in include or record.outputs is None else {}
    return [
        ({**common, "ce-type": REQUEST_TYPE}, json.dumps(asked, default=str).encode()),
        ({**common, "ce-type": RESPONSE_TYPE}, json.dumps(answered, default=str).encode()),
    ]


class CloudEventsSink:
    def __init__(
        self,
        url: str,
        *,
        headers: Mapping[str, str],
        source: str,
        resource: str,
        namespace: str,
        include: Sequence[str],
    ) -> None:
        self.url = url
        self.headers = dict(headers)
        self.source = source
        self.resource = resource
        self.namespace = namespace
        self.include = tuple(include)
        self._session: aiohttp.ClientSession | None = None

    async def write(self, records: Sequence[PayloadRecord]) -> None:
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=POST_TIMEOUT_S))
        session = self._session
        gate = asyncio.Semaphore(CONCURRENT_POSTS)

        async def post(headers: dict[str, str], body: bytes) -> None:
            # No redirects: the Secret's headers go to the receiver named in the spec and nowhere else.
            async with (
                gate,
                session.post(
                    self.url, data=body, headers={**self.headers, **headers}, allow_redirects=False
                ) as answer,
            ):
                await answer.read()
                if answer.status >= 300:
                    raise aiohttp.ClientResponseError(
                        answer.request_info, (), status=answer.status, message="receiver refused the event"
                    )

        posts = [
            post(headers, body)
            for record in records
            for headers, body in events(
                record,
                source=self.source,
                resource=self.resource,
                namespace=self.namespace,
                include=self.include,
            )
        ]
        results = await asyncio.gather(*posts, return_exceptions=True)
        if failed := next((result for result in results if isinstance(result, BaseException)), None):
            raise failed

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
