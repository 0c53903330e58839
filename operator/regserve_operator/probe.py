"""Asking the serving application itself which default version answers.

KubeRay reports an application RUNNING once Ray Serve has applied its config. A promotion is an
in-place `reconfigure()`: when the new version fails to load there, the app keeps its old default
answering (nothing stops serving) and Ray Serve sees nothing wrong, so RUNNING alone cannot confirm a
rollout. `/healthz` is open even when bearer-token auth is on and names the default it answers with.
"""

from __future__ import annotations

import httpx

TIMEOUT_S = 2.0


def answering_default(url: str) -> str | None:
    """The default version the application at `url` answers with; None when it cannot be asked
    (unreachable, not ready, an older app): the caller then goes by KubeRay's status alone."""
    try:
        response = httpx.get(f"{url.rstrip('/')}/healthz", timeout=TIMEOUT_S)
    except httpx.HTTPError:
        return None
    if response.status_code != 200:
        return None
    try:
        version = response.json().get("default_version")
    except (ValueError, AttributeError):
        return None
    return None if version is None else str(version)
