"""The CloudEvents sink: the headers Secret's parsing, each record's pair of events, and posting them
to a receiver (a loopback HTTP server started here) through the sink's real sender process."""

from __future__ import annotations

import asyncio
import json
import subprocess
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from regserve_operator.sandbox.processes import free_port

from serving_app.monitoring.cloudevents_format import (
    MAX_HEADER_VALUE,
    MAX_HEADERS,
    REQUEST_TYPE,
    RESPONSE_TYPE,
    SinkHeadersInvalid,
    parse_headers,
)
from serving_app.monitoring.cloudevents_sink import (
    CloudEventsSink,
    EventsRefused,
    EventsUndelivered,
    events,
)
from serving_app.monitoring.records import Choice, PayloadRecord
from tests.support.event_receiver import EventReceiver

SECRET = "SECRETVALUE"
ALL = ("inputs", "outputs")
AT = 1_700_000_000.25
SOURCE = "/regserve/team-a/iris"

# ---------------------------------------------------------------------------------------- headers

GOOD_HEADERS = {
    "none": (None, {}),
    "empty": ("", {}),
    "authorization": (f"Authorization: Bearer {SECRET}", {"Authorization": f"Bearer {SECRET}"}),
    "blank-lines-and-crlf": ("\n\nX-A: 1\r\n\r\n  \nX-B: 2\n", {"X-A": "1", "X-B": "2"}),
    "spaces-trimmed": ("  X-A  :   v w  ", {"X-A": "v w"}),
    "colon-in-value": ("X-Url: http://a:8080/b", {"X-Url": "http://a:8080/b"}),
    "empty-value": ("X-Empty:", {"X-Empty": ""}),
    "token-chars-in-name": ("X!#$%&'*+.^_`|~-1: v", {"X!#$%&'*+.^_`|~-1": "v"}),
    "longest-name": (f"{'N' * 64}: v", {"N" * 64: "v"}),
    "longest-value": (f"X-A: {'v' * MAX_HEADER_VALUE}", {"X-A": "v" * MAX_HEADER_VALUE}),
    "most-headers": (
        "\n".join(f"X-{n}: {n}" for n in range(MAX_HEADERS)),
        {f"X-{n}": str(n) for n in range(MAX_HEADERS)},
    ),
    "repeated-name-last-wins": ("\n".join(f"X-A: {n}" for n in range(40)), {"X-A": "39"}),
    "reserved-word-inside-name": ("X-Ce-Host: v", {"X-Ce-Host": "v"}),
    # A bare CR ends a line: it never gets into a value.
    "bare-cr-ends-a-line": ("X-A: 1\rX-B: 2", {"X-A": "1", "X-B": "2"}),
}


@pytest.mark.parametrize(("text", "expected"), GOOD_HEADERS.values(), ids=GOOD_HEADERS.keys())
def test_parse_headers(text: str | None, expected: dict[str, str]) -> None:
    assert parse_headers(text) == expected


BAD_HEADERS = {
    "missing-colon": f"Authorization Bearer {SECRET}",
    "missing-colon-after-good": f"X-A: 1\nBearer {SECRET}",
    "space-in-name": f"X Bad: {SECRET}",
    "at-in-name": f"X@Bad: {SECRET}",
    "empty-name": f": {SECRET}",
    "non-ascii-name": f"X-\u00e9: {SECRET}",
    "name-too-long": f"{'N' * 65}: {SECRET}",
    "ce-attribute": f"ce-id: {SECRET}",
    "ce-attribute-upper": f"CE-Type: {SECRET}",
    "content-type": f"Content-Type: {SECRET}",
    "content-length": f"content-length: {SECRET}",
    "host": f"Host: {SECRET}",
    "transfer-encoding": f"Transfer-Encoding: {SECRET}",
    "connection": f"Connection: {SECRET}",
    "bare-cr-split-value": f"X-A: a\r{SECRET}",
    "nul-in-value": f"X-A: {SECRET}\x00",
    "tab-in-value": f"X-A: {SECRET}\tb",
    "escape-in-value": f"X-A: {SECRET}\x1b[31m",
    "del-in-value": f"X-A: {SECRET}\x7f",
    "next-line-in-value": f"X-A: a\x85{SECRET}",
    "value-too-long": f"X-A: {SECRET}{'v' * MAX_HEADER_VALUE}",
    "too-many-headers": "\n".join(f"X-{n}: {SECRET}{n}" for n in range(MAX_HEADERS + 1)),
}


