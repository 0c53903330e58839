"""The one question the operator asks the serving application: which default answers, and why the
last switch failed.

KubeRay reports an application RUNNING once Ray Serve has applied its config. A promotion is an
in-place `reconfigure()`: when the new version fails to load there, the app keeps its old default
answering (nothing stops serving) and Ray Serve sees nothing wrong, so RUNNING alone cannot confirm a
rollout. Both targets (Kubernetes and local) ask the app through this module.

`/healthz` rather than `/metadata`: it stays open when bearer-token auth is on (the operator holds no
client token), and it carries only the default version and the failed switch's stable error code,
never a message, so it leaks nothing a health check should not.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import httpx

TIMEOUT_S = 2.0
REGISTRY_UNAVAILABLE_CODE = "registry_unavailable"  # serving_app's error code for an unreachable registry


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
    try:
        if client is not None:
            response = client.get(f"{url.rstrip('/')}/healthz", timeout=TIMEOUT_S)
        else:
            response = httpx.get(f"{url.rstrip('/')}/healthz", timeout=TIMEOUT_S)
    except httpx.HTTPError:
        return None
    if response.status_code != 200:
        return None
    try:
        body = response.json()
    except ValueError:
        return None
    return parse_report(body)


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
