"""Local mode's Target: a Ray cluster on this machine, driven the way KubeRay drives one.

KubeRay submits a RayService's `serveConfigV2` to the head's dashboard (`PUT /api/serve/applications/`)
and reports the applications' states in the RayService status. This target does the same against a
local dashboard, so `reconcile()` runs unchanged:

- `apply` GETs the deployed Serve configs, replaces ours, PUTs the whole set (a PUT replaces every
  application, so other people's applications must be carried over);
- `get` returns the last applied RayService with a `status` synthesised from the dashboard, in
  KubeRay's shape (`conditions[Ready]`, `activeServiceStatus.applicationStatuses`).

The status is Ray's view only, as KubeRay's is: whether an in-place switch of the default version
took is asked of the app itself by the reconcile (`probe.py`), the same way on both targets.
`rayClusterConfig` has no local meaning: cluster-shape changes are accepted and ignored.
"""

from __future__ import annotations

import copy
import logging
import os
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import httpx
import yaml

from regserve_operator.plan import Plan
from regserve_operator.ports import CredentialsUnavailable, TargetConflict
from serving_app.config import DEPLOYMENT_NAME

log = logging.getLogger(__name__)

# Registry credentials in local mode come from the environment, as MLflow's own client reads them.
# Ray deletes an application's replicas within seconds; how often the delete looks whether it has.
DELETE_POLL_S = 0.25

