"""A real MLflow webhook delivery, captured, then replayed and tampered with against the operator's receiver.

`mlflow server` posts to a capture server (its real headers and bytes are kept); the capture is then
sent to the operator's receiver in front of a Driver whose resource polls only every hour, so the only
thing that can make it look at the registry again is an accepted delivery. The observable effect of a
delivery is therefore: the registry snapshot is fetched again, and the resource is patched to the
version the alias now names. Refused deliveries must cause neither.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
from mlflow import MlflowClient
from regserve_operator.builders import serving_version_of
from regserve_operator.driver import Driver
from regserve_operator.local import serve_receiver
from regserve_operator.reconcile import Deps
from regserve_operator.registry import Registry
from regserve_operator.sandbox.mlflow_server import MlflowServer
from regserve_operator.sandbox.models import log_phrasebook
from regserve_operator.sandbox.processes import free_port, wait_for
from regserve_operator.webhook import (
    DELIVERY_ID_HEADER,
    SIGNATURE_HEADER,
    TIMESTAMP_HEADER,
    TOLERANCE_S,
    Receiver,
    Verdict,
    sign,
)

from tests.operator.fakes import FakeTarget
from tests.operator.helpers import DEFAULTS, OWNER, make_spec

MODEL = "webhook_capture_model"
SECRET = "capture-test-secret"


@dataclass
class Capture:
    """An HTTP server that keeps every POST it gets (headers and raw body) and answers 200."""

    deliveries: list[tuple[dict[str, str], bytes]] = field(default_factory=list)
    port: int = field(default_factory=free_port)

    def __post_init__(self) -> None:
        capture = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                capture.deliveries.append((dict(self.headers.items()), body))
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    def __enter__(self) -> Capture:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(10)


def capture_promotion(server: MlflowServer, v2: str) -> tuple[dict[str, str], bytes]:
    """MLflow's own delivery for `champion` moving to v2, as it reached a webhook endpoint."""
    client = MlflowClient(server.url)
    with Capture() as capture:
        hook = client.create_webhook(
            name=f"capture-{time.time_ns()}",
            url=capture.url,
            events=["model_version_alias.created"],  # type: ignore[list-item]
            secret=SECRET,
        )
        try:
            client.set_registered_model_alias(MODEL, "champion", v2)

            def ours() -> tuple[dict[str, str], bytes] | None:
                for headers, body in capture.deliveries:
                    data = json.loads(body).get("data") or {}
                    if data.get("name") == MODEL and str(data.get("version")) == v2:
                        return headers, body
                return None

            return wait_for(ours, timeout=30, interval=0.1, message="MLflow's webhook delivery")
        finally:
            client.delete_webhook(hook.webhook_id)


def test_captured_delivery_accepted_once_and_tampering_refused(mlflow_server: MlflowServer) -> None:
    v1 = log_phrasebook(mlflow_server.url, MODEL, lang_to="de")
    v2 = log_phrasebook(mlflow_server.url, MODEL, lang_to="fr")
    MlflowClient(mlflow_server.url).set_registered_model_alias(MODEL, "champion", v1)
    fetches: list[bool] = []
    registry = Registry(on_poll=lambda uri, seconds, ok: fetches.append(ok))
    target = FakeTarget()
    driver = Driver(Deps(registry=registry, target=target, defaults=DEFAULTS, settle_seconds=0))
    spec = make_spec(
        model={"name": MODEL, "alias": "champion"},
        registry={"trackingUri": mlflow_server.url, "pollIntervalSeconds": 3600},
    )
    driver.apply(OWNER, spec)
    driver.run_once()
    assert serving_version_of(target.get(OWNER.namespace, OWNER.name) or {}) == v1
    target.set_app_status("RUNNING")
    driver.scheduler.wake((OWNER.namespace, OWNER.name))
    driver.run_once()
    assert driver.status(OWNER).rollout_version is None and fetches == [True]
    # From here on, the hour-long poll interval means only an accepted delivery wakes the resource.
    headers, body = capture_promotion(mlflow_server, v2)
    fetches.clear()
    target.applied.clear()

    verdicts: list[Verdict] = []
    skew = [0.0]
    receiver = Receiver(
        SECRET, driver.model_changed, clock=lambda: time.time() + skew[0], on_verdict=verdicts.append
    )

    def nothing_happened(label: str) -> None:
        assert driver.run_once() == [], f"{label}: the resource was woken"
        assert fetches == [], f"{label}: the registry snapshot was refetched"
        assert target.applied == [], f"{label}: the RayService was written"

    name_offset = body.index(MODEL.encode())
    flipped = bytearray(body)
    flipped[name_offset] ^= 0x01
    renamed = body.replace(MODEL.encode(), b"someone_elses_model")
    retimed = {**headers, TIMESTAMP_HEADER: str(int(headers[TIMESTAMP_HEADER]) + 1)}
    unsigned = {k: v for k, v in headers.items() if k.lower() != SIGNATURE_HEADER.lower()}
    other_secret = {
        **headers,
        SIGNATURE_HEADER: sign(
            "not-the-secret", headers[DELIVERY_ID_HEADER], headers[TIMESTAMP_HEADER], body
        ),
    }
    forwarded = {k: v for k, v in headers.items() if k.lower() not in ("host", "content-length")}

    with serve_receiver(receiver, free_port()) as url:

        def post(content: bytes, with_headers: dict[str, str]) -> httpx.Response:
            sent = {k: v for k, v in with_headers.items() if k.lower() not in ("host", "content-length")}
            return httpx.post(url, content=content, headers=sent, timeout=10)

        refused = {
            "one byte of the model name flipped": (bytes(flipped), forwarded),
            "model name replaced": (renamed, forwarded),
            "timestamp header re-timed by 1 s": (body, retimed),
            "signature header removed": (body, unsigned),
            "signed with another secret": (body, other_secret),
        }
        for label, (content, sent) in refused.items():
            response = post(content, sent)
            assert response.status_code == 401, (label, response.status_code, response.text)
            assert response.json()["error"] == "unauthorized"
            nothing_happened(label)

        # The untouched delivery, arriving later than the tolerance allows (held back and replayed).
        skew[0] = TOLERANCE_S + 5
        late = post(body, forwarded)
        assert late.status_code == 401 and "stale" in late.json()["message"], late.text
        nothing_happened("replayed after the tolerance")
        skew[0] = 0.0

        accepted = post(body, forwarded)
        assert accepted.status_code == 200, accepted.text
        outcomes = driver.run_once()
        assert len(outcomes) == 1 and fetches == [True]
        assert outcomes[0].action == "patch_serve_config"
        assert serving_version_of(target.get(OWNER.namespace, OWNER.name) or {}) == v2
        fetches.clear()
        target.applied.clear()

        replayed = post(body, forwarded)
        assert replayed.status_code == 401 and "replayed" in replayed.json()["message"], replayed.text
        # A resource judging its rollout is due anyway: what must not happen is a refetch.
        driver.run_once()
        assert fetches == [], "the replayed delivery refetched the registry snapshot"

    reasons = [v.reason for v in verdicts]
    assert reasons.count("accepted") == 1, reasons
    assert [v.model_name for v in verdicts if v.ok] == [MODEL]
    assert reasons[:5] == [
        "bad signature",
        "bad signature",
        "bad signature",
        "missing signature headers",
        "bad signature",
    ]
    assert reasons[5:] == ["stale timestamp", "accepted", "replayed delivery id"], reasons
