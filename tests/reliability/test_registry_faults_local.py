"""MLflow misbehaves under local mode: the old version keeps serving, the status says why, and the
rollout resumes by itself once the registry is healthy again.

Real parts only: a private `mlflow server` (sqlite) stopped and started again on the same port and
backend, the operator's reconcile loop (`regserve dev`'s DevSession) against the session's Ray
cluster, and HTTP requests to the Serve endpoint to tell which version answers (phrasebook models:
v "de" answers "Hallo", v "fr" answers "Bonjour").
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from mlflow import MlflowClient
from regserve_operator.local import register_local_webhook, webhook_receiver
from regserve_operator.ports import Credentials
from regserve_operator.sandbox.mlflow_server import MlflowServer
from regserve_operator.sandbox.models import log_phrasebook
from regserve_operator.sandbox.processes import free_port

from tests.reliability.delaying_proxy import DelayingProxy
from tests.reliability.local_harness import Harness, condition
from tests.support.ray_cluster import LocalRay

pytestmark = [pytest.mark.ray, pytest.mark.slow]

HALLO = [{"translation_text": "Hallo"}]
BONJOUR = [{"translation_text": "Bonjour"}]


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowServer]:
    """A server of this module's own: the tests stop it."""
    server = MlflowServer(root=Path(tmp_path_factory.mktemp("mlflow-operator-faults")))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def up(registry: MlflowServer) -> Iterator[MlflowServer]:
    """The registry, running again after the test whatever the test did to it."""
    if registry.process is None:
        registry.start()
    yield registry
    if registry.process is None:
        registry.start()


def de_and_fr(server: MlflowServer, model: str) -> tuple[MlflowClient, str, str]:
    """Versions answering "Hallo" and "Bonjour"; `champion` on the first."""
    client = MlflowClient(server.url)
    v1 = log_phrasebook(server.url, model, lang_to="de")
    v2 = log_phrasebook(server.url, model, lang_to="fr")
    client.set_registered_model_alias(model, "champion", v1)
    return client, v1, v2


def harness(local_ray: LocalRay, tmp_path: Path, *resources: dict[str, object]) -> Harness:
    return Harness(local_ray, tmp_path, [dict(r) for r in resources])


def test_stopped_while_serving_and_polling(up: MlflowServer, local_ray: LocalRay, tmp_path: Path) -> None:
    """Steady state, then MLflow stops: requests keep answering, status says unreachable, and
    polling picks the registry (and a promotion made while it was down) up once it is back."""
    model, name = "faults_steady", "faults-steady"
    client, v1, v2 = de_and_fr(up, model)
    h = harness(local_ray, tmp_path, {"name": name, "model": model, "uri": up.url, "poll": 2})
    try:
        h.run_until(lambda: h.serving(name, v1), timeout=90, what=f"serving {v1}")
        assert h.answer(name) == HALLO

        up.stop()
        went = h.run_until(
            lambda: condition(h.status(name), "RegistryReachable")[0] == "False",
            timeout=30,
            what="unreachable",
        )
        reachable = condition(h.status(name), "RegistryReachable")
        assert reachable[1] == "Unreachable" and up.url in reachable[2], reachable
        # Serving is untouched while the registry is down: same version, still Ready, no write.
        codes = []
        for _ in range(20):
            response = h.ask(name)
            codes.append(response.status_code)
            assert response.json() == HALLO
            h.step()
        status = h.status(name)
        assert codes == [200] * 20
        assert status.serving_version == v1 and condition(status, "Ready")[0] == "True"
        assert h.deployed_default(name) == v1
        assert max(h.step_seconds) < 15, h.step_seconds  # a refused connection never hangs the loop

        up.start()
        client.set_registered_model_alias(model, "champion", v2)  # promoted while nobody watched
        back = h.run_until(
            lambda: condition(h.status(name), "RegistryReachable")[0] == "True", timeout=60, what="reachable"
        )
        h.run_until(lambda: h.serving(name, v2), timeout=60, what=f"serving {v2}")
        assert h.answer(name) == BONJOUR
        print(f"unreachable seen after {went:.1f} s; reachable again {back:.1f} s after restart")
    finally:
        h.close()


