"""`regserve dev` with no file, driven through its control API as a deployments client drives it (real
Ray, real MLflow, `regserve dev` in a process of its own): a resource applied at runtime comes up and
answers, is listed, and when deleted its Serve app goes; the session file lives as long as the process."""

from __future__ import annotations

import os
import signal
import stat
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from mlflow import MlflowClient
from regserve_operator.local import WEBHOOK_PREFIX
from regserve_operator.local_client import LocalControlClient, LocalSessionNotFound
from regserve_operator.sandbox.mlflow_server import MlflowServer
from regserve_operator.sandbox.models import log_sklearn_classifier
from regserve_operator.sandbox.processes import free_port, session_members, start_and_wait, stop, wait_for
from regserve_operator.spec import manifest
from regserve_operator.tags import tag_key
from regserve_operator.targets.local import ServeDashboard

from tests.local.test_local_ray import command_line, ray_session_of
from tests.support import monitored

pytestmark = [pytest.mark.ray, pytest.mark.slow]

MODEL = "control_api_model"


def ctl_manifest(uri: str) -> dict[str, Any]:
    spec = {
        "model": {"name": MODEL, "alias": "champion"},
        "registry": {"trackingUri": uri, "pollIntervalSeconds": 5},
        "serving": {"routePrefix": "/ctl", "cpusPerReplica": 0.25},
    }
    return manifest("ctl", spec, namespace="default")


def discovered(path: Path) -> LocalControlClient | None:
    try:
        client = LocalControlClient.discover(path)
        client.list()
    except LocalSessionNotFound:
        return None
    return client


def ready(found: dict[str, Any] | None, version: str) -> bool:
    status = (found or {}).get("status") or {}
    conditions = {c["type"]: c["status"] for c in status.get("conditions") or []}
    return conditions.get("Ready") == "True" and status.get("servingVersion") == version


def our_webhooks(mlflow: MlflowClient) -> list[str]:
    return [hook.webhook_id for hook in mlflow.list_webhooks() if hook.name.startswith(WEBHOOK_PREFIX)]


def monitored_manifest(uri: str) -> dict[str, Any]:
    spec = {
        "model": {"name": monitored.MODEL, "alias": "champion"},
        "registry": {"trackingUri": uri, "pollIntervalSeconds": 5},
        "serving": {"routePrefix": "/monitored", "cpusPerReplica": 0.25},
        "monitoring": {
            "payloads": {"sampleRate": 1.0},
            "drift": {"windowSeconds": 10, "minRows": 50, "psiThreshold": 0.2},
        },
    }
    return manifest("monitored", spec, namespace="default")


def check_monitoring(client: LocalControlClient, uri: str, tmp_path: Path) -> None:
    """spec.monitoring in local mode: a client shifting one feature → InputDrift naming it, the
    window's figures in status and on the version's MLflow run, the payloads beside them."""
    mlflow = MlflowClient(uri)
    version = monitored.log_with_training_data(uri, tmp_path)
    mlflow.set_registered_model_alias(monitored.MODEL, "champion", version)
    client.apply(monitored_manifest(uri))
    wait_for(lambda: ready(client.get("default", "monitored"), version), timeout=300, message="Ready")

    def drift_condition() -> dict[str, Any] | None:
        status = (client.get("default", "monitored") or {}).get("status") or {}
        found = [c for c in status.get("conditions") or [] if c["type"] == "InputDrift"]
        return found[0] if found and found[0]["status"] == "True" else None

    with monitored.Traffic(f"{client.serve_url}/monitored", shift=2.0) as traffic:
        condition = wait_for(drift_condition, timeout=120, interval=1, message="InputDrift=True")
    assert traffic.failures == 0
    assert condition["reason"] == "Drifted"
    assert condition["message"].startswith(f"version {version}: x (PSI ")
    status = (client.get("default", "monitored") or {})["status"]
    (figures,) = [f for f in status["monitoring"]["versions"] if f["version"] == version]
    assert figures["reference"] == "training" and figures["drifted"] == ["x"]
    assert figures["requests"] > 0 and figures["errorRate"] == 0.0

    experiment = mlflow.get_experiment_by_name("regserve/default/monitored")
    assert experiment is not None
    (run,) = mlflow.search_runs(
        [experiment.experiment_id], filter_string=f"tags.`regserve.model_version` = '{version}'"
    )
    assert [m.value for m in mlflow.get_metric_history(run.info.run_id, "psi.x")][-1] > 0.2
    assert mlflow.get_metric_history(run.info.run_id, "requests")
    wait_for(
        lambda: mlflow.list_artifacts(run.info.run_id, "payloads"), timeout=60, message="payload records"
    )
    logged = [c for c in status["conditions"] if c["type"] == "PayloadsLogged"]
    assert logged and logged[0]["status"] == "True", status["conditions"]

    # A sink nobody listens at: PayloadsLogged says so, and the endpoint answers throughout.
    broken = monitored_manifest(uri)
    broken["spec"]["monitoring"]["payloads"]["sink"] = {
        "http": {"url": f"http://127.0.0.1:{free_port()}/events"}
    }
    client.apply(broken)

    def sink_failing() -> dict[str, Any] | None:
        status = (client.get("default", "monitored") or {}).get("status") or {}
        found = [c for c in status.get("conditions") or [] if c["type"] == "PayloadsLogged"]
        return found[0] if found and found[0]["reason"] == "SinkFailing" else None

    with monitored.Traffic(f"{client.serve_url}/monitored") as traffic:
        failing = wait_for(sink_failing, timeout=120, interval=1, message="PayloadsLogged=False")
    assert failing["status"] == "False" and "CouldNotConnect" in failing["message"]
    assert traffic.failures == 0
    assert client.delete("default", "monitored") is True


