"""Local mode (`regserve dev`) driven step by step against the session's real Ray cluster.

Each test gets its own DevSession for the resources it names, so its Serve applications, statuses
and registry caches are its own; `close()` deletes the applications it deployed.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
from regserve_operator.local import DevSession, load_resources, make_session, status_summary
from regserve_operator.spec import RegisteredModelServingStatus, manifest, manifests_yaml

from tests.support.ray_cluster import LocalRay


def rms(name: str, model: str, uri: str, poll: int = 300, deadline: int = 60) -> dict[str, Any]:
    return manifest(
        name,
        {
            "model": {"name": model, "alias": "champion"},
            "registry": {"trackingUri": uri, "pollIntervalSeconds": poll},
            "serving": {"routePrefix": f"/{name}", "cpusPerReplica": 0.25},
            "rollout": {"deadlineSeconds": deadline, "smokeTest": False},
        },
    )


def condition(status: RegisteredModelServingStatus, type_: str) -> tuple[str, str, str]:
    for cond in status.conditions or []:
        if cond.type == type_:
            return cond.status, cond.reason or "", cond.message or ""
    return "", "", ""


class Harness:
    def __init__(self, local_ray: LocalRay, directory: Path, resources: list[dict[str, Any]]) -> None:
        path = directory / "rms.yaml"
        path.write_text(manifests_yaml(*(rms(**resource) for resource in resources)))
        self.lines: list[str] = []
        self.local_ray = local_ray
        self.session: DevSession = make_session(
            load_resources(path),
            dashboard_url=local_ray.dashboard_url,
            serve_port=int(httpx.URL(local_ray.serve_url).port or 0),
            out=self.lines.append,
            log_dir=directory,
        )
        self.step_seconds: list[float] = []

    def close(self) -> None:
        for resource in self.session.resources:
            self.session.target.delete(resource.owner.namespace, resource.owner.name)

    def status(self, name: str) -> RegisteredModelServingStatus:
        return self.session.status(name)

    def summary(self, name: str) -> dict[str, Any]:
        return status_summary(self.status(name))

    def step(self) -> None:
        started = time.monotonic()
        self.session.step()
        self.step_seconds.append(time.monotonic() - started)

    def run_until(
        self, probe: Callable[[], Any], *, timeout: float, what: str, tick_s: float = 0.25
    ) -> float:
        """Reconcile until `probe` holds; returns the seconds it took."""
        started = time.monotonic()
        deadline = started + timeout
        while True:
            self.step()
            if probe():
                return time.monotonic() - started
            if time.monotonic() > deadline:
                summaries = {r.owner.name: self.summary(r.owner.name) for r in self.session.resources}
                raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}: {summaries}")
            time.sleep(tick_s)

    def serving(self, name: str, version: str) -> bool:
        status = self.status(name)
        ready = condition(status, "Ready")[0] == "True"
        return status.serving_version == version and ready and status.rollout_version is None

    def ask(self, name: str, timeout: float = 30) -> httpx.Response:
        return httpx.post(
            f"{self.local_ray.serve_url}/{name}/serve", json={"prompt": "Hello"}, timeout=timeout
        )

    def answer(self, name: str) -> Any:
        response = self.ask(name)
        assert response.status_code == 200, (response.status_code, response.text)
        return response.json()

    def deployed_default(self, name: str) -> str | None:
        app = self.local_ray.applications().get(name) or {}
        deployments = (app.get("deployed_app_config") or {}).get("deployments") or [{}]
        return (deployments[0].get("user_config") or {}).get("default_version")
