"""A `regserve dev` killed without warning (SIGKILL: no handler, no `finally`) leaves nothing: its Ray
cluster (`ray start`, its daemons, workers, replicas, HAProxy), its temp dir with the auth token, its
ports and Ray's address file are gone within a deadline (real Ray, real MLflow)."""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import httpx
import pytest
from mlflow import MlflowClient
from regserve_operator.sandbox.mlflow_server import MlflowServer
from regserve_operator.sandbox.models import log_sklearn_classifier
from regserve_operator.sandbox.processes import free_port, session_members, start_and_wait, stop, wait_for

from tests.local.test_local_ray import Listener, command_line, listeners, ray_session_of, twin_yaml

pytestmark = [pytest.mark.ray, pytest.mark.slow]

GONE_WITHIN_S = 60.0


def _all_pids() -> set[int]:
    return {int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit()}


def _reapers_of(parent: int) -> list[int]:
    found = []
    for pid in _all_pids():
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
            if int(stat[stat.rindex(")") + 2 :].split()[1]) == parent and any(
                "regserve_operator.sandbox.reaper" in arg for arg in command_line(pid)
            ):
                found.append(pid)
        except (OSError, ValueError):
            continue
    return found


def _with_haproxy(held: list[Listener]) -> list[Listener] | None:
    return held if any(listener.command == "haproxy" for listener in held) else None


def test_a_sigkilled_regserve_dev_leaves_nothing(mlflow_server: MlflowServer, tmp_path: Path) -> None:
    version, samples, _ = log_sklearn_classifier(mlflow_server.url, "killed_model")
    MlflowClient(mlflow_server.url).set_registered_model_alias("killed_model", "champion", version)
    (tmp_path / "rms.yaml").write_text(twin_yaml("killed_model", mlflow_server.url))
    dashboard_port, serve_port = free_port(), free_port()
    body = [list(map(float, row)) for row in samples[:2]]

    def answers() -> bool:
        return (
            httpx.post(f"http://127.0.0.1:{serve_port}/twin/serve", json=body, timeout=30).status_code == 200
        )

    command = [
        sys.executable, "-m", "regserve_operator.cli", "dev", "-f", str(tmp_path / "rms.yaml"),
        "--dashboard", f"http://127.0.0.1:{dashboard_port}", "--serve-port", str(serve_port),
        "--webhook-port", "-1", "--num-cpus", "4",
    ]  # fmt: skip
    dev = start_and_wait(
        command,
        log=tmp_path / "dev.log",
        ready=answers,
        what="regserve dev serving",
        timeout=480,
        cwd=tmp_path,
    )
    session = 0
    try:
        session = ray_session_of(dashboard_port)
        ray_start = command_line(session)
        gcs = "127.0.0.1:" + next(arg.split("=")[1] for arg in ray_start if arg.startswith("--port="))
        temp_dir = Path(next(arg.split("=")[1] for arg in ray_start if arg.startswith("--temp-dir=")))
        # HAProxy reloads (a new process) as replicas come and go: wait for one to be listening.
        held = wait_for(
            lambda: _with_haproxy(listeners(set(session_members(session)))),
            timeout=60,
            message="HAProxy listening in the Ray session",
        )
        (reaper,) = _reapers_of(dev.pid)
        assert (temp_dir / "auth_token").exists()

        os.kill(dev.pid, signal.SIGKILL)  # the process only, as `kill -9 <pid>` does
        dev.wait(timeout=10)

        wait_for(
            lambda: not session_members(session), timeout=GONE_WITHIN_S, message="the Ray session to end"
        )
        wait_for(lambda: not Path(f"/proc/{reaper}").exists(), timeout=GONE_WITHIN_S, message="the reaper")
        assert not temp_dir.exists(), "the temp dir (auth token, address file) was left"
        ports = {listener.port for listener in held}
        still = [listener for listener in listeners(_all_pids()) if listener.port in ports]
        assert not still, still
        address_file = Path("/tmp/ray/ray_current_cluster")
        assert not address_file.exists() or address_file.read_text().strip() != gcs
    finally:
        stop(dev)
        for pid in session_members(session) if session else []:
            os.kill(pid, signal.SIGKILL)
