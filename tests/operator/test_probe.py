from __future__ import annotations

import contextlib
import socketserver
import threading
import time
from collections.abc import Callable, Iterator

import httpx
import pytest
from regserve_operator import probe as probe_module
from regserve_operator.probe import (
    PROBE_MAX_BYTES,
    RolloutReport,
    RolloutUnsupported,
    probe_app,
    probe_rollout,
)

REPORT = {
    "generation": 3,
    "candidate": "2",
    "mode": "smoke",
    "percent": 0,
    "replicas": 1,
    "smoke": {"state": "passed", "replicas_passed": 1},
    "versions": {},
    "shadow": {},
}


@pytest.mark.parametrize(
    ("case", "status", "body", "want"),
    [
        ("a report", 200, REPORT, RolloutReport),
        ("an app without the route (older image)", 404, {"detail": "Not Found"}, RolloutUnsupported),
        ("not ready", 503, {}, type(None)),
        ("something that is not a report", 200, ["x"], type(None)),
    ],
)
def test_probe_rollout(case: str, status: int, body: object, want: type) -> None:
    def answer(request: httpx.Request) -> httpx.Response:
        assert request.url.path == "/app/rollout"
        return httpx.Response(status, json=body)

    with httpx.Client(transport=httpx.MockTransport(answer)) as client:
        assert isinstance(probe_rollout("http://serve/app/", client=client), want), case


class _Hostile(socketserver.BaseRequestHandler):
    """An app whose answers never end: `trickle` sends a byte at a time (each read well within the
    per-read timeout), `stream` an endless chunked body as fast as it is read."""

    mode = "trickle"

    def handle(self) -> None:
        self.request.recv(65536)
        ends = time.monotonic() + 30  # never outlives the test, even if the client never hangs up
        try:
            if self.mode == "trickle":
                self.request.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: 100000\r\n\r\n")
                while time.monotonic() < ends:
                    self.request.sendall(b" ")
                    time.sleep(0.1)
            else:
                self.request.sendall(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
                chunk = b"%x\r\n%s\r\n" % (65536, b" " * 65536)
                while time.monotonic() < ends:
                    self.request.sendall(chunk)
        except OSError:
            return  # the probe gave up and hung up: what the test wants


@contextlib.contextmanager
def _hostile_app(mode: str) -> Iterator[str]:
    handler = type(f"Hostile_{mode}", (_Hostile,), {"mode": mode})
    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/app"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


@pytest.mark.parametrize("mode", ["trickle", "stream"])
@pytest.mark.parametrize("probe", [probe_app, probe_rollout], ids=["healthz", "rollout"])
def test_a_probe_gives_up_on_an_endless_answer(
    mode: str, probe: Callable[[str], object], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(probe_module, "PROBE_DEADLINE_S", 1.0)
    with _hostile_app(mode) as url:
        began = time.monotonic()
        assert probe(url) is None  # "no answer": the caller goes by Ray's status alone
        took = time.monotonic() - began
    assert took < 3.0, f"{mode}: the probe took {took:.1f} s, past its 1 s deadline"


def test_a_probe_reads_no_more_than_its_cap() -> None:
    sent = {"bytes": 0}

    def answer(request: httpx.Request) -> httpx.Response:
        def endless() -> Iterator[bytes]:
            while True:
                sent["bytes"] += 65536
                yield b" " * 65536

        return httpx.Response(200, content=endless())

    with httpx.Client(transport=httpx.MockTransport(answer)) as client:
        assert probe_app("http://serve/app", client=client) is None
    assert sent["bytes"] <= PROBE_MAX_BYTES + 65536
