"""The questions the operator asks the serving application: which default answers, and why the last
switch failed (`/healthz`); and, while a candidate is smoke-tested, canaried or shadowed, how each
version fared (`/rollout`, docs/rollouts.md), parsed into typed figures decisions are made on.

KubeRay reports an application RUNNING once Ray Serve has applied its config. A promotion is an
in-place `reconfigure()`: when the new version fails to load there, the app keeps its old default
answering (nothing stops serving) and Ray Serve sees nothing wrong, so RUNNING alone cannot confirm a
rollout. Both targets (Kubernetes and local) ask the app through this module.

`/healthz` rather than `/metadata`: it stays open when bearer-token auth is on (the operator holds no
client token), and it carries only the default version and the failed switch's stable error code,
never a message, so it leaks nothing a health check should not.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import httpx

from serving_app import mlmodel
from serving_app.mlmodel import Answer, BoundedTransport, Deadline, bounded_request

TIMEOUT_S = 2.0  # per socket operation
# Model code runs in the replica by design and could trickle or stream an endless answer: a probe is over
# within PROBE_DEADLINE_S and reads at most PROBE_MAX_BYTES (a report is a few KiB), or it is "no answer".
PROBE_DEADLINE_S = 5.0
PROBE_MAX_BYTES = 256 * 1024
REGISTRY_UNAVAILABLE_CODE = "registry_unavailable"  # serving_app's error code for an unreachable registry
INVALID_CANDIDATE_CODE = "invalid_candidate"  # the app refused user_config.candidate itself


@dataclass(frozen=True)
class SwitchFailure:
    """The app's last failed switch of its default version."""

    version: str
    code: str  # serving_app's stable error code (`registry_unavailable`, `version_load_failed`, ...)
    at: float  # when it failed, epoch seconds on the replica's clock

    @property
    def registry_unavailable(self) -> bool:
        return self.code == REGISTRY_UNAVAILABLE_CODE


@dataclass(frozen=True)
class AppReport:
    """What the application says about itself."""

    default_version: str | None
    switch_failure: SwitchFailure | None = None


Probe = Callable[[str], AppReport | None]


def probe_app(url: str, *, client: httpx.Client | None = None) -> AppReport | None:
    """What the application at `url` reports; None when it cannot be asked (unreachable, not ready,
    an older app): the caller then goes by Ray's status alone."""
    response = get_answer(url, "/healthz", client)
    if response is None or response.status_code != 200:
        return None
    try:
        body = response.json()
    except (ValueError, RecursionError):  # a deeply nested answer too
        return None
    return parse_report(body)


def get_answer(url: str, path: str, client: httpx.Client | None) -> Answer | None:
    """The app's answer at `path`, complete within the probe's deadline and byte cap; None otherwise."""
    target = f"{url.rstrip('/')}{path}"
    deadline = Deadline.after(PROBE_DEADLINE_S)
    try:
        if client is not None:
            return bounded_request(
                client, "GET", target, label=path, deadline=deadline, max_bytes=PROBE_MAX_BYTES
            )
        # verify=False builds no CA bundle (a probe is plain HTTP inside the cluster or on loopback).
        with httpx.Client(transport=BoundedTransport(verify=False), timeout=TIMEOUT_S) as own:
            return bounded_request(
                own, "GET", target, label=path, deadline=deadline, max_bytes=PROBE_MAX_BYTES
            )
    except mlmodel.Unreachable:
        return None


def parse_report(body: Any) -> AppReport | None:
    """`/healthz`'s body as an AppReport (pure)."""
    if not isinstance(body, dict) or body.get("default_version") is None:
        return None
    return AppReport(str(body["default_version"]), _switch_failure(body.get("last_default_switch_failure")))


def _switch_failure(raw: Any) -> SwitchFailure | None:
    if not isinstance(raw, dict) or raw.get("version") is None:
        return None
    try:
        at = float(raw.get("at") or 0.0)
    except (TypeError, ValueError):
        at = 0.0
    return SwitchFailure(version=str(raw["version"]), code=str(raw.get("code") or ""), at=at)


# ------------------------------------------------------------------------------------ GET /rollout

SmokeState = Literal["pending", "passed", "failed"]
RolloutMode = Literal["smoke", "canary", "shadow"]


@dataclass(frozen=True)
class VersionFigures:
    """One version's counters for the current generation, summed over every replica."""

    requests: int = 0
    errors: int = 0  # 5xx answers
    p95_ms: float | None = None

    @property
    def error_rate(self) -> float:
        return self.errors / self.requests if self.requests else 0.0


