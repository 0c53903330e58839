"""Conditions of a RegisteredModelServing, and what a RayService's status says about our application. Pure."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Literal

from regserve_operator.spec import Condition

READY = "Ready"
REGISTRY_REACHABLE = "RegistryReachable"
SELECTOR_RESOLVED = "SelectorResolved"
SIGNATURE_COMPATIBLE = "SignatureCompatible"
ROLLOUT_IN_PROGRESS = "RolloutInProgress"
REQUIREMENTS_MATCH = "RequirementsMatch"
REGISTRY_TAGS_WRITTEN = "RegistryTagsWritten"  # the deployment state tags on the model versions
# Whether every key of the credentials Secret is one the operator's registry reads use.
CREDENTIALS_ACCEPTED = "CredentialsAccepted"

Status = Literal["True", "False", "Unknown"]

# Ray Serve application states (ray.serve.schema.ApplicationStatus) as KubeRay mirrors them.
APP_RUNNING = "RUNNING"
APP_FAILED = frozenset({"DEPLOY_FAILED", "UNHEALTHY"})


# Control characters (newlines, ANSI escapes) in text that came from a tenant or a registry would
# forge log lines or drive a terminal where status and Events are printed.
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
MESSAGE_LIMIT = 1024


def printable(text: str, limit: int = MESSAGE_LIMIT) -> str:
    """`text` bounded and with every control character shown as a space."""
    return _CONTROL.sub(" ", text[:limit])


def get_condition(conditions: list[Condition] | None, type_: str) -> Condition | None:
    return next((c for c in conditions or [] if c.type == type_), None)


def is_true(conditions: list[Condition] | None, type_: str) -> bool:
    cond = get_condition(conditions, type_)
    return cond is not None and cond.status == "True"


def set_condition(
    conditions: list[Condition] | None,
    type_: str,
    status: Status,
    reason: str,
    message: str,
    *,
    now: str,
    generation: int | None,
) -> list[Condition]:
    """A new list with `type_` set; lastTransitionTime moves only when the status changes."""
    old = get_condition(conditions, type_)
    changed = old is None or old.status != status
    new = Condition(
        type=type_,
        status=status,
        reason=reason,
        message=printable(message),
        last_transition_time=now if changed or old is None else old.last_transition_time,
        observed_generation=generation,
    )
    out = [c for c in conditions or [] if c.type != type_]
    out.append(new)
    return sorted(out, key=lambda c: _ORDER.get(c.type, 99))


_ORDER = {
    READY: 0,
    REGISTRY_REACHABLE: 1,
    SELECTOR_RESOLVED: 2,
    SIGNATURE_COMPATIBLE: 3,
    ROLLOUT_IN_PROGRESS: 4,
    REQUIREMENTS_MATCH: 5,
    CREDENTIALS_ACCEPTED: 6,
}


@dataclass(frozen=True)
class ServiceState:
    """Our application's state as the RayService's status reports it."""

    exists: bool
    ready: bool  # RayService condition Ready=True
    upgrading: bool  # a new cluster is coming up (UpgradeInProgress=True or a pending service)
    app_status: str | None  # RUNNING, DEPLOYING, DEPLOY_FAILED, UNHEALTHY, ... ; None when unknown
    message: str = ""

    @property
    def failed(self) -> bool:
        return self.app_status in APP_FAILED

    @property
    def running(self) -> bool:
        return self.app_status == APP_RUNNING and not self.upgrading


def read_service_state(rayservice: dict[str, Any] | None, app_name: str) -> ServiceState:
    if rayservice is None:
        return ServiceState(exists=False, ready=False, upgrading=False, app_status=None)
    status = rayservice.get("status") or {}
    conditions = {c.get("type"): c for c in status.get("conditions") or []}
    ready = (conditions.get("Ready") or {}).get("status") == "True"
    pending = _app(status.get("pendingServiceStatus"), app_name)
    upgrading = (conditions.get("UpgradeInProgress") or {}).get("status") == "True" or pending is not None
    # While a new cluster comes up, the pending one runs the new config: judge the rollout by it.
    app = pending if pending is not None else _app(status.get("activeServiceStatus"), app_name)
    if app is None:
        return ServiceState(exists=True, ready=ready, upgrading=upgrading, app_status=None)
    message = str(app.get("message") or "")
    for dep_name, dep in (app.get("serveDeploymentStatuses") or {}).items():
        if dep.get("message") and dep.get("status") not in ("HEALTHY", None):
            message = f"{message} {dep_name}: {dep['message']}".strip()
    return ServiceState(
        exists=True,
        ready=ready,
        upgrading=upgrading,
        app_status=app.get("status"),
        message=message,
    )


def _app(service_status: dict[str, Any] | None, app_name: str) -> dict[str, Any] | None:
    apps = (service_status or {}).get("applicationStatuses") or {}
    app = apps.get(app_name)
    return app if isinstance(app, dict) else None
