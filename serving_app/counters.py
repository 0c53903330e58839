"""Per-version rollout counters of one replica, and their sum over replicas (`GET /rollout`).

Latencies go into fixed buckets so that histograms of several replicas merge by adding counts; the p95
is read from the merged histogram. A replica's counters are plain objects updated on the request path
(no I/O); snapshots of them travel to the application's rollout board (`serving_app.board`).
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

# Upper bounds (ms) of the latency buckets; one more bucket holds everything above the last.
BUCKETS_MS: tuple[float, ...] = (
    0.5, 1, 1.5, 2, 3, 4, 5, 7.5, 10, 15, 20, 30, 40, 50, 75, 100, 150, 200, 300, 400, 500, 750,
    1000, 1500, 2000, 3000, 5000, 7500, 10000, 20000, 30000, 60000,
)  # fmt: skip
# Versions one replica counts per generation (pinned requests may name others): bounded snapshots.
MAX_VERSIONS = 32
SMOKE_MESSAGE_LIMIT = 500

SmokeState = Literal["passed", "failed"]
ShadowOutcome = Literal["agree", "disagree", "error", "dropped"]


def empty_histogram() -> list[int]:
    return [0] * (len(BUCKETS_MS) + 1)


def bucket_index(latency_ms: float) -> int:
    """The bucket holding `latency_ms`: the first whose upper bound is at least the value."""
    return bisect.bisect_left(BUCKETS_MS, latency_ms)


def merge_histograms(histograms: Iterable[Sequence[int]]) -> list[int]:
    merged = empty_histogram()
    for histogram in histograms:
        if len(histogram) != len(merged):
            raise ValueError(f"histogram of {len(histogram)} buckets, expected {len(merged)}")
        for index, count in enumerate(histogram):
            merged[index] += count
    return merged


def percentile_ms(histogram: Sequence[int], quantile: float = 0.95) -> float | None:
    """The `quantile` of a bucketed latency distribution, interpolated linearly inside its bucket
    (None without observations; values past the last bound read as the last bound)."""
    total = sum(histogram)
    if total == 0:
        return None
    rank = quantile * total
    seen = 0
    for index, count in enumerate(histogram):
        if count and seen + count >= rank:
            if index >= len(BUCKETS_MS):
                return BUCKETS_MS[-1]
            lower = BUCKETS_MS[index - 1] if index > 0 else 0.0
            upper = BUCKETS_MS[index]
            return round(lower + (upper - lower) * max(rank - seen, 0.0) / count, 3)
        seen += count
    return BUCKETS_MS[-1]  # pragma: no cover - the loop always finds the rank


@dataclass
class VersionCounts:
    requests: int = 0
    errors: int = 0  # 5xx answers
    latency: list[int] = field(default_factory=empty_histogram)

    def record(self, status: int, latency_ms: float) -> None:
        self.requests += 1
        if status >= 500:
            self.errors += 1
        self.latency[bucket_index(latency_ms)] += 1


@dataclass
class ShadowCounts:
    agreements: int = 0
    disagreements: int = 0
    errors: int = 0  # the candidate failed where the stable version answered
    dropped: int = 0  # not sent: too much shadow work in flight on the replica
    latency: list[int] = field(default_factory=empty_histogram)  # the candidate's predict time


@dataclass(frozen=True)
class SmokeResult:
    version: str
    state: SmokeState
    code: str | None = None
    message: str | None = None

    @classmethod
    def failed(cls, version: str, code: str, message: str) -> SmokeResult:
        return cls(version, "failed", code, message[:SMOKE_MESSAGE_LIMIT])


@dataclass(frozen=True)
class RolloutKey:
    """What a replica was told (its `user_config.candidate`): counters belong to one key."""

    generation: int | None = None
    candidate: str | None = None
    mode: str | None = None
    percent: int = 0


@dataclass(frozen=True)
class ReplicaSnapshot:
    """One replica's counters as pushed to the board (plain values, pickled by Ray)."""

    replica: str
    key: RolloutKey
    configured_at: float  # wall clock of the reconfigure that set `key`: the newest key is current
    versions: dict[str, VersionCounts]
    shadow: ShadowCounts
    smoke: SmokeResult | None


