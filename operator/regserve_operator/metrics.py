"""Operator metrics (Prometheus)."""

from __future__ import annotations

import contextlib
import urllib.parse

from prometheus_client import Counter, Gauge, Histogram, start_http_server

from regserve_operator.spec import MonitoringStatus

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
# Phases of a rollout (spec.RolloutPhase) plus Idle: exactly one is 1 per resource. The resource's labels
# are not `namespace`/`name`: a scrape adds the operator pod's own `namespace` target label.
PHASES = ("Idle", "SmokeTest", "Canary", "Shadow", "Switching")
ROLLOUT_PHASE = Gauge(
    "regserve_rollout_phase",
    "1 for the phase the resource's rollout is in",
    ["resource_namespace", "resource", "phase"],
)
ROLLOUT_WEIGHT = Gauge(
    "regserve_rollout_weight_percent",
    "Percent of unpinned requests the candidate answers (canary) or shadows (shadow); 0 without one",
    ["resource_namespace", "resource"],
)


def record_rollout(namespace: str, name: str, phase: str | None, weight: int | None) -> None:
    current = phase or "Idle"
    for each in PHASES:
        ROLLOUT_PHASE.labels(namespace, name, each).set(1.0 if each == current else 0.0)
    ROLLOUT_WEIGHT.labels(namespace, name).set(float(weight or 0) if phase else 0.0)


def forget_rollout(namespace: str, name: str) -> None:
    """A deleted resource's series go with it."""
    for each in PHASES:
        with contextlib.suppress(KeyError):
            ROLLOUT_PHASE.remove(namespace, name, each)
    with contextlib.suppress(KeyError):
        ROLLOUT_WEIGHT.remove(namespace, name)


DRIFT_PSI_LABELS = ("resource_namespace", "resource", "version", "feature")
DRIFT_PSI = Gauge(
    "regserve_drift_psi",
    "Population stability index of a feature (or `prediction.<output>`) in the last window, by version",
    DRIFT_PSI_LABELS,
)
WINDOW_REQUESTS_LABELS = ("resource_namespace", "resource", "version")
WINDOW_REQUESTS = Gauge(
    "regserve_window_requests",
    "Requests a version answered in the last completed monitoring window",
    WINDOW_REQUESTS_LABELS,
)


def record_monitoring(namespace: str, name: str, monitoring: MonitoringStatus | None) -> None:
    """The last window's figures; the previous window's series of this resource go."""
    for gauge, label_names in ((DRIFT_PSI, DRIFT_PSI_LABELS), (WINDOW_REQUESTS, WINDOW_REQUESTS_LABELS)):
        for labels in [key for key in _series(gauge, label_names) if key[:2] == (namespace, name)]:
            with contextlib.suppress(KeyError):
                gauge.remove(*labels)
    for figures in (monitoring.versions or []) if monitoring is not None else []:
        WINDOW_REQUESTS.labels(namespace, name, figures.version).set(figures.requests)
        for feature, psi in (figures.input_psi or {}).items():
            DRIFT_PSI.labels(namespace, name, figures.version, feature).set(psi)
        for output, psi in (figures.prediction_psi or {}).items():
            DRIFT_PSI.labels(namespace, name, figures.version, f"prediction.{output}").set(psi)


def _series(gauge: Gauge, label_names: tuple[str, ...]) -> set[tuple[str, ...]]:
    """The label values of the gauge's series, in `label_names`' order."""
    return {
        tuple(sample.labels[label] for label in label_names)
        for metric in gauge.collect()
        for sample in metric.samples
    }


def record_poll(server: str, seconds: float, ok: bool) -> None:
    # The server's scheme and host only: a tenant's path is nobody else's business on a shared endpoint.
    parts = urllib.parse.urlsplit(server)
    label = f"{parts.scheme}://{parts.netloc}"
    POLL_LATENCY.labels(label).observe(seconds)
    if not ok:
        POLL_ERRORS.labels(label).inc()


def serve(port: int) -> None:
    if port:
        start_http_server(port)