def test_stopped_during_rollout(up: MlflowServer, local_ray: LocalRay, tmp_path: Path) -> None:
    """The alias moved, the operator switched the app's default, and MLflow stops before the replica
    loaded the new version: the old version keeps answering, the status says the rollout waits for
    the registry, and the new version rolls out by itself once MLflow is back."""
    model, name = "faults_rollout", "faults-rollout"
    client, v1, v2 = de_and_fr(up, model)
    h = harness(local_ray, tmp_path, {"name": name, "model": model, "uri": up.url})
    try:
        h.run_until(lambda: h.serving(name, v1), timeout=90, what=f"serving {v1}")
        client.set_registered_model_alias(model, "champion", v2)
        # What the operator's next pass asks MLflow, asked now, while it is up (fresh snapshot, v2's
        # MLmodel cached): the pass below then writes the switch with MLflow already gone.
        resource = h.session.resources[0]
        registry_port = h.session.driver.deps.registry
        registry_port.model_changed(model)
        assert registry_port.resolve(up.url, Credentials(), resource.spec.model, 300) == v2
        registry_port.facts(up.url, Credentials(), model, v2)
        up.stop()

        h.session.driver.scheduler.wake((resource.owner.namespace, resource.owner.name))
        h.step()
        assert h.status(name).rollout_version == v2 and h.deployed_default(name) == v2
        answers: list[object] = []
        started = time.monotonic()

        def waiting_for_registry() -> bool:
            answers.append(h.ask(name).json())
            rejected = h.status(name).rejected
            return rejected is not None and "registry unavailable" in rejected.message

        h.run_until(waiting_for_registry, timeout=45, what="the rollout waiting for the registry")
        waited = time.monotonic() - started
        status = h.status(name)
        assert status.rejected is not None and status.rejected.version == v2, status.rejected
        assert "retried in" in status.rejected.message, status.rejected.message
        h.run_until(lambda: h.serving(name, v1), timeout=30, what=f"{v1} restored meanwhile")
        assert all(answer == HALLO for answer in answers), answers

        up.start()
        recovered = h.run_until(lambda: h.serving(name, v2), timeout=75, what=f"serving {v2} after restart")
        assert h.answer(name) == BONJOUR
        assert h.status(name).last_good_version == v2
        print(f"rollout seen waiting after {waited:.1f} s; {v2} serving {recovered:.1f} s after restart")
    finally:
        h.close()


def test_restart_keeps_webhooks_verifying(up: MlflowServer, local_ray: LocalRay, tmp_path: Path) -> None:
    """MLflow restarts on the same backend: deliveries sent afterwards still verify and roll out
    (the poll interval is 300 s, so only a delivery can wake the resource within the test)."""
    model, name = "faults_restart", "faults-restart"
    client, v1, v2 = de_and_fr(up, model)
    h = harness(local_ray, tmp_path, {"name": name, "model": model, "uri": up.url})
    secret = "restart-test-secret"
    try:
        with webhook_receiver(h.session.driver, free_port(), secret) as url:
            assert register_local_webhook(up.url, url, secret)
            h.run_until(lambda: h.serving(name, v1), timeout=90, what=f"serving {v1}")
            started = time.monotonic()
            up.restart()
            restart_s = time.monotonic() - started
            client.set_registered_model_alias(model, "champion", v2)
            took = h.run_until(lambda: h.serving(name, v2), timeout=60, what=f"serving {v2} by webhook")
        assert h.answer(name) == BONJOUR
        print(f"restart {restart_s:.1f} s; promotion after restart serving in {took:.1f} s")
    finally:
        h.close()


def _artifact_dir(server: MlflowServer, model: str, version: str) -> Path:
    client = MlflowClient(server.url)
    registered = client.get_model_version(model, version)
    model_id = registered.model_id or registered.source.removeprefix("models:/")
    location = client.get_logged_model(model_id).artifact_location
    assert location.startswith("mlflow-artifacts:/"), location
    path = server.root / "artifacts" / location.removeprefix("mlflow-artifacts:/").lstrip("/")
    assert (path / "MLmodel").exists(), path
    return path