class ReplicaCounters:
    """Counters of the current rollout key on one replica; reset when the key changes."""

    def __init__(self, replica: str) -> None:
        self.replica = replica
        self.key = RolloutKey()
        self.configured_at = 0.0
        self.versions: dict[str, VersionCounts] = {}
        self.shadow = ShadowCounts()
        self.smoke: SmokeResult | None = None
        self.changes = 0  # bumped on every update: the pusher sends only when it moved

    def start(self, key: RolloutKey, configured_at: float) -> None:
        if key != self.key:
            self.key = key
            self.versions = {}
            self.shadow = ShadowCounts()
            self.smoke = None
        self.configured_at = configured_at
        self.changes += 1

    def record_request(self, version: str, status: int, latency_ms: float) -> None:
        counts = self.versions.get(version)
        if counts is None:
            if len(self.versions) >= MAX_VERSIONS:
                return
            counts = self.versions[version] = VersionCounts()
        counts.record(status, latency_ms)
        self.changes += 1

    def record_shadow(
        self, outcome: Literal["agree", "disagree", "error", "dropped"], latency_ms: float
    ) -> None:
        shadow = self.shadow
        if outcome == "dropped":
            shadow.dropped += 1
        else:
            if outcome == "agree":
                shadow.agreements += 1
            elif outcome == "disagree":
                shadow.disagreements += 1
            else:
                shadow.errors += 1
            shadow.latency[bucket_index(latency_ms)] += 1
        self.changes += 1

    def record_smoke(self, result: SmokeResult | None) -> None:
        self.smoke = result
        self.changes += 1

    def snapshot(self) -> ReplicaSnapshot:
        return ReplicaSnapshot(
            replica=self.replica,
            key=self.key,
            configured_at=self.configured_at,
            versions={
                version: VersionCounts(counts.requests, counts.errors, list(counts.latency))
                for version, counts in self.versions.items()
            },
            shadow=ShadowCounts(
                self.shadow.agreements,
                self.shadow.disagreements,
                self.shadow.errors,
                self.shadow.dropped,
                list(self.shadow.latency),
            ),
            smoke=self.smoke,
        )


def rollout_report(snapshots: Sequence[ReplicaSnapshot]) -> dict[str, Any]:
    """`GET /rollout`: the newest rollout key's counters summed over the replicas reporting it."""
    if not snapshots:
        return _report(RolloutKey(), [], smoke=_smoke_summary(RolloutKey(), [], pending=True))
    current = max(snapshots, key=lambda snapshot: snapshot.configured_at).key
    same = [snapshot for snapshot in snapshots if snapshot.key == current]
    # Replicas still on an older key have no result for this one yet.
    pending = len(same) < len(snapshots) or any(snapshot.smoke is None for snapshot in same)
    return _report(current, same, smoke=_smoke_summary(current, same, pending=pending))


def _report(key: RolloutKey, same: Sequence[ReplicaSnapshot], *, smoke: dict[str, Any]) -> dict[str, Any]:
    versions: dict[str, dict[str, Any]] = {}
    for version in sorted({v for snapshot in same for v in snapshot.versions}, key=_version_order):
        parts = [snapshot.versions[version] for snapshot in same if version in snapshot.versions]
        versions[version] = {
            "requests": sum(part.requests for part in parts),
            "errors": sum(part.errors for part in parts),
            "p95_ms": percentile_ms(merge_histograms(part.latency for part in parts)),
        }
    shadows = [snapshot.shadow for snapshot in same]
    agreements = sum(shadow.agreements for shadow in shadows)
    disagreements = sum(shadow.disagreements for shadow in shadows)
    return {
        "generation": key.generation,
        "candidate": key.candidate,
        "mode": key.mode,
        "percent": key.percent,
        "replicas": len(same),
        "smoke": smoke,
        "versions": versions,
        "shadow": {
            "compared": agreements + disagreements,
            "agreements": agreements,
            "disagreements": disagreements,
            "errors": sum(shadow.errors for shadow in shadows),
            "dropped": sum(shadow.dropped for shadow in shadows),
            "p95_ms": percentile_ms(merge_histograms(shadow.latency for shadow in shadows)),
        },
    }


def _smoke_summary(key: RolloutKey, same: Sequence[ReplicaSnapshot], *, pending: bool) -> dict[str, Any]:
    results = [snapshot.smoke for snapshot in same if snapshot.smoke is not None]
    failed = [result for result in results if result.state == "failed"]
    passed = [result for result in results if result.state == "passed"]
    state: str | None
    if failed:
        state = "failed"  # one failing replica is enough: the candidate is not rolled out
    elif key.candidate is None:
        state = None  # no rollout in progress
    elif pending or not same:
        state = "pending"
    else:
        state = "passed"
    first = failed[0] if failed else None
    return {
        "state": state,
        "replicas_passed": len(passed),
        "replicas_failed": len(failed),
        "code": first.code if first else None,
        "message": first.message if first else None,
    }


def _version_order(version: str) -> tuple[int, str]:
    return (int(version), version) if version.isdigit() else (0, version)
