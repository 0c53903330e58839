"""Per-version serving figures in fixed windows: requests, errors, a latency histogram and the drift
histograms, kept per replica and summed over replicas (no raw rows move for this).

Windows are aligned to the wall clock (`floor(time / window_s)`), so every replica's window N covers
the same span and the sums are of like with like. The request path only counts and keeps a reference to
the frame; the drift histograms are counted off it (`count_pending`), within a bound of rows per
version and window (past it rows are skipped and counted as such)."""

from __future__ import annotations

import bisect
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from serving_app.monitoring.drift import DriftReport, Histogram, ReferenceProfile, drift_report

logger = logging.getLogger("ray.serve")

# Latency buckets (upper bounds, ms): fixed, so histograms of every replica add up.
LATENCY_BOUNDS_MS: tuple[float, ...] = (1, 2, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000)
MAX_DRIFT_ROWS = 20_000  # per version, window and replica
MAX_VERSIONS = 16  # versions with figures in one window (a flood of pinned versions is cut here)
TOP_FEATURES = 20  # features named in a report, highest PSI first


@dataclass(frozen=True)
class ProfileState:
    """A version's reference for drift, as far as the replica knows it."""

    profile: ReferenceProfile | None = None
    kind: str = "loading"  # training, inputExample, none, loading, unavailable
    detail: str = ""


@dataclass
class VersionWindow:
    requests: int = 0
    errors: int = 0  # answered 5xx: the version's own failures
    client_errors: int = 0  # answered 4xx
    latency: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_BOUNDS_MS) + 1))
    drift: Histogram | None = None
    pending: list[tuple[pd.DataFrame, Any]] = field(default_factory=list)
    pending_rows: int = 0
    counted_rows: int = 0  # rows already counted in this window (the bound is per window)
    skipped_rows: int = 0


def latency_bucket(latency_ms: float) -> int:
    return bisect.bisect_left(LATENCY_BOUNDS_MS, latency_ms)


def quantile_ms(counts: Sequence[int], q: float) -> float | None:
    """The upper bound of the bucket holding the q-quantile (the last bound for the overflow bucket)."""
    total = sum(counts)
    if total <= 0:
        return None
    rank, seen = q * total, 0
    for index, count in enumerate(counts):
        seen += count
        if seen >= rank and count:
            return float(LATENCY_BOUNDS_MS[min(index, len(LATENCY_BOUNDS_MS) - 1)])
    return float(LATENCY_BOUNDS_MS[-1])


