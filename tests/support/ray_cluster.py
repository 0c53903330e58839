"""A real local Ray cluster with Serve and its dashboard, driven through the dashboard's REST API.

Applications are deployed with local mode's own dashboard client (`targets.local.ServeDashboard`), the
way KubeRay deploys them: a Serve config PUT to `/api/serve/applications/`, merged with the applications
already there (a PUT replaces the set).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import httpx
from regserve_operator.sandbox.processes import free_port, wait_for
from regserve_operator.targets.local import ServeDashboard, ray_auth_token


@dataclass
class LocalRay:
    dashboard_url: str
    serve_url: str
    metrics_url: str = ""
    # The production dashboard client, with the token when Ray's token auth is on.
    dashboard: ServeDashboard = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.dashboard = ServeDashboard(self.dashboard_url, token=ray_auth_token())

    @property
    def http_options(self) -> dict[str, Any]:
        url = httpx.URL(self.serve_url)
        return {"host": url.host, "port": url.port}

    def applications(self) -> dict[str, Any]:
        return self.dashboard.applications()

    def deploy(self, app_config: dict[str, Any]) -> None:
        """Replace or add `app_config`, keeping the other applications (GET, merge, PUT)."""
        self.dashboard.deploy([app_config], self.http_options)

    def delete(self, name: str) -> None:
        self.dashboard.remove({name}, self.http_options)

    def status(self, name: str) -> str | None:
        app = self.applications().get(name)
        return app["status"] if app else None

    def wait_running(self, name: str, *, timeout: float = 180) -> None:
        def running() -> bool:
            app = self.applications().get(name) or {}
            if app.get("status") == "DEPLOY_FAILED":
                raise AssertionError(f"application {name} failed: {app.get('message')}")
            return app.get("status") == "RUNNING"

        wait_for(running, timeout=timeout, interval=0.5, message=f"Serve application {name} RUNNING")


def start_local_ray(*, num_cpus: int = 8) -> LocalRay:
    """Start Ray in this process with more logical CPUs than cores, so replicas never wait for CPUs."""
    import ray
    from ray import serve

    dashboard_port = free_port()
    metrics_port = free_port()
    ray.init(
        # "local": a new cluster even when `ray start` left one (and its address file) on this machine.
        address="local",
        _metrics_export_port=metrics_port,
        num_cpus=num_cpus,
        include_dashboard=True,
        dashboard_host="127.0.0.1",
        dashboard_port=dashboard_port,
        log_to_driver=False,
        configure_logging=False,
    )
    serve_port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": serve_port})
    local = LocalRay(
        dashboard_url=f"http://127.0.0.1:{dashboard_port}",
        serve_url=f"http://127.0.0.1:{serve_port}",
        metrics_url=f"http://127.0.0.1:{metrics_port}/metrics",
    )
    wait_for(lambda: local.applications() is not None, timeout=120, interval=0.5, message="Ray dashboard")
    return local


def stop_local_ray() -> None:
    import ray
    from ray import serve

    try:
        serve.shutdown()
    finally:
        ray.shutdown()


def wait_until_answering(url: str, *, timeout: float = 120) -> None:
    """RUNNING in Serve's status does not mean the proxy already routes to the app (it may be restarting)."""

    def answering() -> bool:
        return httpx.get(f"{url}/healthz", timeout=10).status_code == 200

    wait_for(answering, timeout=timeout, interval=0.5, message=f"{url}/healthz answering")


@contextmanager
def deployed_app(local_ray: LocalRay, app_config: dict[str, Any]) -> Iterator[str]:
    """Deploys `app_config` and gives its URL once Serve runs it and the proxy routes to it.

    The application is deleted on the way out, also when it never came up: a half-deployed app would keep
    its replicas and route for the rest of the session.
    """
    name = app_config["name"]
    local_ray.deploy(app_config)
    try:
        local_ray.wait_running(name)
        url = f"{local_ray.serve_url}{app_config['route_prefix']}"
        wait_until_answering(url)
        yield url
    finally:
        local_ray.delete(name)
