"""Rollout rules on typed values, pure: how an in-flight rollout is judged, when a superseded one is
kept, and how long a version whose rollout the registry cut waits before it is tried again.

Judging a rollout of version V (patched into the RayService at `started`):
- the RayService does not carry V yet (deleted, or the write is pending) → in flight;
- the app reports its switch to V failed since `started` → failed: `RegistryUnavailable` when the
  replica could not reach the registry (retried with back-off), else `LoadFailed`;
- Ray reports the application failed (after settling) → `DeployFailed`;
- RUNNING after settling, and the app answers with V (or cannot be asked) → succeeded;
- RUNNING, but the app still answers with another default past the deadline → `Timeout`;
- not RUNNING within the deadline → `Timeout`.
Right after the patch Ray's status may still describe the previous config, hence the settling time
before Ray's word counts; the app's own report counts at once.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from regserve_operator.conditions import ServiceState
from regserve_operator.probe import AppReport
from regserve_operator.spec import FailureCause, VersionRecord

RETRY_BACKOFF_BASE_S = 5.0
RETRY_BACKOFF_MAX_S = 120.0
# A switch failure is matched to the rollout it belongs to by time; the replica's clock may run a
# little behind the operator's.
CLOCK_SLACK_S = 1.0

RETRIED_CAUSES: frozenset[FailureCause] = frozenset({"RegistryUnavailable"})


@dataclass(frozen=True)
class RolloutCheck:
    """What judging an in-flight rollout looks at."""

    version: str
    started: datetime
    carried: str | None  # the version the RayService carries now
    service: ServiceState
    app: AppReport | None  # None: the app was not (or could not be) asked
    settle_s: float
    deadline_s: float


@dataclass(frozen=True)
class InFlight:
    pass


@dataclass(frozen=True)
class Succeeded:
    elapsed_s: float


@dataclass(frozen=True)
class Failed:
    cause: FailureCause
    message: str


Verdict = InFlight | Succeeded | Failed


def judge(check: RolloutCheck, now: datetime) -> Verdict:
    if check.carried != check.version:
        return InFlight()
    elapsed = (now - check.started).total_seconds()
    settled = elapsed >= check.settle_s
    svc, app, version = check.service, check.app, check.version
    reported = _reported_failure(check)
    if reported is not None:
        return reported
    if svc.failed and settled:
        return Failed("DeployFailed", f"application {svc.app_status}: {svc.message}".strip())
    if svc.running and settled:
        if app is None or app.default_version == version:
            return Succeeded(elapsed)
        if elapsed > check.deadline_s:
            return Failed(
                "Timeout",
                f"the application still answers with version {app.default_version} after "
                f"{check.deadline_s:.0f}s: its switch to {version} failed (see the replica's log)",
            )
        return InFlight()
    if elapsed > check.deadline_s:
        state = svc.app_status or "unknown"
        return Failed("Timeout", f"not RUNNING within {check.deadline_s:.0f}s (application status {state})")
    return InFlight()


def _reported_failure(check: RolloutCheck) -> Failed | None:
    """The app's own report of a failed switch to this rollout's version, made since it started."""
    failure = check.app.switch_failure if check.app is not None else None
    if failure is None or failure.version != check.version:
        return None
    if failure.at < check.started.timestamp() - CLOCK_SLACK_S:
        return None  # an earlier attempt's failure
    if failure.registry_unavailable:
        return Failed("RegistryUnavailable", f"version {check.version} not loaded, registry unavailable")
    return Failed("LoadFailed", f"version {check.version} failed to load ({failure.code})")


def answers_healthy(check: RolloutCheck, now: datetime) -> bool:
    """The rollout's version already serves: Ray runs it and the app answers with it (or, when the
    app cannot be asked, Ray has reported RUNNING for the settling time)."""
    if check.carried != check.version or not check.service.running:
        return False
    if check.app is not None:
        return check.app.default_version == check.version and _reported_failure(check) is None
    return (now - check.started).total_seconds() >= check.settle_s


def retry_backoff_s(attempts: int) -> float:
    """Delay before retrying a version after its n-th failed attempt in a row: doubling from the
    base, capped, so a long registry outage costs a load attempt every two minutes."""
    return min(RETRY_BACKOFF_MAX_S, RETRY_BACKOFF_BASE_S * 2 ** max(0, attempts - 1))


def retry_wait_s(rejected: VersionRecord, now: datetime, at: datetime | None) -> float | None:
    """None: the record is a verdict on the version (not retried until the selector moves). Else the
    seconds left before it is tried again (0: now)."""
    if rejected.reason != "RolledBack" or rejected.cause not in RETRIED_CAUSES:
        return None
    delay = retry_backoff_s(rejected.attempts or 1)
    elapsed = (now - at).total_seconds() if at is not None else delay
    return max(0.0, delay - elapsed)
