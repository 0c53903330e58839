"""The Ray cluster `regserve dev` starts is the cluster's twin and leaves nothing behind (real Ray).

`regserve dev` runs as a user runs it, in a process of its own, on a free dashboard and Serve port; its
Ray cluster is found through the process listening on the dashboard port (everything Ray starts stays
in the session `ray start` opens).
"""

from __future__ import annotations

import logging
import os
import signal
import stat
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from mlflow import MlflowClient
from regserve_operator.local import WEBHOOK_PREFIX
from regserve_operator.local_ray import (
    ALL_INTERFACES_IN_RAY,
    ensure_ray,
)
from regserve_operator.sandbox.mlflow_server import MlflowServer
from regserve_operator.sandbox.models import log_sklearn_classifier
from regserve_operator.sandbox.processes import (
    free_port,
    session_members,
    start,
    start_and_wait,
    stop,
    wait_for,
)
from regserve_operator.spec import manifest, manifests_yaml

from tests.local.test_local_ray_settings import RAY_FIXED_PORTS
from tests.support.ray_cluster import LocalRay

LOOPBACK = {"127.0.0.1", "[::ffff:127.0.0.1]", "[::1]"}
pytestmark = [pytest.mark.ray, pytest.mark.slow]


def twin_yaml(model: str, uri: str) -> str:
    """The file `regserve dev -f` runs: one resource, `twin`, following `model`'s champion."""
    spec = {
        "model": {"name": model, "alias": "champion"},
        "registry": {"trackingUri": uri, "pollIntervalSeconds": 5},
        "serving": {"routePrefix": "/twin", "cpusPerReplica": 0.25},
    }
    return manifests_yaml(manifest("twin", spec))


@dataclass
class Listener:
    address: str
    port: int
    pid: int
    command: str


def listeners(pids: set[int]) -> list[Listener]:
    found = []
    out = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True, check=True, timeout=30).stdout
    for line in out.splitlines():
        fields = line.split()
        for owner in fields[5].split("),(") if len(fields) > 5 else []:
            command = owner.split('"')[1]
            pid = int(owner.split("pid=")[1].split(",")[0])
            if pid in pids:
                address, _, port = fields[3].rpartition(":")
                found.append(Listener(address, int(port), pid, command))
    return found


def ray_session_of(dashboard_port: int) -> int:
    """The session of the Ray cluster whose dashboard listens on `dashboard_port`."""
    (owner,) = {listener.pid for listener in listeners(_all_pids()) if listener.port == dashboard_port}
    return os.getsid(owner)


def _all_pids() -> set[int]:
    return {int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit()}


def command_line(pid: int) -> list[str]:
    return Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")


@dataclass
class DevRun:
    serve_url: str
    session: int  # of the Ray cluster `regserve dev` started
    gcs_address: str
    temp_dir: Path
    haproxy_ports: set[int]
    haproxy_config: str
    listeners_while_running: list[Listener]
    prediction: object
    expected: object
    # Token auth, seen while it ran: dashboard answers without / with the token, the token file's mode,
    # where the token showed (command lines, logs).
    without_token: int
    with_token: int
    token_mode: int
    token_seen_in: list[str]
    webhooks_while_running: list[str]
    webhooks_after: list[str]
    attach_refusal: str  # what a second local mode without the token said


