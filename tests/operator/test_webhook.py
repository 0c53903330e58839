"""Webhook verification (table-driven), and a real delivery from `mlflow server` to a registered webhook."""

from __future__ import annotations

import asyncio
import json
import os
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from multidict import CIMultiDict
from regserve_operator.builders import serving_version_of
from regserve_operator.ports import Credentials, RegistryUnreachable
from regserve_operator.reconcile import reconcile
from regserve_operator.registry import Poller, Registry
from regserve_operator.sandbox.mlflow_server import MlflowServer
from regserve_operator.webhook import Receiver, ReplayGuard, register_webhook, sign, start_receiver, verify

from tests.reliability.hostile_mlflow import HostileMlflow

from .fakes import FakeTarget
from .helpers import DEFAULTS, OWNER, make_spec
from .mlflow_fixture import free_port, log_version

SECRET = "s3cret"
NOW = 1_800_000_000
BODY = json.dumps(
    {"entity": "model_version_alias", "action": "created", "data": {"name": "m", "alias": "a"}}
).encode()


def _headers(delivery: str = "d1", ts: int = NOW, body: bytes = BODY, secret: str = SECRET) -> dict[str, str]:
    return {
        "X-MLflow-Delivery-Id": delivery,
        "X-MLflow-Timestamp": str(ts),
        "X-MLflow-Signature": sign(secret, delivery, str(ts), body),
    }


@pytest.mark.parametrize(
    ("case", "headers", "body", "ok", "reason"),
    [
        ("valid", _headers(), BODY, True, "accepted"),
        ("wrong secret", _headers(secret="other"), BODY, False, "bad signature"),
        ("body changed", _headers(), BODY + b" ", False, "bad signature"),
        ("stale timestamp", _headers(ts=NOW - 301), BODY, False, "stale timestamp"),
        ("future timestamp", _headers(ts=NOW + 301), BODY, False, "stale timestamp"),
        (
            "no signature",
            {"X-MLflow-Delivery-Id": "d", "X-MLflow-Timestamp": str(NOW)},
            BODY,
            False,
            "missing",
        ),
        ("bad timestamp", {**_headers(), "X-MLflow-Timestamp": "soon"}, BODY, False, "bad timestamp"),
        ("id swapped", {**_headers(), "X-MLflow-Delivery-Id": "d2"}, BODY, False, "bad signature"),
    ],
)
def test_verify(case: str, headers: dict[str, str], body: bytes, ok: bool, reason: str) -> None:
    verdict = verify(SECRET, httpx.Headers(headers), body, now=NOW, replay=ReplayGuard())
    assert verdict.ok is ok and reason in verdict.reason
    if ok:
        assert (verdict.model_name, verdict.event) == ("m", "model_version_alias.created")


def test_replayed_delivery_refused() -> None:
    guard = ReplayGuard()
    assert verify(SECRET, httpx.Headers(_headers()), BODY, now=NOW, replay=guard).ok
    again = verify(SECRET, httpx.Headers(_headers()), BODY, now=NOW + 1, replay=guard)
    assert not again.ok and "replayed" in again.reason


def test_forgery_does_not_burn_the_real_id() -> None:
    guard = ReplayGuard()
    assert not verify(SECRET, httpx.Headers(_headers(secret="x")), BODY, now=NOW, replay=guard).ok
    assert verify(SECRET, httpx.Headers(_headers()), BODY, now=NOW, replay=guard).ok


class ReceiverThread:
    """The aiohttp receiver on its own event loop in a thread (as inside kopf's loop)."""

    def __init__(self, receiver: Receiver) -> None:
        self.port = free_port()
        self.loop = asyncio.new_event_loop()
        self._receiver = receiver
        self._runner: Any = None
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    def __enter__(self) -> ReceiverThread:
        self._thread.start()
        self._runner = asyncio.run_coroutine_threadsafe(
            start_receiver(self._receiver, "127.0.0.1", self.port), self.loop
        ).result(10)
        return self

    def __exit__(self, *exc: object) -> None:
        asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()


@pytest.fixture
def changed() -> Iterator[list[str]]:
    yield []


def test_receiver_answers_401_to_forgeries(changed: list[str]) -> None:
    with ReceiverThread(Receiver(SECRET, changed.append)) as rt:
        url = f"http://127.0.0.1:{rt.port}/webhook"
        now = int(time.time())
        forged = httpx.post(url, content=BODY, headers=_headers(ts=now, secret="guess"))
        assert forged.status_code == 401 and forged.json()["error"] == "unauthorized"
        assert httpx.post(url, content=BODY).status_code == 401
        good = _headers(delivery="real", ts=now)
        assert httpx.post(url, content=BODY, headers=good).status_code == 200
        assert httpx.post(url, content=BODY, headers=good).status_code == 401  # replay
    assert changed == ["m"]