class ReplicaWindows:
    def __init__(
        self,
        window_s: float,
        profile_of: Callable[[str], ProfileState],
        *,
        drift: bool,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.window_s = window_s
        self.drift = drift
        self._profile_of = profile_of
        self._clock = clock
        self.index = int(clock() // window_s)
        self.current: dict[str, VersionWindow] = {}
        self.completed_index: int | None = None
        self.completed: dict[str, VersionWindow] = {}

    def record(
        self, version: str, status: int, latency_ms: float, model_input: Any = None, outputs: Any = None
    ) -> None:
        """One answer (on the request path: counts and a reference, nothing more)."""
        self._roll_if_due()
        window = self.current.get(version)
        if window is None:
            if len(self.current) >= MAX_VERSIONS:
                return
            window = self.current[version] = VersionWindow()
        window.requests += 1
        if status >= 500:
            window.errors += 1
        elif status >= 400:
            window.client_errors += 1
        window.latency[latency_bucket(latency_ms)] += 1
        if self.drift and status < 300 and isinstance(model_input, pd.DataFrame) and outputs is not None:
            rows = len(model_input)
            if window.counted_rows + window.pending_rows + rows > MAX_DRIFT_ROWS:
                window.skipped_rows += rows
            else:
                window.pending.append((model_input, outputs))
                window.pending_rows += rows

    def count_pending(self) -> None:
        """Count the kept rows into each version's drift histogram (off the request path)."""
        self._roll_if_due()
        self._count(self.current)

    def completed_wire(self) -> dict[str, Any] | None:
        """The last completed window, in the form replicas send to be summed; None before the first."""
        self._roll_if_due()
        if self.completed_index is None:
            return None
        versions = {}
        for version, window in self.completed.items():
            state = self._profile_of(version)
            versions[version] = {
                "requests": window.requests,
                "errors": window.errors,
                "client_errors": window.client_errors,
                "latency": list(window.latency),
                "skipped_rows": window.skipped_rows,
                "reference": {"kind": state.kind, "detail": state.detail},
                "profile": state.profile.to_wire() if state.profile is not None else None,
                "drift": window.drift.to_wire() if window.drift is not None else None,
            }
        return {"window": self.completed_index, "window_s": self.window_s, "versions": versions}

    def _roll_if_due(self) -> None:
        index = int(self._clock() // self.window_s)
        if index == self.index:
            return
        self._count(self.current)
        self.completed = self.current if index == self.index + 1 else {}
        self.completed_index = index - 1
        self.current, self.index = {}, index

    def _count(self, windows: Mapping[str, VersionWindow]) -> None:
        for version, window in windows.items():
            if not window.pending:
                continue
            pending, window.pending = window.pending, []
            window.counted_rows += window.pending_rows
            window.pending_rows = 0
            profile = self._profile_of(version).profile
            if profile is None:
                window.skipped_rows += sum(len(frame) for frame, _ in pending)
                continue
            if window.drift is None or window.drift.profile.fingerprint != profile.fingerprint:
                window.drift = Histogram(profile)
            try:
                frame = pd.concat([frame for frame, _ in pending], ignore_index=True)
                outputs = [answer for _, answers in pending for answer in answers]
                window.drift.observe(frame, outputs if len(outputs) == len(frame) else None)
            except Exception as error:  # a model's odd answer must not stop the figures
                logger.warning("drift counts skipped for version %s: %s", version, type(error).__name__)
                window.skipped_rows += sum(len(frame) for frame, _ in pending)


# ------------------------------------------------------------------------------------ summing


@dataclass(frozen=True)
class VersionFigures:
    version: str
    requests: int
    errors: int
    client_errors: int
    p50_ms: float | None
    p95_ms: float | None
    reference: str
    reference_detail: str
    drift: DriftReport | None

    def to_wire(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "requests": self.requests,
            "errors": self.errors,
            "client_errors": self.client_errors,
            "error_rate": self.errors / self.requests if self.requests else 0.0,
            "p50_ms": self.p50_ms,
            "p95_ms": self.p95_ms,
            "reference": self.reference,
            "reference_detail": self.reference_detail,
        }
        if self.drift is not None:
            top = sorted(self.drift.psi.items(), key=lambda item: -item[1])[:TOP_FEATURES]
            body["drift"] = {
                "rows": self.drift.rows,
                "enough_rows": self.drift.enough_rows,
                "input_psi": {name: round(value, 6) for name, value in top},
                "drifted": list(self.drift.drifted[:TOP_FEATURES]),
                "prediction_psi": {
                    k: round(v, 6) for k, v in list(self.drift.prediction_psi.items())[:TOP_FEATURES]
                },
                "predictions_drifted": list(self.drift.predictions_drifted[:TOP_FEATURES]),
            }
        return body


def settled_window(wires: Sequence[Mapping[str, Any]], *, now: float, grace_s: float) -> int | None:
    """The newest window, once every replica that pushed the one before has pushed it too or it ended
    `grace_s` ago; until then the one before.

    Replicas push a window a moment after it ends, each on its own tick: until the last one has, the
    newest window is only part of the traffic, and a reader judging each window once (the operator)
    would judge a part. A replica that did not push the window before is gone or new, and is not
    waited for. `wires` carry the pushing replica's name (`replica`) and `window_s`."""
    windows = [w for w in wires if isinstance(w.get("window"), int)]
    if not windows:
        return None
    newest_of: dict[str, int] = {}
    for position, wire in enumerate(windows):
        replica = str(wire.get("replica", position))
        newest_of[replica] = max(newest_of.get(replica, -1), int(wire["window"]))
    newest = max(newest_of.values())
    window_s = max(float(w.get("window_s") or 0.0) for w in windows if w["window"] == newest)
    if now >= (newest + 1) * window_s + grace_s or (newest - 1) not in newest_of.values():
        return newest
    return newest - 1


def sum_windows(
    wires: Sequence[Mapping[str, Any]],
    *,
    psi_threshold: float,
    min_rows: int,
    index: int | None = None,
) -> tuple[int | None, list[VersionFigures]]:
    """Window `index` (by default the newest any replica completed), summed over the replicas that
    completed it."""
    windows = [w for w in wires if isinstance(w.get("window"), int)]
    if not windows:
        return None, []
    newest = max(int(w["window"]) for w in windows) if index is None else index
    same = [w for w in windows if w["window"] == newest]
    if not same:
        return None, []
    names = sorted({v for w in same for v in (w.get("versions") or {})}, key=_version_order)
    return newest, [
        _version_figures(
            v, [w["versions"][v] for w in same if v in (w.get("versions") or {})], psi_threshold, min_rows
        )
        for v in names[:MAX_VERSIONS]
    ]


def _version_order(version: str) -> tuple[int, str]:
    return (int(version), version) if version.isdigit() else (0, version)


def _version_figures(
    version: str, parts: Sequence[Mapping[str, Any]], psi_threshold: float, min_rows: int
) -> VersionFigures:
    latency = [0] * (len(LATENCY_BOUNDS_MS) + 1)
    requests = errors = client_errors = 0
    for part in parts:
        requests += int(part.get("requests", 0))
        errors += int(part.get("errors", 0))
        client_errors += int(part.get("client_errors", 0))
        counts = part.get("latency") or []
        if len(counts) == len(latency):
            latency = [a + int(b) for a, b in zip(latency, counts, strict=True)]
    reference = next(
        (p.get("reference") or {} for p in parts if p.get("profile")), parts[0].get("reference") or {}
    )
    return VersionFigures(
        version=version,
        requests=requests,
        errors=errors,
        client_errors=client_errors,
        p50_ms=quantile_ms(latency, 0.5),
        p95_ms=quantile_ms(latency, 0.95),
        reference=str(reference.get("kind", "none")),
        reference_detail=str(reference.get("detail", ""))[:300],
        drift=_drift(parts, psi_threshold, min_rows),
    )


def _drift(parts: Sequence[Mapping[str, Any]], psi_threshold: float, min_rows: int) -> DriftReport | None:
    profile_wire = next((p["profile"] for p in parts if p.get("profile")), None)
    if profile_wire is None:
        return None
    profile = ReferenceProfile.from_wire(profile_wire)
    histograms = []
    for part in parts:
        if part.get("drift") is None:
            continue
        try:
            histograms.append(Histogram.from_wire(part["drift"], profile))
        except ValueError:
            continue  # counted against another profile (a replica that computed its own differently)
    return drift_report(profile, Histogram.sum(profile, histograms), psi_threshold, min_rows)