def test_resources_applied_and_deleted_through_the_control_api(
    mlflow_server: MlflowServer, tmp_path: Path
) -> None:
    mlflow = MlflowClient(mlflow_server.url)
    version, samples, _ = log_sklearn_classifier(mlflow_server.url, MODEL)
    mlflow.set_registered_model_alias(MODEL, "champion", version)
    hooks_before = set(our_webhooks(mlflow))
    body = [list(map(float, row)) for row in samples[:2]]
    session_file = tmp_path / "session" / "dev-session.json"
    dashboard_port, serve_port = free_port(), free_port()
    command = [
        sys.executable, "-m", "regserve_operator.cli", "dev",
        "--dashboard", f"http://127.0.0.1:{dashboard_port}", "--serve-port", str(serve_port),
        "--num-cpus", "4", "--session-file", str(session_file),
    ]  # fmt: skip
    dev = start_and_wait(
        command,
        log=tmp_path / "dev.log",
        ready=lambda: discovered(session_file),
        what="regserve dev's control API",
        timeout=300,
        cwd=tmp_path,
    )
    ray_session = 0
    try:
        ray_session = ray_session_of(dashboard_port)
        temp_dir = Path(
            next(a.split("=")[1] for a in command_line(ray_session) if a.startswith("--temp-dir="))
        )
        dashboard = ServeDashboard(
            f"http://127.0.0.1:{dashboard_port}", token=(temp_dir / "auth_token").read_text().strip()
        )
        assert stat.S_IMODE(session_file.stat().st_mode) == 0o600
        assert stat.S_IMODE(session_file.parent.stat().st_mode) == 0o700
        client = LocalControlClient.discover(session_file)
        assert client.serve_url == f"http://127.0.0.1:{serve_port}"
        assert client.list() == []

        created = client.apply(ctl_manifest(mlflow_server.url))
        assert created["metadata"]["name"] == "ctl" and created["metadata"]["generation"] == 1

        def answers() -> bool:
            response = httpx.post(f"{client.serve_url}/ctl/serve", json=body, timeout=30)
            return response.status_code == 200

        wait_for(lambda: ready(client.get("default", "ctl"), version), timeout=300, message="ctl Ready")
        wait_for(answers, timeout=120, message="ctl answering at serve_url")
        # The registry first named at runtime got a webhook of this session.
        wait_for(
            lambda: set(our_webhooks(mlflow)) - hooks_before, timeout=60, message="the session's webhook"
        )

        (listed,) = client.list()
        assert listed["metadata"]["uid"] == created["metadata"]["uid"]
        assert client.list("elsewhere") == []
        got = client.get("default", "ctl")
        assert got is not None and got["status"]["servingVersion"] == version
        assert got["status"]["url"] == f"http://127.0.0.1:{serve_port}/ctl"
        assert "ctl" in dashboard.applications()

        tag = tag_key("default", "ctl")
        wait_for(lambda: tag in mlflow.get_model_version(MODEL, version).tags, timeout=60, message="the tag")
        asked = time.monotonic()
        assert client.delete("default", "ctl") is True
        # The delete answers once Ray has removed the app (or said it is still deleting, after 60 s).
        left = dashboard.applications().get("ctl")
        assert left is None or left["status"] == "DELETING", left
        wait_for(lambda: "ctl" not in dashboard.applications(), timeout=120, message="the Serve app to go")
        print(f"Serve app gone {time.monotonic() - asked:.1f} s after the delete was asked")
        wait_for(
            lambda: httpx.post(f"{client.serve_url}/ctl/serve", json=body, timeout=30).status_code == 404,
            timeout=60,
            message="Serve to stop routing /ctl",
        )
        assert tag not in mlflow.get_model_version(MODEL, version).tags  # as the finalizer removes it
        assert client.get("default", "ctl") is None
        assert client.delete("default", "ctl") is False
        assert client.list() == []

        check_monitoring(client, mlflow_server.url, tmp_path)

        dev.send_signal(signal.SIGTERM)
        assert dev.wait(timeout=120) == 0
        assert not session_file.exists()
        assert set(our_webhooks(mlflow)) == hooks_before
        with pytest.raises(LocalSessionNotFound, match="regserve dev"):
            LocalControlClient.discover(session_file)
    finally:
        stop(dev)
        for pid in session_members(ray_session) if ray_session else []:
            os.kill(pid, signal.SIGKILL)