def test_mlflow_delivery_triggers_rollout(
    mlflow_server: MlflowServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A real `mlflow server` delivers to a webhook that `regserve webhook register` created; the
    delivery refreshes the registry view and the reconcile rolls the new version out."""
    model = "webhook_model"
    v1 = log_version(mlflow_server.url, model, {"prompt": "string"}, alias="champion")
    v2 = log_version(mlflow_server.url, model, {"prompt": "string"})
    registry = Registry()
    target = FakeTarget()
    spec = make_spec(
        model={"name": model, "alias": "champion"},
        registry={"trackingUri": mlflow_server.url, "pollIntervalSeconds": 3600},
    )
    from datetime import UTC, datetime

    from regserve_operator.reconcile import Deps
    from regserve_operator.spec import RegisteredModelServingStatus

    deps = Deps(registry=registry, target=target, defaults=DEFAULTS, settle_seconds=0)
    first = reconcile(OWNER, 1, spec, RegisteredModelServingStatus(), deps, datetime.now(UTC))
    assert serving_version_of(target.get("ml", "translator") or {}) == v1

    deliveries: list[str] = []
    woken = threading.Event()

    def on_change(name: str) -> None:
        deliveries.append(name)
        registry.model_changed(name)
        woken.set()

    with ReceiverThread(Receiver(SECRET, on_change)) as rt:
        monkeypatch.setenv("REGSERVE_WEBHOOK_SECRET", SECRET)
        hook_id = register_webhook(
            tracking_uri=mlflow_server.url,
            url=f"http://127.0.0.1:{rt.port}/webhook",
            name=f"regserve-{os.getpid()}",
            secret_env="REGSERVE_WEBHOOK_SECRET",
        )
        assert hook_id
        import mlflow

        mlflow.MlflowClient(mlflow_server.url).set_registered_model_alias(model, "champion", v2)
        assert woken.wait(30), "no webhook delivery from mlflow"
        # Without the delivery, the hour-long poll interval would keep the old snapshot.
        second = reconcile(OWNER, 1, spec, first.status, deps, datetime.now(UTC))
    assert model in deliveries
    assert second.plan is not None and second.plan.action == "patch_serve_config"
    assert serving_version_of(target.get("ml", "translator") or {}) == v2


NON_ASCII_SIGNATURES = [
    ("non-ASCII text", "v1,é" + "A" * 42),
    ("a lone surrogate, as a server decodes undecodable bytes", "v1,\udcff"),
]


@pytest.mark.parametrize(("case", "signature"), NON_ASCII_SIGNATURES)
def test_a_non_ascii_signature_is_a_bad_signature(case: str, signature: str) -> None:
    # As aiohttp hands them over: str values, undecodable bytes as surrogates.
    headers = CIMultiDict({**_headers(), "X-MLflow-Signature": signature})
    verdict = verify(SECRET, headers, BODY, now=NOW, replay=ReplayGuard())
    assert (verdict.ok, verdict.reason) == (False, "bad signature"), case


def test_a_non_ascii_delivery_id_is_refused() -> None:
    headers = CIMultiDict({**_headers(), "X-MLflow-Delivery-Id": "dé"})
    verdict = verify(SECRET, headers, BODY, now=NOW, replay=ReplayGuard())
    assert (verdict.ok, verdict.reason) == (False, "bad delivery id")


def test_receiver_answers_401_to_non_ascii_signature_headers(changed: list[str]) -> None:
    with ReceiverThread(Receiver(SECRET, changed.append)) as rt:
        url = f"http://127.0.0.1:{rt.port}/webhook"
        good = _headers(delivery="raw", ts=int(time.time()))
        for raw in (b"v1,\xc3\xa9\xc3\xa9", b"v1,\xff\xfe", "v1,é".encode("latin-1")):
            headers = [(k.encode(), v.encode()) for k, v in good.items() if k != "X-MLflow-Signature"]
            answer = httpx.post(url, content=BODY, headers=[*headers, (b"X-MLflow-Signature", raw)])
            assert answer.status_code == 401 and answer.json()["error"] == "unauthorized", raw
        assert httpx.post(url, content=BODY, headers=good).status_code == 200  # the id was not burnt
    assert changed == ["m"]


def test_a_delivery_is_answered_promptly_while_a_poll_hangs() -> None:
    """The receiver runs on the operator's event loop; a delivery invalidates the snapshot of every
    tracking server, one of them trickling its search answer."""
    registry = Registry(deadline_s=20)
    with HostileMlflow(trickle_interval_s=0.5) as server:
        poller = registry.poller(server.url("trickle"), Credentials())
        outcome: list[object] = []
        hanging = threading.Thread(target=_poll, args=(poller, outcome))
        hanging.start()
        try:
            deadline = time.monotonic() + 10
            while server.requests["trickle"] == 0 and time.monotonic() < deadline:
                time.sleep(0.01)
            assert server.requests["trickle"] == 1
            with ReceiverThread(Receiver(SECRET, registry.model_changed)) as rt:
                started = time.monotonic()
                answer = httpx.post(
                    f"http://127.0.0.1:{rt.port}/webhook",
                    content=BODY,
                    headers=_headers(delivery="during-poll", ts=int(time.time())),
                    timeout=10,
                )
                took = time.monotonic() - started
            assert answer.status_code == 200 and took < 1.0, took
            assert hanging.is_alive()  # the poll was still hanging when the delivery was answered
        finally:
            registry.close()
            hanging.join(30)
    assert not hanging.is_alive() and isinstance(outcome[0], RegistryUnreachable), outcome


def _poll(poller: Poller, outcome: list[object]) -> None:
    try:
        outcome.append(poller.snapshot(30))
    except Exception as exc:
        outcome.append(exc)