@pytest.mark.parametrize("text", BAD_HEADERS.values(), ids=BAD_HEADERS.keys())
def test_parse_headers_refuses_without_quoting_the_value(text: str) -> None:
    with pytest.raises(SinkHeadersInvalid) as refused:
        parse_headers(text)
    assert SECRET not in str(refused.value)
    assert SECRET not in repr(refused.value)
    assert all(SECRET not in str(arg) for arg in refused.value.args)


# ----------------------------------------------------------------------------------------- events


def record(
    choice: Choice = "default",
    *,
    model_input: Any = None,
    outputs: list[Any] | None = None,
    status: int = 200,
    error_code: str | None = None,
    version: str | None = "3",
) -> PayloadRecord:
    return PayloadRecord(
        request_id="req-1",
        at=AT,
        model="iris",
        version=version,
        choice=choice,
        route="/invocations",
        status=status,
        error_code=error_code,
        latency_ms=2.5,
        model_input=model_input,
        rows=0 if model_input is None else len(model_input),
        outputs=outputs,
    )


def answered(choice: Choice = "default", **changes: Any) -> PayloadRecord:
    model_input = pd.DataFrame({"x": [1.0, np.nan], "s": ["a", "b"]})
    return record(choice, **{"model_input": model_input, "outputs": [np.float32(0.5), 1], **changes})


def event_pair(
    item: PayloadRecord, include: Sequence[str] = ALL
) -> tuple[dict[str, str], Any, dict[str, str], Any]:
    (ask_headers, ask_body), (answer_headers, answer_body) = events(
        item, source=SOURCE, resource="iris", namespace="team-a", include=include
    )
    return ask_headers, json.loads(ask_body), answer_headers, json.loads(answer_body)


@dataclass(frozen=True)
class EventCase:
    record: PayloadRecord
    endpoint: str
    request_body: Any
    response_body: Any
    include: tuple[str, ...] = ALL


FRAME_RECORDS = {"dataframe_records": [{"x": 1.0, "s": "a"}, {"x": None, "s": "b"}]}
PREDICTIONS = {"predictions": [0.5, 1]}
EVENT_CASES = {
    "default": EventCase(answered(), "default", FRAME_RECORDS, PREDICTIONS),
    "pinned": EventCase(answered("pinned"), "default", FRAME_RECORDS, PREDICTIONS),
    "canary": EventCase(answered("canary"), "canary", FRAME_RECORDS, PREDICTIONS),
    "shadow": EventCase(answered("shadow"), "shadow", FRAME_RECORDS, PREDICTIONS),
    "failed-before-input": EventCase(
        record(status=400, error_code="invalid_input"),
        "default",
        {},
        {"error": "invalid_input", "status": 400},
    ),
    "failed-with-input": EventCase(
        answered(outputs=None, status=500, error_code="prediction_failed"),
        "default",
        FRAME_RECORDS,
        {"error": "prediction_failed", "status": 500},
    ),
    "failed-without-code": EventCase(record(status=503), "default", {}, {"error": "error", "status": 503}),
    "shadow-failed": EventCase(
        answered("shadow", outputs=None, status=500, error_code="prediction_failed"),
        "shadow",
        FRAME_RECORDS,
        {"error": "prediction_failed", "status": 500},
    ),
    "ndarray-input": EventCase(
        record(model_input=np.array([[1.0, np.nan]]), outputs=[[0.1, 0.9]]),
        "default",
        {"inputs": [[1.0, None]]},
        {"predictions": [[0.1, 0.9]]},
    ),
    "dict-input": EventCase(
        record(model_input={"a": np.array([1, 2]), "b": "t"}, outputs=["x"]),
        "default",
        {"inputs": {"a": [1, 2], "b": "t"}},
        {"predictions": ["x"]},
    ),
    "outputs-only": EventCase(answered(), "default", {}, PREDICTIONS, ("outputs",)),
    "inputs-only": EventCase(answered(), "default", FRAME_RECORDS, {}, ("inputs",)),
    "neither": EventCase(answered(), "default", {}, {}, ()),
    # A failure's response event says what went wrong whatever `include` says: it holds no payload.
    "failed-inputs-only": EventCase(
        record(status=400, error_code="invalid_input"),
        "default",
        {},
        {"error": "invalid_input", "status": 400},
        ("inputs",),
    ),
}


