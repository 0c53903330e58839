"""The CloudEvents sink (`cloudevents_format`: KServe's payload logger format). The replica encodes each
record's bodies; a sender process of its own posts the events (`event_sender`), so the two HTTP requests
a record costs are spent neither on the replica's loop nor under its GIL."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from serving_app.monitoring.cloudevents_format import EventPair, EventSource, event_headers
from serving_app.monitoring.event_sender import SenderProcess, SenderSettings
from serving_app.monitoring.records import ColumnArrays, PayloadRecord
from serving_app.monitoring.table import plain

_JSON = json.JSONEncoder(default=str)  # holds settings only: safe to share


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


def event_pair(record: PayloadRecord, include: Sequence[str]) -> EventPair:
    # A request that failed before its input parsed still gets its request event (an empty body).
    asked = request_body(record) if "inputs" in include and record.model_input is not None else {}
    answered = response_body(record) if "outputs" in include or record.outputs is None else {}
    return EventPair(
        record.request_id,
        record.at,
        record.version,
        record.choice,
        record.status,
        _JSON.encode(asked).encode(),
        _JSON.encode(answered).encode(),
    )


def events(
    record: PayloadRecord, *, source: str, resource: str, namespace: str, include: Sequence[str]
) -> list[tuple[dict[str, str], bytes]]:
    """(headers, body) of the record's request and response events."""
    pair = event_pair(record, include)
    asked, answered = event_headers(pair, EventSource(source, resource, namespace))
    return [(asked, pair.asked), (answered, pair.answered)]


class EventsRefused(RuntimeError):
    """The receiver answered an event with a status that is not a success."""

    def __init__(self, status: int) -> None:
        super().__init__(f"the receiver answered {status}")
        self.status = status
        self.error_name = f"ReceiverAnswered{status}"  # what the payload log reports (`PayloadLog`)


class EventsUndelivered(RuntimeError):
    """Events did not reach the receiver: `error_name` is the sender's error type (never its text)."""

    def __init__(self, error_name: str) -> None:
        super().__init__(error_name)
        self.error_name = error_name


class CloudEventsSink:
    """The replica's side: encodes each batch's bodies and hands the batch to a sender process of its
    own, which posts the events (two HTTP requests a record, KServe's format) off the replica's loop
    and out of its process. The sender is started on the first write and again after it died; it is
    given the receiver and its headers through its stdin, never its command line or environment."""

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
        self.settings = SenderSettings(url, dict(headers), EventSource(source, resource, namespace))
        self.include = tuple(include)
        self._sender: SenderProcess | None = None

    async def write(self, records: Sequence[PayloadRecord]) -> None:
        pairs = [event_pair(record, self.include) for record in records]
        if self._sender is None or not self._sender.alive:
            self._sender = await SenderProcess.start(self.settings)
        outcome = await self._sender.send(pairs)
        if outcome.refused_status is not None:
            raise EventsRefused(outcome.refused_status)
        if outcome.error is not None:
            raise EventsUndelivered(outcome.error)

    async def close(self) -> None:
        if self._sender is not None:
            await self._sender.stop()
            self._sender = None