CREDENTIAL_ENV = ("MLFLOW_TRACKING_TOKEN", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")


def ray_auth_token() -> str | None:
    """The dashboard token when Ray's token auth is on (env, or the file `ray start` writes)."""
    if os.environ.get("RAY_AUTH_MODE", "").lower() == "disabled":
        return None
    token = os.environ.get("RAY_AUTH_TOKEN")
    path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH", Path.home() / ".ray" / "auth_token"))
    if not token and path.exists():
        token = path.read_text().strip()
    return token or None


class ServeDashboard:
    """The Ray dashboard's Serve REST API."""

    def __init__(self, dashboard_url: str, *, token: str | None = None, timeout_s: float = 30) -> None:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        # A browser-like request is refused for writes; identify as a tool.
        headers["User-Agent"] = "regserve-local"
        self._http = httpx.Client(base_url=dashboard_url.rstrip("/"), headers=headers, timeout=timeout_s)

    def applications(self) -> dict[str, Any]:
        response = self._http.get("/api/serve/applications/")
        response.raise_for_status()
        return dict(response.json().get("applications") or {})

    def running_replicas(self, app: str) -> int:
        """How many replicas of the app's serving deployment Serve runs now."""
        deployments = (self.applications().get(app) or {}).get("deployments") or {}
        replicas = (deployments.get(DEPLOYMENT_NAME) or {}).get("replicas") or []
        return sum(1 for replica in replicas if replica.get("state") == "RUNNING")

    def put_applications(self, applications: list[dict[str, Any]], http_options: dict[str, Any]) -> None:
        body = {"http_options": http_options, "applications": applications}
        response = self._http.put("/api/serve/applications/", json=body)
        if response.status_code >= 400:
            raise RuntimeError(
                f"the Ray dashboard refused the Serve config ({response.status_code}): {response.text}"
            )

    def deploy(self, apps: list[dict[str, Any]], http_options: dict[str, Any]) -> None:
        """Replace or add `apps`, keeping every other deployed application (GET, merge, PUT)."""
        ours = {app["name"] for app in apps}
        kept = [
            details["deployed_app_config"]
            for name, details in self.applications().items()
            if name not in ours and details.get("deployed_app_config")
        ]
        self.put_applications([*kept, *apps], http_options)

    def remove(self, names: set[str], http_options: dict[str, Any]) -> None:
        kept = [
            details["deployed_app_config"]
            for name, details in self.applications().items()
            if name not in names and details.get("deployed_app_config")
        ]
        self.put_applications(kept, http_options)


class LocalRayTarget:
    def __init__(
        self,
        dashboard: ServeDashboard,
        *,
        serve_host: str = "127.0.0.1",
        serve_port: int = 8000,
    ) -> None:
        self._dashboard = dashboard
        self._serve_host = serve_host
        self._serve_port = serve_port
        self._objects: dict[tuple[str, str], dict[str, Any]] = {}
        self._lock = threading.Lock()

    @property
    def http_options(self) -> dict[str, Any]:
        return {"host": self._serve_host, "port": self._serve_port}

    # ------------------------------------------------------------------------------------- Target

    def get(self, namespace: str, name: str) -> dict[str, Any] | None:
        with self._lock:
            stored = self._objects.get((namespace, name))
            if stored is None:
                return None
            rayservice = copy.deepcopy(stored)
        rayservice["status"] = self._status(rayservice)
        return rayservice

    def apply(self, plan: Plan) -> None:
        if not plan.writes:
            return
        desired = copy.deepcopy(plan.desired)
        key = (plan.namespace, plan.name)
        with self._lock:
            current = self._objects.get(key)
            expected = _resource_version(plan.patch)
            if current is not None and expected is not None and expected != _version_of(current):
                raise TargetConflict(f"{plan.namespace}/{plan.name} changed since it was read")
            config = yaml.safe_load(desired["spec"]["serveConfigV2"])
            self._dashboard.deploy(list(config.get("applications") or []), self.http_options)
            metadata = desired.setdefault("metadata", {})
            metadata["resourceVersion"] = str(int(_version_of(current) or "0") + 1)
            metadata.setdefault("uid", f"local-{plan.namespace}-{plan.name}")
            self._objects[key] = desired
        log.info("applied %s to the local Ray cluster (%s)", plan.name, plan.action)

    def members(self, namespace: str, cluster: str) -> list[dict[str, Any]]:
        return []  # local mode serves every resource on the one local cluster: placement is dropped

    def read_credentials(self, namespace: str, secret_name: str) -> Mapping[str, str]:
        values = {key: os.environ[key] for key in CREDENTIAL_ENV if os.environ.get(key)}
        if not values:
            raise CredentialsUnavailable(
                f"local mode reads registry credentials from {', '.join(CREDENTIAL_ENV)}; none is set "
                f"(the resource names Secret {secret_name!r})"
            )
        return values

    def url(self, namespace: str, name: str, route_prefix: str) -> str:
        return f"http://{self._serve_host}:{self._serve_port}{route_prefix}"

    def delete(self, namespace: str, name: str, *, wait_s: float = 0.0) -> bool:
        """Remove the RayService's Serve applications; with `wait_s`, wait (polling) until Ray has
        deleted them, so that a resource of the same name applied next starts from nothing. False if
        they were still there at the deadline."""
        with self._lock:
            stored = self._objects.pop((namespace, name), None)
        if stored is None:
            return True
        names = set(_app_names(stored))
        self._dashboard.remove(names, self.http_options)
        deadline = time.monotonic() + wait_s
        while names & set(self._dashboard.applications()):
            if time.monotonic() >= deadline:
                return False
            time.sleep(DELETE_POLL_S)
        return True

    # ------------------------------------------------------------------------------------- status

    def _status(self, rayservice: dict[str, Any]) -> dict[str, Any]:
        try:
            deployed = self._dashboard.applications()
        except httpx.HTTPError as error:
            log.warning("Ray dashboard unreachable: %s", error)
            return {"conditions": [{"type": "Ready", "status": "Unknown", "reason": "DashboardUnreachable"}]}
        statuses: dict[str, Any] = {}
        for app in _applications(rayservice):
            details = deployed.get(app["name"])
            if details is None:
                continue
            statuses[app["name"]] = _app_status(app, details)
        ready = bool(statuses) and all(s["status"] == "RUNNING" for s in statuses.values())
        return {
            "conditions": [{"type": "Ready", "status": "True" if ready else "False"}],
            "activeServiceStatus": {"applicationStatuses": statuses},
        }


def _app_status(app: dict[str, Any], details: dict[str, Any]) -> dict[str, Any]:
    status = str(details.get("status") or "NOT_STARTED")
    message = str(details.get("message") or "")
    deployments = {
        name: {"status": d.get("status"), "message": d.get("message") or ""}
        for name, d in (details.get("deployments") or {}).items()
    }
    wanted = _wanted_default(app)
    if status == "RUNNING" and wanted is not None and _wanted_default(deployed_config(details)) != wanted:
        # Ray reports RUNNING for a moment after a new config is PUT, before its controller
        # acts: RUNNING counts only once Ray has taken the config this target applied.
        status, message = "DEPLOYING", f"Ray has not taken the config with default version {wanted} yet"
    return {"status": status, "message": message, "serveDeploymentStatuses": deployments}


def deployed_config(details: dict[str, Any]) -> dict[str, Any]:
    return dict(details.get("deployed_app_config") or {})


def _applications(rayservice: dict[str, Any]) -> list[dict[str, Any]]:
    text = (rayservice.get("spec") or {}).get("serveConfigV2") or ""
    config = yaml.safe_load(text) or {}
    return list(config.get("applications") or [])


def _app_names(rayservice: dict[str, Any]) -> list[str]:
    return [app["name"] for app in _applications(rayservice)]


def _wanted_default(app: dict[str, Any]) -> str | None:
    for deployment in app.get("deployments") or []:
        version = (deployment.get("user_config") or {}).get("default_version")
        if version is not None:
            return str(version)
    return None


def _version_of(obj: dict[str, Any] | None) -> str | None:
    return None if obj is None else (obj.get("metadata") or {}).get("resourceVersion")


def _resource_version(patch: list[dict[str, Any]]) -> str | None:
    for op in patch:
        if op.get("op") == "test" and op.get("path") == "/metadata/resourceVersion":
            return str(op.get("value"))
    return None
