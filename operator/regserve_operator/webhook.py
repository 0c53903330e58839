"""MLflow webhook deliveries: verification, the receiver, and registering the webhook in MLflow.

MLflow signs a delivery (mlflow/webhooks/delivery.py; its docs page describes another scheme, the code
wins) as

    X-MLflow-Signature: "v1," + base64(HMAC-SHA256(secret, f"{delivery_id}.{timestamp}.{raw_body}"))

with `X-MLflow-Delivery-Id` and `X-MLflow-Timestamp` (unix seconds) alongside. A delivery is accepted
when the signature matches, the timestamp is within TOLERANCE of now, and its id was not seen
before (replay). Anything else is answered 401 and changes nothing.

Deliveries are best-effort (MLflow retries 3 times, then drops), and stage transitions send none,
so they only make polling faster: a delivery invalidates the registry snapshot and wakes the
resources that serve the named model.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from regserve_operator.tags import is_own_tag_event

log = logging.getLogger(__name__)

SIGNATURE_HEADER = "X-MLflow-Signature"
TIMESTAMP_HEADER = "X-MLflow-Timestamp"
DELIVERY_ID_HEADER = "X-MLflow-Delivery-Id"
TOLERANCE_S = 300
MAX_BODY_BYTES = 1024 * 1024
# Events that can move what a selector resolves to. Stage transitions emit none (polling covers them).
EVENTS = ("model_version.created", "model_version_alias.created", "model_version_alias.deleted")


def sign(secret: str, delivery_id: str, timestamp: str, body: bytes) -> str:
    signed = f"{delivery_id}.{timestamp}.".encode() + body
    digest = hmac.new(secret.encode(), signed, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


@dataclass(frozen=True)
class Verdict:
    ok: bool
    reason: str
    model_name: str | None = None
    event: str | None = None


class ReplayGuard:
    """Delivery ids seen within the tolerance window (older ones are refused by timestamp anyway)."""

    def __init__(self, window_s: float = TOLERANCE_S * 2, max_ids: int = 100_000) -> None:
        self._seen: OrderedDict[str, float] = OrderedDict()
        self._window = window_s
        self._max = max_ids
        self._lock = threading.Lock()

    def first_time(self, delivery_id: str, now: float) -> bool:
        with self._lock:
            while self._seen and (
                next(iter(self._seen.values())) < now - self._window or len(self._seen) >= self._max
            ):
                self._seen.popitem(last=False)
            if delivery_id in self._seen:
                return False
            self._seen[delivery_id] = now
            return True


def verify(
    secret: str,
    headers: Mapping[str, str],
    body: bytes,
    *,
    now: float,
    replay: ReplayGuard,
    tolerance_s: float = TOLERANCE_S,
) -> Verdict:
    """Check one delivery. `headers` must be case-insensitive (as aiohttp's and httpx's are)."""
    delivery_id = headers.get(DELIVERY_ID_HEADER) or ""
    timestamp = headers.get(TIMESTAMP_HEADER) or ""
    signature = headers.get(SIGNATURE_HEADER) or ""
    if not (secret and delivery_id and timestamp and signature):
        return Verdict(False, "missing signature headers")
    if not (timestamp.isascii() and timestamp.isdigit()):
        return Verdict(False, "bad timestamp")
    sent_at = int(timestamp)
    if abs(now - sent_at) > tolerance_s:
        return Verdict(False, "stale timestamp")
    if not delivery_id.isascii():
        return Verdict(False, "bad delivery id")
    # As bytes: compare_digest refuses str with non-ASCII characters (a TypeError, which was a 500).
    expected = sign(secret, delivery_id, timestamp, body).encode()
    if not hmac.compare_digest(expected, signature.encode("utf-8", errors="replace")):
        return Verdict(False, "bad signature")
    # Only a correctly signed delivery may consume its id, or forgeries could block real ones.
    if not replay.first_time(delivery_id, now):
        return Verdict(False, "replayed delivery id")
    try:
        payload = json.loads(body)
        event = f"{payload['entity']}.{payload['action']}"
        name = payload["data"]["name"]
        key = payload["data"].get("key")
    except (ValueError, KeyError, TypeError, AttributeError):
        return Verdict(True, "accepted (unrecognised payload)")
    if is_own_tag_event(event, key):
        # Our own deployment state tag: writing it must not wake us (no model_name: nothing woken).
        return Verdict(True, "accepted (own tag write)", event=event)
    return Verdict(True, "accepted", model_name=str(name), event=event)


class Receiver:
    """An aiohttp app for `POST /webhook` (runs inside the operator's event loop)."""

    def __init__(
        self,
        secret: str,
        on_model_changed: Callable[[str], None],
        *,
        clock: Callable[[], float] = time.time,
        on_verdict: Callable[[Verdict], None] | None = None,
    ) -> None:
        self._secret = secret
        self._on_model_changed = on_model_changed
        self._clock = clock
        self._replay = ReplayGuard()
        self._on_verdict = on_verdict

    def app(self) -> Any:
        from aiohttp import web

        app = web.Application(client_max_size=MAX_BODY_BYTES)
        app.router.add_post("/webhook", self._handle)
        app.router.add_get("/healthz", self._health)
        return app

    async def _health(self, request: Any) -> Any:
        from aiohttp import web

        return web.json_response({"ok": True})

    async def _handle(self, request: Any) -> Any:
        from aiohttp import web

        body = await request.read()
        verdict = verify(self._secret, request.headers, body, now=self._clock(), replay=self._replay)
        if self._on_verdict:
            self._on_verdict(verdict)
        if not verdict.ok:
            log.warning("webhook delivery refused: %s", verdict.reason)
            return web.json_response({"error": "unauthorized", "message": verdict.reason}, status=401)
        if verdict.model_name:
            log.info("webhook %s for model %r", verdict.event, verdict.model_name)
            self._on_model_changed(verdict.model_name)
        return web.json_response({"ok": True})


async def start_receiver(receiver: Receiver, host: str, port: int) -> Any:
    """Starts serving; returns the aiohttp runner (call `await runner.cleanup()` to stop)."""
    from aiohttp import web

    runner = web.AppRunner(receiver.app(), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    return runner


def register_webhook(*, tracking_uri: str, url: str, name: str, secret_env: str) -> str:
    """Create (or update) the MLflow webhook that posts registry events to the operator's receiver."""
    from mlflow import MlflowClient

    secret = os.environ.get(secret_env)
    if not secret:
        raise SystemExit(f"set {secret_env} to the secret the operator verifies deliveries with")
    client = MlflowClient(tracking_uri=tracking_uri)
    events: list[Any] = list(EVENTS)
    token: str | None = None
    while True:
        page = client.list_webhooks(page_token=token)
        for hook in page:
            if hook.name == name:
                updated = client.update_webhook(hook.webhook_id, url=url, events=events, secret=secret)
                return str(updated.webhook_id)
        token = page.token
        if not token:
            break
    created = client.create_webhook(name=name, url=url, events=events, secret=secret)
    return str(created.webhook_id)
