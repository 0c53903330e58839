"""Shared pieces of the benchmarks: a Ray cluster per ingress mode, `mlflow models serve`, the load
generator process, medians over interleaved rounds, markdown tables and the machine's load."""

from __future__ import annotations

import json
import os
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
from regserve_operator.builders import replica_process_options
from regserve_operator.local_ray import IngressMode, LocalCluster, start_cluster
from regserve_operator.sandbox.mlflow_server import MlflowServer
from regserve_operator.sandbox.processes import free_port, start_and_wait, stop, wait_for
from regserve_operator.targets.local import ServeDashboard

from bench import wrk

if TYPE_CHECKING:
    from regserve_operator.local import DevSession

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"
PYTHON = sys.executable
INGRESS_MODES: tuple[IngressMode, ...] = ("proxy", "haproxy")


def all_serving(session: DevSession, version: str) -> bool:
    """Every resource of a local-mode session serves `version`, settled."""
    for resource in session.resources:
        status = session.status(resource.owner.name)
        ready = any(c.type == "Ready" and c.status == "True" for c in status.conditions or [])
        if not (ready and status.serving_version == version and status.rollout_version is None):
            return False
    return True


def exit_cleanly_on_sigterm() -> None:
    """SIGTERM (and SIGINT, which background shells ignore) run the `finally` blocks that stop servers."""

    def leave(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, leave)
    signal.signal(signal.SIGINT, leave)


def start_mlflow(root: Path, attempts: int = 3) -> MlflowServer:
    """A real `mlflow server`; on a loaded machine its start can exceed the helper's 90 s: retry, no leak."""
    for attempt in range(attempts):
        server = MlflowServer(root=root)
        try:
            return server.start()
        except TimeoutError:
            server.stop()
            if attempt == attempts - 1:
                raise
    raise AssertionError("unreachable")


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True, check=False).stdout.strip()