@pytest.fixture(scope="module")
def dev_run(mlflow_server: MlflowServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[DevRun]:
    """`regserve dev` started, asked once, inspected while it runs, then stopped as Ctrl-C/SIGTERM would."""
    workdir = tmp_path_factory.mktemp("dev")
    version, samples, predictions = log_sklearn_classifier(mlflow_server.url, "twin_model")

    MlflowClient(mlflow_server.url).set_registered_model_alias("twin_model", "champion", version)
    (workdir / "rms.yaml").write_text(twin_yaml("twin_model", mlflow_server.url))
    dashboard_port, serve_port = free_port(), free_port()
    serve_url = f"http://127.0.0.1:{serve_port}"
    body = [list(map(float, row)) for row in samples[:2]]

    def answers() -> object:
        response = httpx.post(f"{serve_url}/twin/serve", json=body, timeout=30)
        return response.json() if response.status_code == 200 else None

    command = [
        sys.executable, "-m", "regserve_operator.cli", "dev", "-f", str(workdir / "rms.yaml"),
        "--dashboard", f"http://127.0.0.1:{dashboard_port}", "--serve-port", str(serve_port),
        "--num-cpus", "4",
    ]  # fmt: skip
    mlflow = MlflowClient(mlflow_server.url)

    def our_webhooks() -> list[str]:
        return [hook.name for hook in mlflow.list_webhooks() if hook.name.startswith(WEBHOOK_PREFIX)]

    assert not our_webhooks(), "a webhook of an earlier session is left"
    dev = start_and_wait(
        command, log=workdir / "dev.log", ready=answers, what="regserve dev serving", timeout=480, cwd=workdir
    )
    try:
        session = ray_session_of(dashboard_port)
        ray_start = command_line(session)
        gcs_port = next(arg.split("=")[1] for arg in ray_start if arg.startswith("--port="))
        temp_dir = Path(next(arg.split("=")[1] for arg in ray_start if arg.startswith("--temp-dir=")))
        environ = dict(
            line.split("=", 1)
            for line in Path(f"/proc/{session}/environ").read_bytes().decode().split("\0")
            if "=" in line
        )
        token_file = temp_dir / "auth_token"
        token = token_file.read_text()
        dashboard = f"http://127.0.0.1:{dashboard_port}/api/serve/applications/"
        logs = [
            workdir / "dev.log",
            *workdir.rglob("*.log"),
            *temp_dir.rglob("*.log"),
            *temp_dir.rglob("*.out"),
        ]
        token_seen_in = [
            *(
                f"command line of {pid}"
                for pid in session_members(session)
                if token in " ".join(command_line(pid))
            ),
            *(str(path) for path in logs if path.is_file() and token in path.read_text(errors="replace")),
        ]
        run = DevRun(
            serve_url=serve_url,
            session=session,
            gcs_address=f"127.0.0.1:{gcs_port}",
            temp_dir=temp_dir,
            haproxy_ports={
                int(environ["RAY_SERVE_HAPROXY_STATS_PORT"]),
                int(environ["RAY_SERVE_HAPROXY_METRICS_PORT"]),
            },
            haproxy_config="".join(path.read_text() for path in temp_dir.rglob("haproxy.cfg")),
            listeners_while_running=listeners(set(session_members(session))),
            prediction=answers(),
            expected=[int(p) for p in predictions[:2]],
            without_token=httpx.get(dashboard, timeout=10).status_code,
            with_token=httpx.get(
                dashboard, headers={"Authorization": f"Bearer {token}"}, timeout=10
            ).status_code,
            token_mode=stat.S_IMODE(token_file.stat().st_mode),
            token_seen_in=token_seen_in,
            webhooks_while_running=our_webhooks(),
            webhooks_after=[],
            attach_refusal=_attach_without_token(f"http://127.0.0.1:{dashboard_port}", workdir),
        )
    finally:
        stop(dev, timeout=120)  # SIGTERM: `regserve dev` stops the cluster it started
    run.webhooks_after = our_webhooks()
    yield run
    # Only if the test failed to see the cluster gone: stop whatever is left of it.
    for pid in session_members(run.session):
        os.kill(pid, signal.SIGKILL)


def test_serves_with_haproxy_ingress_by_default(dev_run: DevRun) -> None:
    assert dev_run.prediction == dev_run.expected
    haproxy = [lst for lst in dev_run.listeners_while_running if lst.command == "haproxy"]
    assert haproxy, "no HAProxy in the cluster regserve dev started (ingressMode defaults to haproxy)"
    serve_port = httpx.URL(dev_run.serve_url).port
    assert any(lst.port == serve_port for lst in haproxy), "HAProxy does not front the Serve port"


def test_haproxy_sends_no_per_request_metrics_by_default(dev_run: DevRun) -> None:
    """`serving.ingressMetrics` defaults to off: no log line per request to Ray's metrics collector."""
    assert "frontend http_frontend" in dev_run.haproxy_config
    assert "format rfc5424" not in dev_run.haproxy_config


def _attach_without_token(dashboard_url: str, workdir: Path) -> str:
    try:
        attached = ensure_ray(dashboard_url, ingress_mode="haproxy", num_cpus=1, log_dir=workdir)
    except SystemExit as refused:
        return str(refused)
    attached.stop()
    return ""


def test_the_dashboard_it_starts_wants_a_token_nobody_else_sees(dev_run: DevRun) -> None:
    assert dev_run.without_token in (401, 403), dev_run.without_token
    assert dev_run.with_token == 200  # and local mode deployed through it: see the serving test
    assert dev_run.prediction == dev_run.expected
    assert dev_run.token_mode == 0o600
    assert not dev_run.token_seen_in
    assert "wants a token" in dev_run.attach_refusal and "RAY_AUTH_TOKEN_PATH" in dev_run.attach_refusal


def test_its_webhook_is_registered_and_removed_on_exit(dev_run: DevRun) -> None:
    assert len(dev_run.webhooks_while_running) == 1, dev_run.webhooks_while_running
    assert not dev_run.webhooks_after


def test_ray_listens_on_loopback_only_but_for_what_ray_hard_codes(dev_run: DevRun) -> None:
    assert dev_run.listeners_while_running
    unexplained = [
        listener
        for listener in dev_run.listeners_while_running
        if listener.address not in LOOPBACK and not _hard_coded_in_ray(listener, dev_run.haproxy_ports)
    ]
    assert not unexplained, f"listening beyond loopback: {unexplained}"
    taken = {listener.port for listener in dev_run.listeners_while_running} & RAY_FIXED_PORTS
    assert not taken, f"a local cluster took Ray's fixed ports {taken}: two could not run on one host"


def _hard_coded_in_ray(listener: Listener, haproxy_ports: set[int]) -> bool:
    if listener.command == "haproxy":
        return listener.port in haproxy_ports  # its Serve frontend must be on loopback
    return any(listener.command.startswith(prefix) for prefix in ALL_INTERFACES_IN_RAY)


def test_nothing_is_left_after_it_stops(dev_run: DevRun) -> None:
    left = session_members(dev_run.session)
    assert not left, [" ".join(command_line(pid))[:200] for pid in left]
    address_file = Path("/tmp/ray/ray_current_cluster")
    if address_file.exists():
        assert address_file.read_text().strip() != dev_run.gcs_address
    assert not dev_run.temp_dir.exists()


def test_a_plain_ray_init_works_afterwards(dev_run: DevRun, tmp_path: Path) -> None:
    assert not session_members(dev_run.session)
    script = "import ray; ray.init(); print('CPUS', ray.cluster_resources().get('CPU')); ray.shutdown()"
    log = tmp_path / "ray-init.log"
    env = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"}
    process = start([sys.executable, "-c", script], log=log, env=env, inherit_env=False)
    try:
        process.wait(timeout=240)  # a stale address file made this hang for good
    except subprocess.TimeoutExpired:
        pytest.fail(f"ray.init() hung after regserve dev stopped:\n{log.read_text()[-3000:]}")
    finally:
        stop(process, timeout=30)
    assert process.returncode == 0, log.read_text()[-3000:]
    assert "CPUS" in log.read_text()


def test_attached_to_a_cluster_in_another_mode_it_says_so(
    local_ray: LocalRay, caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    """The session's cluster runs Ray's Python proxy; resources default to haproxy."""
    with caplog.at_level(logging.INFO, logger="regserve.dev"):
        attached = ensure_ray(local_ray.dashboard_url, ingress_mode="haproxy", num_cpus=1, log_dir=tmp_path)
        assert attached.process is None  # attached, not started: stop() must leave it alone
        wait_for(
            lambda: "serves with proxy ingress, not haproxy" in caplog.text,
            timeout=60,
            message="the ingress mode warning",
        )
        ensure_ray(local_ray.dashboard_url, ingress_mode="proxy", num_cpus=1, log_dir=tmp_path)
        wait_for(lambda: "(proxy ingress)" in caplog.text, timeout=60, message="the attached-mode line")
    attached.stop()
    assert local_ray.applications() is not None
