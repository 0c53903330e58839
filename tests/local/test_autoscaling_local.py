"""Replica autoscaling in local mode, with real Ray in HAProxy ingress mode (the default).

Two resources from two files share the Ray cluster local mode starts (as `regserve dev -f a -f b`
does): one, pinned to a version, scales between 1 and 3 replicas with load; the other follows the
alias, scales to zero when idle and answers the first request after that, and its promotion leaves the
first one's replicas alone.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from mlflow import MlflowClient
from regserve_operator.local import DevSession, load_resource_files, make_session, status_summary
from regserve_operator.sandbox.mlflow_server import MlflowServer
from regserve_operator.sandbox.models import log_slow_echo
from regserve_operator.sandbox.processes import free_port, wait_for
from regserve_operator.spec import manifest, manifests_yaml
from regserve_operator.targets.local import ServeDashboard

pytestmark = [pytest.mark.ray, pytest.mark.slow]

MODEL = "autoscaled_echo"
# Small delays so a load step and the fall after it fit in a short test.
ELASTIC = {
    "minReplicas": 1,
    "maxReplicas": 3,
    "targetOngoingRequests": 1,
    "upscaleDelaySeconds": 0.5,
    "downscaleDelaySeconds": 2,
}
# Between a steady client's requests: about a tenth of a request in flight on average, far under
# ELASTIC's targetOngoingRequests of 1.
CLIENT_PAUSE_S = 0.1
TO_ZERO = {"minReplicas": 0, "maxReplicas": 1, "upscaleDelaySeconds": 0, "downscaleDelaySeconds": 2}


def rms(
    name: str, uri: str, selector: dict[str, str], autoscaling: dict[str, Any], poll: int
) -> dict[str, Any]:
    return manifest(
        name,
        {
            "model": {"name": MODEL, **selector},
            "registry": {"trackingUri": uri, "pollIntervalSeconds": poll},
            "serving": {"routePrefix": f"/{name}", "cpusPerReplica": 0.25, "autoscaling": autoscaling},
            "rollout": {"deadlineSeconds": 120},
        },
    )


class Cluster:
    def __init__(self, session: DevSession, dashboard_url: str, serve_url: str) -> None:
        self.session = session
        self.serve_url = serve_url
        self.dashboard = ServeDashboard(dashboard_url, token=session.cluster.token())

    def running_replicas(self, app: str) -> int:
        return self.dashboard.running_replicas(app)

    def replica_actors(self, app: str) -> set[str]:
        deployments = (self.dashboard.applications().get(app) or {}).get("deployments") or {}
        return {
            replica["actor_id"]
            for deployment in deployments.values()
            for replica in deployment.get("replicas") or []
            if replica.get("state") == "RUNNING"
        }

    def ask(self, app: str, text: str, timeout: float = 60) -> httpx.Response:
        return httpx.post(f"{self.serve_url}/{app}/serve", json={"prompt": text}, timeout=timeout)

    def serving(self, name: str, version: str) -> bool:
        status = self.session.status(name)
        ready = any(c.type == "Ready" and c.status == "True" for c in status.conditions or [])
        return ready and status.serving_version == version and status.rollout_version is None


@pytest.fixture(scope="module")
def cluster(mlflow_server: MlflowServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    workdir = tmp_path_factory.mktemp("autoscaling")
    version = log_slow_echo(mlflow_server.url, MODEL, delay_s=0.25)
    MlflowClient(mlflow_server.url).set_registered_model_alias(MODEL, "champion", version)
    files = []
    resources = (
        ("elastic", ELASTIC, {"version": version}, 300),
        ("to-zero", TO_ZERO, {"alias": "champion"}, 2),
    )
    for name, autoscaling, selector, poll in resources:
        path = workdir / f"{name}.yaml"
        path.write_text(manifests_yaml(rms(name, mlflow_server.url, selector, autoscaling, poll)))
        files.append(path)
    dashboard_url, serve_port = f"http://127.0.0.1:{free_port()}", free_port()
    session = make_session(
        load_resource_files(files),
        dashboard_url=dashboard_url,
        serve_port=serve_port,
        num_cpus=4,
        out=lambda line: None,
        log_dir=workdir,
    )
    try:
        assert session.cluster.ingress_mode == "haproxy"
        deadline = time.monotonic() + 150
        running = Cluster(session, dashboard_url, f"http://127.0.0.1:{serve_port}")
        session.run(
            until=lambda: (
                all(running.serving(name, version) for name in ("elastic", "to-zero"))
                or time.monotonic() > deadline
            )
        )
        for name in ("elastic", "to-zero"):
            assert running.serving(name, version), status_summary(session.status(name))
        yield running
    finally:
        session.cluster.stop()


def test_a_load_step_raises_replicas_and_they_fall_back_after(cluster: Cluster) -> None:
    assert cluster.ask("elastic", "warm").json() == [{"echo": "warm"}]
    assert cluster.running_replicas("elastic") == 1
    stop = threading.Event()
    failures: list[int] = []

    def client() -> None:
        while not stop.is_set():
            response = cluster.ask("elastic", "load")
            if response.status_code != 200:
                failures.append(response.status_code)

    threads = [threading.Thread(target=client, daemon=True) for _ in range(8)]
    for thread in threads:
        thread.start()
    started = time.monotonic()
    try:
        wait_for(
            lambda: cluster.running_replicas("elastic") >= 2, timeout=60, interval=0.5, message="scale up"
        )
        print(f"\nelastic: 2+ replicas {time.monotonic() - started:.1f} s into the load step")
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=70)
    assert failures == []  # scaling up costs no request
    fell = time.monotonic()
    wait_for(lambda: cluster.running_replicas("elastic") == 1, timeout=90, interval=1, message="scale down")
    print(f"elastic: back to 1 replica {time.monotonic() - fell:.1f} s after the load stopped")
    assert cluster.ask("elastic", "after").json() == [{"echo": "after"}]


def test_scaled_to_zero_the_first_request_waits_and_is_answered(cluster: Cluster) -> None:
    wait_for(
        lambda: cluster.running_replicas("to-zero") == 0, timeout=90, interval=1, message="scale to zero"
    )
    started = time.monotonic()
    response = cluster.ask("to-zero", "wake up", timeout=90)
    first_latency = time.monotonic() - started
    print(f"\nto-zero: first request after idle answered in {first_latency:.2f} s ({response.status_code})")
    assert response.status_code == 200, response.text
    assert response.json() == [{"echo": "wake up"}]
    assert response.headers["X-Model-Version"] == cluster.session.status("to-zero").serving_version
    assert cluster.running_replicas("to-zero") == 1


def test_a_promotion_of_one_application_leaves_the_others_replicas_alone(
    cluster: Cluster, mlflow_server: MlflowServer
) -> None:
    """The alias moves: `to-zero` rolls out the new version; `elastic`, on the same cluster, keeps the
    same replica actors and answers throughout. Its client is paced below the autoscaling target, so
    no replica comes or goes by autoscaling while the replicas are compared."""
    wait_for(lambda: cluster.running_replicas("elastic") == 1, timeout=90, interval=1, message="steady")
    before = cluster.replica_actors("elastic")
    assert before
    pinned = cluster.session.status("elastic").serving_version
    promoted = log_slow_echo(mlflow_server.url, MODEL, delay_s=0.25)
    stop = threading.Event()
    answers: list[tuple[int, str]] = []

    def client() -> None:
        while not stop.is_set():
            try:
                response = cluster.ask("elastic", "steady")
            except httpx.HTTPError as error:  # recorded: a dropped request fails the test too
                answers.append((0, repr(error)))
                continue
            answers.append((response.status_code, response.headers.get("X-Model-Version", "")))
            stop.wait(CLIENT_PAUSE_S)

    thread = threading.Thread(target=client, daemon=True)
    thread.start()
    try:
        MlflowClient(mlflow_server.url).set_registered_model_alias(MODEL, "champion", promoted)
        deadline = time.monotonic() + 120
        cluster.session.run(until=lambda: cluster.serving("to-zero", promoted) or time.monotonic() > deadline)
        assert cluster.serving("to-zero", promoted), status_summary(cluster.session.status("to-zero"))
    finally:
        stop.set()
        thread.join(timeout=70)
    assert answers and set(answers) == {(200, pinned)}, sorted(set(answers))[:5]
    assert before == cluster.replica_actors("elastic")
    assert cluster.ask("to-zero", "new").headers["X-Model-Version"] == promoted
