"""Operator metrics (Prometheus)."""

from __future__ import annotations

from prometheus_client import Counter, Histogram, start_http_server

RECONCILES = Counter("regserve_reconciles_total", "Reconcile passes by result", ["result"])
ROLLOUTS = Counter("regserve_rollouts_total", "Rollout transitions by outcome", ["outcome"])
PROMOTION_LATENCY = Histogram(
    "regserve_promotion_to_serving_seconds",
    "From rollout start (selector observed at a new version) to the version confirmed serving",
    buckets=(1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1800),
)
POLL_LATENCY = Histogram("regserve_registry_poll_seconds", "Duration of one registry poll pass", ["server"])
POLL_ERRORS = Counter("regserve_registry_poll_errors_total", "Failed registry poll passes", ["server"])
WEBHOOK_DELIVERIES = Counter("regserve_webhook_deliveries_total", "Webhook deliveries by result", ["result"])


def record_poll(server: str, seconds: float, ok: bool) -> None:
    POLL_LATENCY.labels(server).observe(seconds)
    if not ok:
        POLL_ERRORS.labels(server).inc()


def serve(port: int) -> None:
    if port:
        start_http_server(port)