@pytest.mark.parametrize("case", EVENT_CASES.values(), ids=EVENT_CASES.keys())
def test_each_record_is_a_request_and_a_response_event(case: EventCase) -> None:
    ask, ask_body, answer, answer_body = event_pair(case.record, case.include)
    assert (ask["ce-type"], answer["ce-type"]) == (REQUEST_TYPE, RESPONSE_TYPE)
    common = {
        "ce-specversion": "1.0",
        "ce-id": "req-1",
        "ce-source": SOURCE,
        "ce-time": "2023-11-14T22:13:20.250000+00:00",
        "ce-inferenceservicename": "iris",
        "ce-namespace": "team-a",
        "ce-component": "predictor",
        "ce-endpoint": case.endpoint,
        "ce-modelversion": "3",
        "ce-choice": case.record.choice,
        "ce-statuscode": str(case.record.status),
        "content-type": "application/json",
    }
    assert ask == {**common, "ce-type": REQUEST_TYPE}
    assert answer == {**common, "ce-type": RESPONSE_TYPE}
    assert ask_body == case.request_body
    assert answer_body == case.response_body


def test_a_record_without_a_version_has_an_empty_version_attribute() -> None:
    ask, _, answer, _ = event_pair(record(version=None, status=401, error_code="unauthorized"))
    assert ask["ce-modelversion"] == answer["ce-modelversion"] == ""


def test_bodies_are_strict_json() -> None:
    item = answered(outputs=[float("nan"), np.float64("inf"), np.int64(2)])
    for _, body in events(item, source=SOURCE, resource="iris", namespace="team-a", include=ALL):
        json.loads(body, parse_constant=lambda name: pytest.fail(f"{name} in a body"))


# -------------------------------------------------------------------------------------- the sink


@pytest.fixture
def serve() -> Iterator[Any]:
    """Starts loopback receivers; each is stopped at the end of the test."""
    receivers: list[EventReceiver] = []

    def start(receiver: EventReceiver) -> str:
        receivers.append(receiver.start())
        return receiver.url

    yield start
    for receiver in receivers:
        receiver.stop()


def sink(url: str, include: Sequence[str] = ALL) -> CloudEventsSink:
    return CloudEventsSink(
        url,
        headers={"Authorization": f"Bearer {SECRET}", "X-Api-Key": SECRET},
        source=SOURCE,
        resource="iris",
        namespace="team-a",
        include=include,
    )


def write(target: CloudEventsSink, records: Sequence[PayloadRecord]) -> None:
    async def scenario() -> None:
        try:
            await target.write(records)
        finally:
            await target.close()

    asyncio.run(scenario())


def test_write_posts_every_event_with_the_extra_headers(serve: Any) -> None:
    receiver = EventReceiver()
    records = [answered(), answered("canary"), record(status=400, error_code="invalid_input")]
    write(sink(serve(receiver)), records)
    assert len(receiver.received) == 6
    for headers, body in receiver.received:
        assert headers["authorization"] == f"Bearer {SECRET}"
        assert headers["x-api-key"] == SECRET
        assert headers["content-type"] == "application/json"
        assert headers["ce-id"] == "req-1"
        json.loads(body)
    kinds = sorted((h["ce-endpoint"], h["ce-type"], h["ce-statuscode"]) for h, _ in receiver.received)
    assert kinds == sorted(
        (endpoint, kind, status)
        for endpoint, status in [("default", "200"), ("canary", "200"), ("default", "400")]
        for kind in (REQUEST_TYPE, RESPONSE_TYPE)
    )
    bodies = [json.loads(b) for h, b in receiver.received if h["ce-type"] == REQUEST_TYPE]
    assert bodies.count(FRAME_RECORDS) == 2


