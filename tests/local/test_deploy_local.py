"""`mlflow deployments` against `regserve-local`: MLflow's `run-local` starts local mode for one model
(real Ray, real MLflow), and the same session then takes MLflow's client — get, predict, create that
blocks until the version answers, an update to another version, list, delete twice — and the
`regserve status` and `promote` verbs (exit code by verdict); Ctrl-C ends it and its session file, also when
it was started with SIGINT ignored (as a script's background job is)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow import MlflowClient
from mlflow.deployments import get_deploy_client
from mlflow.exceptions import MlflowException
from regserve_operator.local_client import LocalControlClient, LocalSessionNotFound
from regserve_operator.sandbox.mlflow_server import MlflowServer
from regserve_operator.sandbox.models import log_phrasebook, log_sklearn_classifier
from regserve_operator.sandbox.processes import free_port, session_members, start, stop, wait_while_running

from tests.local.test_local_ray import ray_session_of

pytestmark = [pytest.mark.ray, pytest.mark.slow]

MODEL = "deploy_local_model"
FIRST_SERVE_S = 300.0
CTRL_C_S = 120


def _ready_session(path: Path) -> LocalControlClient | None:
    try:
        client = LocalControlClient.discover(path)
        found = client.get("default", "first")
    except LocalSessionNotFound:
        return None
    status = (found or {}).get("status") or {}
    ready = any(c["type"] == "Ready" and c["status"] == "True" for c in status.get("conditions") or [])
    return client if ready else None


def test_run_local_then_the_regserve_local_target(
    mlflow_server: MlflowServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    registry = MlflowClient(mlflow_server.url)
    first, samples, expected = log_sklearn_classifier(mlflow_server.url, MODEL)
    second, _, _ = log_sklearn_classifier(mlflow_server.url, MODEL, seed=1)
    incompatible = log_phrasebook(mlflow_server.url, MODEL)  # a string column, not 4 floats
    registry.set_registered_model_alias(MODEL, "champion", first)
    session_file = tmp_path / "dev-session.json"
    dashboard_port, serve_port = free_port(), free_port()
    env = {
        "REGSERVE_DEV_SESSION": str(session_file),
        "REGSERVE_DEV_DASHBOARD": f"http://127.0.0.1:{dashboard_port}",
        "REGSERVE_DEV_SERVE_PORT": str(serve_port),
        "REGSERVE_DEV_NUM_CPUS": "4",
        "MLFLOW_TRACKING_URI": mlflow_server.url,
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    # Started as a script's background job is (SIGINT ignored, and inherited so): Ctrl-C must still work.
    ignoring = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        local = start(
            [sys.executable, "-m", "mlflow", "deployments", "run-local", "-t", "regserve-local",
             "--name", "first", "-m", f"models:/{MODEL}@champion", "-C", "cpusPerReplica=0.25"],
            log=tmp_path / "run-local.log",
            cwd=tmp_path,
        )  # fmt: skip
    finally:
        signal.signal(signal.SIGINT, ignoring)
    try:
        wait_while_running(
            local,
            lambda: _ready_session(session_file),
            log=tmp_path / "run-local.log",
            what="run-local serving the model",
            timeout=FIRST_SERVE_S,
        )
    except BaseException:
        stop(local)
        raise
    ray_session = 0
    try:
        ray_session = ray_session_of(dashboard_port)
        deployments = get_deploy_client("regserve-local")
        shown = deployments.get_deployment("first")
        assert (shown["serving_version"], shown["ready"]) == (first, True)
        assert shown["url"] == f"http://127.0.0.1:{serve_port}/first"
        predicted = deployments.predict("first", samples[:4])
        assert predicted.get_predictions(predictions_format="ndarray").tolist() == expected[:4].tolist()

        created = deployments.create_deployment(
            "second",
            f"models:/{MODEL}/{second}",
            config={"routePrefix": "/second", "cpusPerReplica": "0.25", "timeout": str(FIRST_SERVE_S)},
        )
        assert (created["serving_version"], created["ready"]) == (second, True)
        assert len(deployments.predict("second", samples[:2])["predictions"]) == 2
        with pytest.raises(MlflowException, match="already exists"):
            deployments.create_deployment("second", f"models:/{MODEL}/{second}")

        def regserve(*args: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run(
                [sys.executable, "-m", "regserve_operator.cli", *args, "-t", "regserve-local"],
                env={**os.environ, **env}, capture_output=True, text=True, timeout=FIRST_SERVE_S,
            )  # fmt: skip

        promoted = regserve("promote", "first", second, "--timeout", str(FIRST_SERVE_S))
        assert promoted.returncode == 0, promoted.stdout + promoted.stderr
        assert f"first: version {second} is serving" in promoted.stdout
        assert registry.get_model_version_by_alias(MODEL, "champion").version == second
        # A version whose signature does not match is held back: exit 1 with the status' reason, and
        # the serving version keeps answering.
        held = regserve("promote", "first", incompatible, "--timeout", str(FIRST_SERVE_S))
        assert held.returncode == 1, held.stdout + held.stderr
        assert "Incompatible" in held.stdout
        assert deployments.get_deployment("first")["serving_version"] == second
        assert len(deployments.predict("first", samples[:2])["predictions"]) == 2

        updated = deployments.update_deployment("first", model_uri=f"models:/{MODEL}/{first}")
        assert updated["serving_version"] == first
        assert sorted(d["name"] for d in deployments.list_deployments()) == ["first", "second"]

        status = regserve("status")
        assert status.returncode == 0, status.stderr
        assert [line.split()[:2] for line in status.stdout.splitlines()[1:]] == [
            ["first", first],
            ["second", second],
        ]

        deployments.delete_deployment("second")
        deployments.delete_deployment("second")  # idempotent
        with pytest.raises(MlflowException, match="no deployment second"):
            deployments.get_deployment("second")

        local.send_signal(signal.SIGINT)  # Ctrl-C
        try:
            exit_code = local.wait(timeout=CTRL_C_S)
        except subprocess.TimeoutExpired:
            log = (tmp_path / "run-local.log").read_text(errors="replace").splitlines()
            pytest.fail(
                f"Ctrl-C did not end run-local in {CTRL_C_S} s; its log ends:\n" + "\n".join(log[-15:])
            )
        assert exit_code == 0
        assert not session_file.exists()
        with pytest.raises(MlflowException, match="regserve dev"):
            get_deploy_client("regserve-local").list_deployments()
    finally:
        stop(local)
        for pid in session_members(ray_session) if ray_session else []:
            os.kill(pid, signal.SIGKILL)
