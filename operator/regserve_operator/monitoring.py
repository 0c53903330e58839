"""spec.monitoring, the operator's side (docs/monitoring.md): the app's last completed window (`GET
/monitoring`, summed over replicas by the app) parsed into typed figures, and the pure judgement of a
new window: the figures in status, the `InputDrift` condition naming the drifted features, one Event when
it turns, and the metrics to log on each version's MLflow run."""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

import httpx

from regserve_operator import probe
from regserve_operator.spec import Monitoring, MonitoringStatus, PayloadFigures, VersionFigures

INPUT_DRIFT = "InputDrift"
PAYLOADS_LOGGED = "PayloadsLogged"
PROBLEM_REASONS = {
    "sink_headers_invalid": (
        "SinkHeadersInvalid",
        "the sink's headers Secret key is not `Name: value` lines",
    ),
    "sink_headers_missing": ("SinkHeadersMissing", "the sink's headers Secret or its key is missing"),
    "sink_unavailable": ("SinkUnavailable", "no tracking URI for the MLflow sink"),
}
MAX_VERSIONS = 16
MAX_FEATURES = 20  # named per version in status
MAX_NAME = 200
MESSAGE_FEATURES = 5  # named in the condition's message
MAX_COUNT = 2**53
MAX_LATENCY_MS = 3_600_000.0
# What a window may be (the app's own bounds), and when it may end (before 2200: a date Python prints).
WINDOW_SECONDS = (1.0, 86400.0)
WINDOW_END = (0.0, 7_258_118_400.0)


# ------------------------------------------------------------------------------------- the report


@dataclass(frozen=True)
class WindowFigures:
    version: str
    requests: int
    errors: int
    p50_ms: float | None
    p95_ms: float | None
    reference: str
    reference_note: str
    rows: int | None = None
    enough_rows: bool = False
    input_psi: Mapping[str, float] = field(default_factory=dict)
    drifted: tuple[str, ...] = ()
    prediction_psi: Mapping[str, float] = field(default_factory=dict)
    predictions_drifted: tuple[str, ...] = ()

    @property
    def error_rate(self) -> float:
        return self.errors / self.requests if self.requests else 0.0


@dataclass(frozen=True)
class PayloadWindow:
    """What happened to payload records in the window, over every replica."""

    logged: int = 0
    dropped: int = 0
    sink_error: int = 0
    problems: tuple[str, ...] = ()  # why a replica logs nothing (sink_headers_invalid, ...)
    errors: tuple[str, ...] = ()  # the sink's last failure on a replica, as an exception type


@dataclass(frozen=True)
class WindowReport:
    window_end: float  # epoch seconds
    window_seconds: float
    versions: tuple[WindowFigures, ...]
    payloads: PayloadWindow | None = None


MonitoringProbe = Callable[[str], "WindowReport | None"]


def probe_monitoring(url: str, *, client: httpx.Client | None = None) -> WindowReport | None:
    """The app's last completed window; None before the first one, or when it cannot be asked."""
    response = probe.get_answer(url, "/monitoring", client)
    if response is None or response.status_code != 200:
        return None
    try:
        return parse_monitoring(response.json())
    except (ValueError, RecursionError):  # a deeply nested answer too
        return None


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return None
    return float(value)


def _count(value: Any) -> int:
    number = _number(value)
    return int(number) if number is not None and 0 <= number <= MAX_COUNT else 0


def _latency(value: Any) -> float | None:
    number = _number(value)
    return number if number is not None and 0 <= number <= MAX_LATENCY_MS else None


def _names(value: Any) -> tuple[str, ...]:
    if not isinstance(value, list):
        return ()
    return tuple(str(item)[:MAX_NAME] for item in value[: MAX_FEATURES * 4] if isinstance(item, str))[
        :MAX_FEATURES
    ]


def _psi(value: Any) -> dict[str, float]:
    if not isinstance(value, dict):
        return {}
    kept = {str(k)[:MAX_NAME]: n for k, v in value.items() if (n := _number(v)) is not None and n >= 0}
    return dict(sorted(kept.items(), key=lambda item: -item[1])[:MAX_FEATURES])


def _is_version(value: Any) -> bool:
    return isinstance(value, str) and value.isascii() and value.isdigit() and 1 <= len(value) <= 10