def test_write_of_many_records_posts_them_all(serve: Any) -> None:
    receiver = EventReceiver()
    records = [answered() for _ in range(25)]  # more events than posts at once
    write(sink(serve(receiver)), records)
    assert len(receiver.received) == 50


def test_the_sender_process_is_reused_stopped_at_close_and_started_again_after_it_died(serve: Any) -> None:
    receiver = EventReceiver()
    target = sink(serve(receiver))

    async def scenario() -> None:
        await target.write([answered()])
        sender = target._sender
        assert sender is not None and sender.alive
        await target.write([answered("shadow")])
        assert target._sender is sender
        sender.kill()
        await sender.process.wait()
        await target.write([answered("canary")])  # a new sender
        assert target._sender is not sender and target._sender is not None and target._sender.alive
        again = target._sender
        await target.close()
        assert target._sender is None and again.process.returncode == 0  # stopped by the end of its stdin
        await target.close()  # twice is fine

    asyncio.run(scenario())
    assert len(receiver.received) == 6


def process_files(pid: int) -> tuple[bytes, bytes]:
    return Path(f"/proc/{pid}/environ").read_bytes(), Path(f"/proc/{pid}/cmdline").read_bytes()


def test_the_sender_gets_neither_the_headers_nor_the_replicas_environment(
    serve: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PAYLOAD_HEADERS", f"Authorization: Bearer {SECRET}")
    target = sink(serve(EventReceiver()))

    async def scenario() -> tuple[bytes, bytes]:
        try:
            await target.write([answered()])
            assert target._sender is not None
            return await asyncio.to_thread(process_files, target._sender.pid)
        finally:
            await target.close()

    environ, cmdline = asyncio.run(scenario())
    assert sorted(entry.split(b"=")[0] for entry in environ.split(b"\0") if entry) == [b"PATH", b"PYTHONPATH"]
    assert SECRET.encode() not in environ + cmdline


@pytest.mark.parametrize("status", [400, 404, 500, 503])
def test_a_receiver_refusing_makes_write_raise(serve: Any, status: int) -> None:
    receiver = EventReceiver(status=status)
    with pytest.raises(EventsRefused) as refused:
        write(sink(serve(receiver)), [answered()])
    assert refused.value.status == status
    assert refused.value.error_name == f"ReceiverAnswered{status}"  # what status and /healthz say
    assert SECRET not in str(refused.value)


def test_a_receiver_that_is_not_there_makes_write_raise() -> None:
    with pytest.raises(EventsUndelivered, match="CouldNotConnect"):
        write(sink(f"http://127.0.0.1:{free_port()}/events"), [answered()])


def test_a_receiver_whose_certificate_is_not_trusted_gets_nothing(serve: Any, tmp_path: Path) -> None:
    cert, key = tmp_path / "receiver.crt", tmp_path / "receiver.key"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
         "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1", "-days", "1",
         "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )  # fmt: skip
    receiver = EventReceiver(tls=(cert, key))
    with pytest.raises(EventsUndelivered, match="PeerFailedVerification"):
        write(sink(serve(receiver)), [answered()])
    assert receiver.received == []


def test_a_redirect_is_not_followed_with_the_secrets_headers(serve: Any) -> None:
    elsewhere = EventReceiver()
    receiver = EventReceiver(status=307, location=serve(elsewhere))
    with pytest.raises(EventsRefused):
        write(sink(serve(receiver)), [answered()])
    assert [h.get("x-api-key") for h, _ in elsewhere.received] == []