@dataclass(frozen=True)
class SmokeReport:
    state: SmokeState
    replicas_passed: int = 0
    replicas_failed: int = 0
    code: str | None = None
    message: str | None = None


@dataclass(frozen=True)
class ShadowFigures:
    compared: int = 0
    disagreements: int = 0
    errors: int = 0
    p95_ms: float | None = None


@dataclass(frozen=True)
class RolloutReport:
    """The app's `GET /rollout`: what it does with the candidate and how each version fared."""

    generation: int | None
    candidate: str | None
    mode: RolloutMode | None
    percent: int
    replicas: int
    smoke: SmokeReport
    versions: Mapping[str, VersionFigures]
    shadow: ShadowFigures
    partial: bool = False  # one replica's own figures (the app's board was unreachable): never promote on it

    def figures(self, version: str | None) -> VersionFigures:
        return self.versions.get(version or "", VersionFigures())


@dataclass(frozen=True)
class RolloutUnsupported:
    """The app answered `/rollout` with 404: it predates rollout reports (a serving image older than the
    operator). Its candidates can never get a verdict, so waiting for one would only time out."""


RolloutProbe = Callable[[str], RolloutReport | RolloutUnsupported | None]


def probe_rollout(
    url: str, *, client: httpx.Client | None = None
) -> RolloutReport | RolloutUnsupported | None:
    """The app's rollout report; RolloutUnsupported for an app without the route; None when it cannot
    be asked or answers with something else: the caller then promotes nothing."""
    response = get_answer(url, "/rollout", client)
    if response is None:
        return None
    if response.status_code == 404:
        return RolloutUnsupported()
    if response.status_code != 200:
        return None
    try:
        return parse_rollout(response.json())
    except (ValueError, RecursionError):  # a deeply nested answer too
        return None


def parse_rollout(body: Any) -> RolloutReport | None:
    """`/rollout`'s body as a RolloutReport (pure); None when it is not one."""
    if not isinstance(body, dict):
        return None
    try:
        smoke_raw = body.get("smoke") or {}
        shadow_raw = body.get("shadow") or {}
        versions_raw = body.get("versions") or {}
        if (
            not isinstance(smoke_raw, dict)
            or not isinstance(shadow_raw, dict)
            or not isinstance(versions_raw, dict)
        ):
            return None
        return RolloutReport(
            generation=_opt_int(body.get("generation")),
            candidate=None if body.get("candidate") is None else str(body["candidate"]),
            mode=_one_of(body.get("mode"), ("smoke", "canary", "shadow")),  # type: ignore[arg-type]
            percent=int(body.get("percent") or 0),
            replicas=int(body.get("replicas") or 0),
            smoke=SmokeReport(
                state=_one_of(smoke_raw.get("state"), ("pending", "passed", "failed")) or "pending",  # type: ignore[arg-type]
                replicas_passed=int(smoke_raw.get("replicas_passed") or 0),
                replicas_failed=int(smoke_raw.get("replicas_failed") or 0),
                code=_opt_str(smoke_raw.get("code")),
                message=_opt_str(smoke_raw.get("message")),
            ),
            versions={str(v): _version_figures(f) for v, f in versions_raw.items()},
            shadow=ShadowFigures(
                compared=int(shadow_raw.get("compared") or 0),
                disagreements=int(shadow_raw.get("disagreements") or 0),
                errors=int(shadow_raw.get("errors") or 0),
                p95_ms=_opt_float(shadow_raw.get("p95_ms")),
            ),
            partial=body.get("partial") is True,
        )
    except (TypeError, ValueError):
        return None


def _version_figures(raw: Any) -> VersionFigures:
    if not isinstance(raw, dict):
        raise ValueError("version figures must be an object")
    return VersionFigures(
        requests=int(raw.get("requests") or 0),
        errors=int(raw.get("errors") or 0),
        p95_ms=_opt_float(raw.get("p95_ms")),
    )


def _one_of(value: Any, allowed: tuple[str, ...]) -> str | None:
    return value if isinstance(value, str) and value in allowed else None


def _opt_int(value: Any) -> int | None:
    return None if value is None else int(value)


def _opt_float(value: Any) -> float | None:
    return None if value is None else float(value)


def _opt_str(value: Any) -> str | None:
    return None if value is None else str(value)[:500]