def parse_monitoring(body: Any) -> WindowReport | None:
    """`/monitoring`'s body (a tenant's app wrote it: every field checked and bounded)."""
    if not isinstance(body, dict) or not body.get("enabled"):
        return None
    end, length = _number(body.get("window_end")), _number(body.get("window_s"))
    versions = body.get("versions")
    if end is None or length is None or not isinstance(versions, dict):
        return None
    if not (WINDOW_SECONDS[0] <= length <= WINDOW_SECONDS[1] and WINDOW_END[0] <= end <= WINDOW_END[1]):
        return None
    figures: list[WindowFigures] = []
    for version, raw in versions.items():
        if len(figures) >= MAX_VERSIONS:
            break
        if not (_is_version(version) and isinstance(raw, dict)):
            continue
        found = raw.get("drift")
        drift: dict[str, Any] = found if isinstance(found, dict) else {}
        figures.append(
            WindowFigures(
                version=version,
                requests=_count(raw.get("requests")),
                errors=_count(raw.get("errors")),
                p50_ms=_latency(raw.get("p50_ms")),
                p95_ms=_latency(raw.get("p95_ms")),
                reference=str(raw.get("reference") or "none")[:40],
                reference_note=str(raw.get("reference_detail") or "")[:300],
                rows=_count(drift["rows"]) if "rows" in drift else None,
                enough_rows=drift.get("enough_rows") is True,
                input_psi=_psi(drift.get("input_psi")),
                drifted=_names(drift.get("drifted")),
                prediction_psi=_psi(drift.get("prediction_psi")),
                predictions_drifted=_names(drift.get("predictions_drifted")),
            )
        )
    return WindowReport(end, length, tuple(figures), _payloads(body.get("payloads")))


_CODE = re.compile(r"[A-Za-z0-9_.]{1,64}")


def _payloads(raw: Any) -> PayloadWindow | None:
    if not isinstance(raw, dict):
        return None

    def codes(value: Any) -> tuple[str, ...]:
        listed = value if isinstance(value, list) else []
        return tuple(sorted({v for v in listed[:16] if isinstance(v, str) and _CODE.fullmatch(v)}))

    return PayloadWindow(
        logged=_count(raw.get("logged")),
        dropped=_count(raw.get("dropped")),
        sink_error=_count(raw.get("sink_error")),
        problems=codes(raw.get("problems")),
        errors=codes(raw.get("errors")),
    )


# ------------------------------------------------------------------------------------- judgement

ConditionStatus = Literal["True", "False", "Unknown"]


@dataclass(frozen=True)
class ConditionOutcome:
    status: ConditionStatus
    reason: str
    message: str


@dataclass(frozen=True)
class WindowMetrics:
    """What one version's MLflow run gets for one window."""

    version: str
    timestamp_ms: int
    step: int  # the window's number since the epoch
    metrics: Mapping[str, float]


@dataclass(frozen=True)
class Judgement:
    status: MonitoringStatus
    condition: ConditionOutcome | None  # None: leave the condition as it is (no drift asked)
    metrics: tuple[WindowMetrics, ...]
    payloads: ConditionOutcome | None = None  # PayloadsLogged (None: no payload logging asked)


def window_end_text(end: float) -> str:
    return datetime.fromtimestamp(end, tz=UTC).isoformat().replace("+00:00", "Z")