def test_broken_artifacts_keep_the_old_version(up: MlflowServer, local_ray: LocalRay, tmp_path: Path) -> None:
    """A version whose code file was deleted fails to load, one whose MLmodel is garbage cannot even
    be gated: the old version answers throughout, the status names the version and the failure, and
    promoting a good version rolls it out."""
    model, name = "faults_artifacts", "faults-artifacts"
    client = MlflowClient(up.url)
    v1 = log_phrasebook(up.url, model, lang_to="de")
    no_code = log_phrasebook(up.url, model, lang_to="fr")
    garbage = log_phrasebook(up.url, model, lang_to="fr")
    good = log_phrasebook(up.url, model, lang_to="fr")
    client.set_registered_model_alias(model, "champion", v1)
    for code in _artifact_dir(up, model, no_code).glob("*.py"):
        code.unlink()
    mlmodel = _artifact_dir(up, model, garbage) / "MLmodel"
    mlmodel.write_bytes(mlmodel.read_bytes()[:40] + b"\n\x00\xff: [unclosed\n")
    h = harness(local_ray, tmp_path, {"name": name, "model": model, "uri": up.url, "poll": 2})
    try:
        h.run_until(lambda: h.serving(name, v1), timeout=90, what=f"serving {v1}")

        client.set_registered_model_alias(model, "champion", no_code)
        h.run_until(
            lambda: (h.status(name).rejected or None) is not None, timeout=60, what=f"{no_code} rolled back"
        )
        rejected = h.status(name).rejected
        assert rejected is not None and rejected.version == no_code and rejected.reason == "RolledBack"
        assert "failed to load" in rejected.message, rejected.message
        h.run_until(lambda: h.serving(name, v1), timeout=60, what=f"{v1} restored")
        assert h.answer(name) == HALLO and h.deployed_default(name) == v1

        client.set_registered_model_alias(model, "champion", garbage)
        h.run_until(
            lambda: getattr(h.status(name).rejected, "version", None) == garbage,
            timeout=30,
            what=f"{garbage} held",
        )
        status = h.status(name)
        compatible = condition(status, "SignatureCompatible")
        assert compatible[0] == "False" and garbage in compatible[2] and "MLmodel" in compatible[2], (
            compatible
        )
        assert status.serving_version == v1 and h.deployed_default(name) == v1
        assert h.answer(name) == HALLO
        for _ in range(4):  # held: later polls change nothing
            h.step()
        assert getattr(h.status(name).rejected, "version", None) == garbage and h.deployed_default(name) == v1

        client.set_registered_model_alias(model, "champion", good)
        took = h.run_until(lambda: h.serving(name, good), timeout=60, what=f"serving {good}")
        assert h.answer(name) == BONJOUR and h.status(name).rejected is None
        print(f"good version {good} serving {took:.1f} s after its promotion")
    finally:
        h.close()


def test_slow_registry_does_not_hang_the_loop(up: MlflowServer, local_ray: LocalRay, tmp_path: Path) -> None:
    """MLflow behind a proxy that delays or stalls: the operator's calls give up in bounded time, a
    resource on a healthy server keeps reconciling, and serving keeps answering."""
    host = httpx.URL(up.url).host
    with DelayingProxy(host, up.port) as proxy:
        slow, fast = "faults_slow", "faults_fast"
        client = MlflowClient(up.url)
        for model in (slow, fast):
            first = log_phrasebook(up.url, model, lang_to="de")
            log_phrasebook(up.url, model, lang_to="fr")
            client.set_registered_model_alias(model, "champion", first)
        h = harness(
            local_ray,
            tmp_path,
            {"name": "faults-slow", "model": slow, "uri": proxy.url, "poll": 2},
            {"name": "faults-fast", "model": fast, "uri": up.url, "poll": 2},
        )
        try:
            h.run_until(
                lambda: h.serving("faults-slow", "1") and h.serving("faults-fast", "1"),
                timeout=90,
                what="both serving",
            )
            proxy.set(delay_s=3)
            before = len(h.step_seconds)
            h.run_until(lambda: len(h.step_seconds) > before + 3, timeout=60, what="slow polls")
            assert condition(h.status("faults-slow"), "RegistryReachable")[0] == "True"  # slow is not down

            proxy.set(stall=True)
            h.run_until(
                lambda: condition(h.status("faults-slow"), "RegistryReachable")[0] == "False",
                timeout=60,
                what="stalled registry reported",
            )
            client.set_registered_model_alias(fast, "champion", "2")
            took = h.run_until(
                lambda: h.serving("faults-fast", "2"), timeout=60, what="the healthy one rolls out"
            )
            stalled = h.step_seconds[before:]
            assert max(stalled) < 20, stalled
            assert h.answer("faults-slow") == HALLO and h.answer("faults-fast") == BONJOUR

            # A promotion seen (snapshot fresh) but whose MLmodel must be read through the stall.
            client.set_registered_model_alias(slow, "champion", "2")
            proxy.set()
            port = h.session.driver.deps.registry
            port.model_changed(slow)
            assert port.resolve(proxy.url, Credentials(), h.session.resources[0].spec.model, 300) == "2"
            proxy.set(stall=True)
            slow_owner = h.session.resources[0].owner
            h.session.driver.scheduler.wake((slow_owner.namespace, slow_owner.name))
            finished = threading.Event()
            worker = threading.Thread(target=lambda: (h.step(), finished.set()), daemon=True)
            started = time.monotonic()
            worker.start()
            bounded = finished.wait(45)
            proxy.set()  # release the stall so a stuck call ends and the thread can be joined
            worker.join(180)
            print(
                f"steps while stalled: max {max(stalled):.1f} s; healthy rollout {took:.1f} s; "
                f"MLmodel read through the stall ended after {time.monotonic() - started:.1f} s"
            )
            assert bounded, "reading a version's MLmodel through a stalled registry hung the loop > 45 s"
            reachable = condition(h.status("faults-slow"), "RegistryReachable")
            assert reachable[0] == "False", reachable  # the pass did try, and said why it stopped
            assert h.status("faults-slow").serving_version == "1"
            assert h.answer("faults-slow") == HALLO
        finally:
            proxy.set()
            h.close()