@dataclass
class RayCluster:
    """A Ray cluster as `regserve dev` starts it (`local_ray.start_cluster`: ingress mode in the Ray
    processes' env, loopback only, private ports and HAProxy files, stopped with nothing left)."""

    ingress: IngressMode
    workdir: Path
    num_cpus: int = 8
    ingress_metrics: bool = False
    dashboard_port: int = field(default_factory=free_port)
    serve_port: int = field(default_factory=free_port)
    cluster: LocalCluster | None = None
    dashboard: ServeDashboard | None = None

    @property
    def dashboard_url(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    @property
    def serve_url(self) -> str:
        return f"http://127.0.0.1:{self.serve_port}"

    @property
    def http_options(self) -> dict[str, Any]:
        return {"host": "127.0.0.1", "port": self.serve_port}

    def start(self) -> RayCluster:
        self.cluster = start_cluster(
            self.dashboard_url,
            ingress_mode=self.ingress,
            num_cpus=self.num_cpus,
            log_dir=self.workdir,
            ingress_metrics=self.ingress_metrics,
        )
        self.dashboard = ServeDashboard(self.dashboard_url, token=self.cluster.token(), timeout_s=60)
        return self

    def deploy(self, apps: list[dict[str, Any]], *, timeout: float = 300) -> None:
        assert self.dashboard is not None
        self.dashboard.deploy(apps, self.http_options)
        names = {app["name"] for app in apps}

        def running() -> bool:
            assert self.dashboard is not None
            states = self.dashboard.applications()
            for name in names:
                app = states.get(name) or {}
                if app.get("status") == "DEPLOY_FAILED":
                    raise AssertionError(f"{name} failed: {app.get('message')}")
                if app.get("status") != "RUNNING":
                    return False
            return True

        wait_for(running, timeout=timeout, interval=1.0, message=f"Serve applications {sorted(names)}")

    def remove(self, names: set[str]) -> None:
        assert self.dashboard is not None
        self.dashboard.remove(names, self.http_options)

    def stop(self) -> None:
        if self.cluster is not None:
            self.cluster.stop()
            self.cluster = None


def regserve_app(
    name: str,
    model: str,
    version: str,
    tracking_uri: str,
    *,
    batch: int = 1,
    replicas: int = 1,
    access_log: bool = False,
    **extra: Any,
) -> dict[str, Any]:
    """A Serve config application as local mode writes it (version in user_config; Serve's access
    log off unless `serving.accessLog`; the replica's env)."""
    return {
        "name": name,
        "route_prefix": f"/{name}",
        "import_path": "serving_app.app:build_app",
        "args": {
            "model_name": model,
            "tracking_uri": tracking_uri,
            "max_batch_size": batch,
            "batch_wait_timeout_s": 0.005 if batch > 1 else 0.0,
            **extra,
        },
        "deployments": [
            {
                "name": "ModelServer",
                "num_replicas": replicas,
                "user_config": {"default_version": version},
                **replica_process_options({"num_cpus": 0.5}, access_log=access_log),
            }
        ],
    }


def bare_app(name: str, model_uri: str, *, batch: int = 1) -> dict[str, Any]:
    return {
        "name": name,
        "route_prefix": f"/{name}",
        "import_path": "bench.bare_app:build",
        "args": {"model_uri": model_uri, "max_batch_size": batch, "batch_wait_timeout_s": 0.005},
    }


def thin_app(
    name: str, model: str, version: str, *, batch: int = 1, slots: int = 2, model_replicas: int = 1
) -> dict[str, Any]:
    return {
        "name": name,
        "route_prefix": f"/{name}",
        "import_path": "bench.thin_app:build",
        "args": {
            "model_name": model,
            "default_version": version,
            "max_batch_size": batch,
            "batch_wait_timeout_s": 0.005,
            "max_models_per_replica": slots,
            "model_replicas": model_replicas,
        },
    }


@dataclass
class MlflowModelsServe:
    """`mlflow models serve --env-manager local` (uvicorn, one worker) on the same registered model."""

    model_uri: str
    tracking_uri: str
    workdir: Path
    port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> MlflowModelsServe:
        self.workdir.mkdir(parents=True, exist_ok=True)
        command = [
            PYTHON, "-m", "mlflow", "models", "serve", "-m", self.model_uri, "--env-manager", "local",
            "-h", "127.0.0.1", "-p", str(self.port),
        ]  # fmt: skip
        self.process = start_and_wait(
            command,
            log=self.workdir / f"mlflow-serve-{self.port}.log",
            ready=lambda: httpx.get(f"{self.url}/ping", timeout=2).status_code == 200,
            what=f"mlflow models serve {self.model_uri}",
            timeout=240,
            interval=0.5,
            # It execs `uvicorn` by name: the virtualenv's bin must be on PATH.
            env={
                "MLFLOW_TRACKING_URI": self.tracking_uri,
                "PATH": f"{Path(PYTHON).parent}:{os.environ['PATH']}",
            },
        )
        return self

    def stop(self) -> None:
        if self.process is not None:
            stop(self.process)
            self.process = None


def cell(
    url: str,
    body: Any,
    *,
    concurrency: int,
    duration_s: float,
    headers: dict[str, str] | None = None,
    bodies: Sequence[tuple[Any, dict[str, str]]] | None = None,
    warmup_s: float = 1.0,
) -> dict[str, Any]:
    """One measurement for `load_cells`."""
    spec: dict[str, Any] = {
        "url": url,
        "body": json.dumps(body),
        "headers": headers or {},
        "concurrency": concurrency,
        "duration_s": duration_s,
        "warmup_s": warmup_s,
    }
    if bodies:
        spec["bodies"] = [[json.dumps(b), h] for b, h in bodies]
    return spec


def load_cells(cells: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Run cells one after the other, each from a `wrk` process of its own beside the servers."""
    return [wrk.run_cell(spec) for spec in cells]


def load(url: str, body: Any, **options: Any) -> dict[str, Any]:
    """One measurement from a wrk process of its own."""
    return load_cells([cell(url, body, **options)])[0]


def check(url: str, body: Any, headers: dict[str, str] | None = None) -> httpx.Response:
    response = httpx.post(url, json=body, headers=headers or {}, timeout=120)
    if response.status_code != 200:
        raise AssertionError(f"{url} answered {response.status_code}: {response.text[:500]}")
    return response


def median(values: Sequence[float]) -> float:
    clean = [v for v in values if v == v]
    return statistics.median(clean) if clean else float("nan")


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    def cell(value: Any) -> str:
        if isinstance(value, float):
            return f"{value:.2f}" if abs(value) < 10 else f"{value:.0f}"
        return str(value)

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def save_json(name: str, data: Any) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(data, indent=2, default=str))
    return path


def stamp() -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