def judge(
    monitoring: Monitoring,
    previous: MonitoringStatus | None,
    report: WindowReport | None,
    judged_versions: tuple[str, ...],
) -> Judgement | None:
    """A new window's figures; None when there is none since the last one judged (nothing to write).
    `judged_versions`: the versions whose drift counts (the serving one and a candidate)."""
    if report is None:
        return None
    end_text = window_end_text(report.window_end)
    if previous is not None and previous.window_end == end_text:
        return None
    step = int(report.window_end // report.window_seconds) - 1
    status = MonitoringStatus(
        window_end=end_text,
        window_seconds=int(report.window_seconds),
        versions=[_status_figures(f) for f in report.versions] or None,
    )
    metrics = tuple(_metrics(f, int(report.window_end * 1000), step) for f in report.versions if f.requests)
    condition = _condition(report, judged_versions) if monitoring.drift is not None else None
    logged = _payloads_condition(report.payloads) if monitoring.payloads is not None else None
    if report.payloads is not None and monitoring.payloads is not None:
        status.payloads = PayloadFigures(
            logged=report.payloads.logged,
            dropped=report.payloads.dropped,
            sink_error=report.payloads.sink_error,
        )
    return Judgement(status, condition, metrics, logged)


def _payloads_condition(payloads: PayloadWindow | None) -> ConditionOutcome:
    """Whether payload records reach the sink: a replica that cannot log at all, or a sink failing, is
    said with the cause (serving is never touched by either)."""
    if payloads is None:
        return ConditionOutcome("Unknown", "NoFigures", "no replica reported payload figures for the window")
    for problem in payloads.problems:
        reason, message = PROBLEM_REASONS.get(problem, ("SinkUnavailable", problem))
        return ConditionOutcome("False", reason, f"payload logging is off: {message}")
    counts = f"{payloads.logged} logged, {payloads.dropped} dropped, {payloads.sink_error} given up"
    if payloads.errors:
        return ConditionOutcome(
            "False", "SinkFailing", f"the sink fails ({', '.join(payloads.errors)}): {counts}"
        )
    return ConditionOutcome("True", "Logging", counts)


def _status_figures(figures: WindowFigures) -> VersionFigures:
    return VersionFigures(
        version=figures.version,
        requests=figures.requests,
        error_rate=round(figures.error_rate, 6),
        p50_ms=figures.p50_ms,
        p95_ms=figures.p95_ms,
        rows=figures.rows,
        reference=figures.reference,
        reference_note=figures.reference_note or None,
        input_psi={k: round(v, 4) for k, v in figures.input_psi.items()} or None,
        drifted=list(figures.drifted) or None,
        prediction_psi={k: round(v, 4) for k, v in figures.prediction_psi.items()} or None,
        predictions_drifted=list(figures.predictions_drifted) or None,
    )


def _metrics(figures: WindowFigures, timestamp_ms: int, step: int) -> WindowMetrics:
    values: dict[str, float] = {"requests": float(figures.requests), "error_rate": figures.error_rate}
    if figures.p50_ms is not None:
        values["latency_p50_ms"] = figures.p50_ms
    if figures.p95_ms is not None:
        values["latency_p95_ms"] = figures.p95_ms
    if figures.rows is not None:
        values["drift_rows"] = float(figures.rows)
        values.update({f"psi.{_metric_name(name)}": psi for name, psi in figures.input_psi.items()})
        values.update(
            {f"prediction_psi.{_metric_name(name)}": psi for name, psi in figures.prediction_psi.items()}
        )
    return WindowMetrics(figures.version, timestamp_ms, step, values)


def _metric_name(name: str) -> str:
    # MLflow metric keys take letters, digits, `_ - . / ` and spaces.
    return "".join(ch if ch.isalnum() or ch in "_-./ " else "_" for ch in name)[:100]


def _condition(report: WindowReport, judged_versions: tuple[str, ...]) -> ConditionOutcome:
    judged = [f for f in report.versions if f.version in judged_versions]
    drifted = [f for f in judged if f.enough_rows and (f.drifted or f.predictions_drifted)]
    if drifted:
        parts = []
        for figures in drifted:
            named = [f"{name} (PSI {figures.input_psi.get(name, 0.0):.2f})" for name in figures.drifted]
            named += [
                f"prediction {name} (PSI {figures.prediction_psi.get(name, 0.0):.2f})"
                for name in figures.predictions_drifted
            ]
            weak = (
                " against its input example (a weak reference)" if figures.reference == "inputExample" else ""
            )
            parts.append(f"version {figures.version}{weak}: {', '.join(named[:MESSAGE_FEATURES])}")
        return ConditionOutcome("True", "Drifted", "; ".join(parts))
    with_rows = [f for f in judged if f.enough_rows]
    if with_rows:
        return ConditionOutcome(
            "False", "NoDrift", f"no feature over the threshold in {len(with_rows)} version(s)"
        )
    no_reference = [f for f in judged if f.rows is None]
    if judged and len(no_reference) == len(judged):
        note = "; ".join(f"version {f.version}: {f.reference_note or f.reference}" for f in no_reference)
        return ConditionOutcome("Unknown", "NoReference", note[:500])
    return ConditionOutcome("Unknown", "NotEnoughRows", "too few rows in the last window for a verdict")
