"""Kubernetes end to end with real Ray: the operator, the real KubeRay and real Ray Serve behind the
test plane's pods (tests/k8s/podrunner.py), answering real requests.

One RegisteredModelServing is applied once and taken through its life by the tests in order (Ray starts
once: on 2 cores a cluster costs about a minute). The operator runs as its own process, authenticated as
its ServiceAccount with exactly the shipped RBAC, seeing cluster names through the plane's hosts file; the
MLflow server listens on the host's address on the pod bridge, so the pods reach it as they would reach a
tracking server in a cluster.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pandas as pd
import pytest
import yaml
from kubernetes import client
from mlflow import MlflowClient
from mlflow.deployments import get_deploy_client
from regserve_operator.builders import AUTOSCALER_IDLE_TIMEOUT_S, HAPROXY_ENV
from regserve_operator.sandbox.mlflow_server import MlflowServer
from regserve_operator.sandbox.models import PHRASEBOOK_MODEL, log_phrasebook, log_slow_echo
from regserve_operator.sizing import GPU_RESOURCE
from regserve_operator.webhook import register_webhook

from tests.k8s import network, plane
from tests.k8s.operator_support import (
    Cluster,
    OperatorProcess,
    cond,
    operator_account,
    until,
)
from tests.k8s.podrunner import pod_ready, with_cluster_hosts
from tests.reliability.delaying_proxy import DelayingProxy
from tests.support.event_receiver import EventReceiver

pytestmark = [pytest.mark.k8s, pytest.mark.kuberay, pytest.mark.slow]

NAME = "translator"
MODEL = f"kuberay_{uuid.uuid4().hex[:6]}"
SERVE_PORT = 8000
# Cold Ray on 2 shared cores: head, worker, Serve controller, a replica loading a model.
FIRST_SERVE_S = 420.0
ROLLOUT_S = 240.0
# A new RayCluster beside the running one. At a load average of 30-50 a Ray node can miss Ray's fixed 30 s
# startup wait and be restarted (as a kubelet would) more than once: 4-5 minutes were seen.
NEW_CLUSTER_S = 600.0


@dataclass
class Versions:
    german: str
    french: str
    incompatible: str
    broken: str


@dataclass
class Serving:
    """The applied resource and what the tests learn about it on the way."""

    cluster: Cluster
    plane: plane.ControlPlane
    mlflow: MlflowServer
    operator: OperatorProcess
    versions: Versions
    # The tracking URI the resource names: MLflow through a proxy the tests can close to the pods alone.
    registry: DelayingProxy
    # The operator's webhook receiver (on loopback: MLflow delivers from the host).
    webhook_url: str
    facts: dict[str, Any] = field(default_factory=dict)

    @property
    def good(self) -> str:
        """The version the resource serves once the previous test is done."""
        return str(self.facts.get("good", self.versions.german))

    @property
    def namespace(self) -> str:
        return self.cluster.namespace

    def serve_address(self) -> str | None:
        """What `<name>-serve-svc.<ns>.svc` resolves to now (the plane's cluster names)."""
        assert self.plane.cluster_hosts is not None
        return self.plane.cluster_hosts.entries.get(f"{NAME}-serve-svc.{self.namespace}.svc")

    def url(self, path: str = "serve") -> str:
        address = self.serve_address()
        assert address, f"{NAME}-serve-svc has no ready endpoint; {self.diagnose()}"
        return f"http://{address}:{SERVE_PORT}/{NAME}/{path}"

    def ask(self, version: str | None = None, body: Any = None, timeout: float = 30) -> httpx.Response:
        headers = {"serve-multiplexed-model-id": version} if version else {}
        payload = {"prompt": "Hello"} if body is None else body
        return httpx.post(self.url(), json=payload, headers=headers, timeout=timeout)

    def status(self) -> dict[str, Any]:
        return dict(self.cluster.rms(NAME).get("status") or {})

    def rayclusters(self, owner: str = NAME) -> list[dict[str, Any]]:
        """The RayClusters of the RayService `owner` (KubeRay labels them with its name)."""
        listing: Any = self.cluster.custom.list_namespaced_custom_object(
            "ray.io",
            "v1",
            self.namespace,
            "rayclusters",
            label_selector=f"ray.io/originated-from-cr-name={owner}",
        )
        return list(listing["items"])

    def pods(self, cluster: str, node_type: str) -> list[Any]:
        selector = f"ray.io/cluster={cluster},ray.io/node-type={node_type}"
        return list(self.cluster.core.list_namespaced_pod(self.namespace, label_selector=selector).items)

    def url_at(self, rayservice: str, prefix: str) -> str:
        """`/<prefix>/serve` behind another RayService's Serve Service."""
        assert self.plane.cluster_hosts is not None
        address = self.plane.cluster_hosts.entries.get(f"{rayservice}-serve-svc.{self.namespace}.svc")
        assert address, f"{rayservice}-serve-svc has no ready endpoint"
        return f"http://{address}:{SERVE_PORT}/{prefix}/serve"

    def answer_at(self, rayservice: str, prefix: str) -> httpx.Response | None:
        """A prompt's answer there (None: no endpoint yet, or no answer)."""
        try:
            return httpx.post(self.url_at(rayservice, prefix), json={"prompt": "Hello"}, timeout=10)
        except (httpx.HTTPError, AssertionError):
            return None

    def answered_by(self, version: str) -> bool:
        if not self.serve_address():
            return False
        try:
            response = self.ask(timeout=10)
        except httpx.HTTPError:
            return False
        return response.status_code == 200 and response.headers.get("x-model-version") == version

    def active_cluster(self, owner: str = NAME) -> dict[str, Any]:
        rs = self.cluster.rayservice(owner) or {}
        name = ((rs.get("status") or {}).get("activeServiceStatus") or {}).get("rayClusterName")
        found = [c for c in self.rayclusters(owner) if c["metadata"]["name"] == name]
        assert found, f"no active RayCluster for {owner}; {self.diagnose()}"
        return found[0]

    def head_get(self, raycluster: dict[str, Any], path: str) -> httpx.Response:
        """GET from the dashboard on the cluster's head, with the token KubeRay made."""
        secret = self.cluster.core.read_namespaced_secret(raycluster["metadata"]["name"], self.namespace)
        token = base64.b64decode(next(iter(secret.data.values()))).decode()
        head = raycluster["status"]["head"]["podIP"]
        return httpx.get(
            f"http://{head}:8265{path}", headers={"x-ray-authorization": f"Bearer {token}"}, timeout=30
        )

    def ray_state(self, raycluster: dict[str, Any], path: str) -> Any:
        """A listing from Ray's state API (`/api/v0/...`) on the cluster's head."""
        response = self.head_get(raycluster, path)
        assert response.status_code == 200, response.text[:500]
        return response.json()["data"]["result"]["result"]

    def serving(self, version: str) -> bool:
        status = self.status()
        ready = (cond({"status": status}, "Ready") or {}).get("status") == "True"
        return status.get("servingVersion") == version and ready and not status.get("rolloutVersion")

    def answers(self, text: str) -> bool:
        if not self.serve_address():
            return False
        try:
            response = self.ask(timeout=10)
        except httpx.HTTPError:
            return False
        return response.status_code == 200 and response.json() == [{"translation_text": text}]

    def diagnose(self) -> str:
        rs = self.cluster.rayservice(NAME) or {}
        pods = self.cluster.core.list_namespaced_pod(self.namespace).items
        lines = [
            f"rms status: {self.status()}",
            f"rayservice status: {rs.get('status')}",
            *(
                f"pod {p.metadata.name} ip={p.status.pod_ip} phase={p.status.phase} "
                f"conditions={[(c.type, c.status) for c in p.status.conditions or []]} "
                f"labels={p.metadata.labels}"
                for p in pods
            ),
        ]
        runner = self.plane.runner
        if runner is not None:
            for p in pods:
                lines.append(runner.pod_logs(self.namespace, p.metadata.name)[-3000:])
        lines.append(self.operator.output()[-3000:])
        return "\n".join(lines)


def _fail_or_skip_without_runner(kube_plane: plane.ControlPlane) -> None:
    if kube_plane.runner is None:
        pytest.fail("the plane has no pod runner", pytrace=False)


@pytest.fixture(scope="module")
def bridge_mlflow(
    tmp_path_factory: pytest.TempPathFactory, kube_plane: plane.ControlPlane
) -> Iterator[MlflowServer]:
    """A real `mlflow server` on the host's address on the pod bridge: reachable from the pods."""
    server = MlflowServer(root=tmp_path_factory.mktemp("mlflow-bridge"), host=network.BRIDGE_IP)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def registry_gate(bridge_mlflow: MlflowServer) -> Iterator[DelayingProxy]:
    """MLflow behind a proxy on the bridge: passes everything until told to answer the host alone."""
    upstream = httpx.URL(bridge_mlflow.url)
    with DelayingProxy(str(upstream.host), int(upstream.port or 80), listen_host=network.BRIDGE_IP) as proxy:
        yield proxy


@pytest.fixture(scope="module")
def serving(
    kube_plane: plane.ControlPlane,
    kube_api: client.ApiClient,
    mint_kubeconfig: plane.MintKubeconfig,
    bridge_mlflow: MlflowServer,
    registry_gate: DelayingProxy,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Serving]:
    _fail_or_skip_without_runner(kube_plane)
    namespace = kube_plane.ray_namespace
    url = bridge_mlflow.url
    versions = Versions(
        german=log_phrasebook(url, MODEL, lang_to="de"),
        french=log_phrasebook(url, MODEL, lang_to="fr"),
        incompatible=log_phrasebook(url, MODEL, lang_to="de", input_label="text_to_translate"),
        broken=log_phrasebook(url, MODEL, lang_to="de", fail_on_load=True),
    )
    MlflowClient(url).set_registered_model_alias(MODEL, "champion", versions.german)
    cluster = Cluster(kube_api, namespace)
    # The registry credentials reach the pods through envFrom (a Secret reference the runner resolves).
    cluster.secret("mlflow-auth", {"MLFLOW_TRACKING_USERNAME": "reader", "MLFLOW_TRACKING_PASSWORD": "x"})
    log = tmp_path_factory.mktemp("operator") / "operator.log"
    account = f"regserve-{uuid.uuid4().hex[:6]}"
    webhook_port = plane.free_port()
    webhook = {
        "REGSERVE_WEBHOOK_PORT": str(webhook_port),
        "REGSERVE_WEBHOOK_HOST": "127.0.0.1",
        "REGSERVE_WEBHOOK_SECRET": f"whsec-{uuid.uuid4().hex}",
    }
    with operator_account(kube_api, namespace, mint_kubeconfig, account) as kubeconfig:
        process = OperatorProcess(
            kubeconfig,
            namespace,
            log,
            # The Serve Services' names resolve here (the plane's hosts file), as in a cluster, where "auto"
            # would turn the rollout probe on.
            env={"REGSERVE_PROBE_SERVING": "on", **webhook},
            wrap=lambda argv: with_cluster_hosts(argv, kube_plane.hosts_path),
        ).start()
        try:
            serving = Serving(
                cluster,
                kube_plane,
                bridge_mlflow,
                process,
                versions,
                registry_gate,
                webhook_url=f"http://127.0.0.1:{webhook_port}/webhook",
            )
            serving.facts["webhook_secret"] = webhook["REGSERVE_WEBHOOK_SECRET"]
            yield serving
        finally:
            with_rms = cluster.custom.list_namespaced_custom_object(
                "regserve.io", "v1alpha1", namespace, "registeredmodelservings"
            )
            for item in with_rms["items"]:
                cluster.custom.delete_namespaced_custom_object(
                    "regserve.io", "v1alpha1", namespace, "registeredmodelservings", item["metadata"]["name"]
                )
            # The operator's finalizer removes their MLflow tags: it must still run for them to go.
            until(
                "resources deleted",
                lambda: (
                    not cluster.custom.list_namespaced_custom_object(
                        "regserve.io", "v1alpha1", namespace, "registeredmodelservings"
                    )["items"]
                ),
            )
            process.stop()
            cluster.core.delete_namespaced_secret("mlflow-auth", namespace)


def _spec(url: str) -> dict[str, Any]:
    return {
        "model": {"name": MODEL, "alias": "champion"},
        "registry": {
            "trackingUri": url,
            "credentialsSecretRef": {"name": "mlflow-auth"},
            "pollIntervalSeconds": 2,
        },
        "serving": {"cpusPerReplica": 0.5},
        # 40 bytes of replica memory per byte of model (2 versions per replica): a version of a few MiB
        # crosses the 512 MiB sizing step, so the memory-growth test needs no large artifact.
        "resources": {"memoryMultiplier": 20},
        # Above NEW_CLUSTER_S: no test here waits for a Timeout, and a rollout needing a new cluster must
        # not be timed out by a loaded machine.
        "rollout": {"deadlineSeconds": 660},
    }


def test_apply_brings_up_real_ray_and_the_seed_scenario_answers(serving: Serving) -> None:
    started = time.monotonic()
    serving.cluster.create_rms(NAME, _spec(serving.registry.url))
    v = serving.versions
    until(
        "the first version serving through KubeRay",
        lambda: serving.serving(v.german) and serving.answers("Hallo"),
        timeout=FIRST_SERVE_S,
    )
    serving.facts["first_serve_s"] = time.monotonic() - started
    print(f"apply → serving through KubeRay: {serving.facts['first_serve_s']:.0f} s")

    rs = serving.cluster.rayservice(NAME)
    assert rs is not None
    apps = rs["status"]["activeServiceStatus"]["applicationStatuses"]
    assert apps[NAME]["status"] == "RUNNING", apps
    (raycluster,) = serving.rayclusters()
    serving.facts["raycluster_uid"] = raycluster["metadata"]["uid"]
    # The pods KubeRay made from the hardened templates carry it (the pod runner runs Ray on the host
    # as its own user: the answers below are what shows Ray works with a private, writable /tmp only).
    for node_type in ("head", "worker"):
        pods = serving.pods(raycluster["metadata"]["name"], node_type)
        assert pods, node_type
        for pod in pods:
            _assert_hardened(pod, token=False)

    default = serving.ask()
    assert default.status_code == 200, default.text
    assert default.json() == [{"translation_text": "Hallo"}]
    assert default.headers["x-model-version"] == v.german
    pinned = serving.ask(v.french)
    assert pinned.status_code == 200, pinned.text
    assert pinned.json() == [{"translation_text": "Bonjour"}]
    incompatible = serving.ask(v.incompatible)
    assert incompatible.status_code == 409, incompatible.text
    assert incompatible.json()["error"] == "incompatible_signature"
    off_signature = serving.ask(body={"promt": "Hello"})
    assert off_signature.status_code == 422, off_signature.text
    assert off_signature.json()["error"] == "invalid_input"


SERVICE_ACCOUNT_PATH = "/var/run/secrets/kubernetes.io/serviceaccount"


def _assert_hardened(pod: Any, *, token: bool) -> None:
    """`token`: the pod holds KubeRay's autoscaler sidecar, which alone gets a ServiceAccount token."""
    spec = pod.spec
    assert pod.metadata.labels.get("app.kubernetes.io/managed-by") == "regserve", pod.metadata.labels
    assert spec.automount_service_account_token is False
    with_token = {
        c.name
        for c in spec.containers
        if any(m.mount_path == SERVICE_ACCOUNT_PATH for m in c.volume_mounts or [])
    }
    assert with_token == ({"autoscaler"} if token else set()), with_token
    assert spec.security_context.run_as_non_root is True and spec.security_context.run_as_user == 1000
    assert spec.security_context.seccomp_profile.type == "RuntimeDefault"
    assert any(v.name == "tmp" and v.empty_dir is not None for v in spec.volumes)
    ray = next(c for c in spec.containers if c.name.startswith("ray-"))
    context = ray.security_context
    assert context.read_only_root_filesystem is True and context.allow_privilege_escalation is False
    assert context.capabilities.drop == ["ALL"]
    assert any(m.mount_path == "/tmp" and m.name == "tmp" for m in ray.volume_mounts)


def test_rays_control_plane_refuses_requests_without_the_token(serving: Serving) -> None:
    """Token authentication is on (authOptions): KubeRay deployed the app with the token, nobody else can."""
    if "raycluster_uid" not in serving.facts:
        pytest.skip("the resource never served (see the first test)")
    (raycluster,) = serving.rayclusters()
    head = raycluster["status"]["head"]["podIP"]
    dashboard = f"http://{head}:8265"
    for path in ("/api/serve/applications/", "/api/jobs/"):
        response = httpx.get(f"{dashboard}{path}", timeout=10)
        assert response.status_code in (401, 403), (path, response.status_code, response.text[:300])
    submitted = httpx.post(f"{dashboard}/api/jobs/", json={"entrypoint": "echo owned"}, timeout=10)
    assert submitted.status_code in (401, 403), submitted.text[:300]
    # The token KubeRay generated opens it: the refusal is the authentication, not a broken dashboard.
    secret = serving.cluster.core.read_namespaced_secret(raycluster["metadata"]["name"], serving.namespace)
    token = base64.b64decode(next(iter(secret.data.values()))).decode()
    # The header KubeRay's dashboard client sends.
    bearer = {"x-ray-authorization": f"Bearer {token}"}
    allowed = httpx.get(f"{dashboard}/api/serve/applications/", headers=bearer, timeout=10)
    assert allowed.status_code == 200, allowed.text[:300]
    assert NAME in allowed.json()["applications"]


class Client(threading.Thread):
    """Asks the default version without pause; every answer is recorded."""

    def __init__(self, serving: Serving, url: Callable[[], str] | None = None) -> None:
        super().__init__(daemon=True, name="e2e-client")
        self.serving = serving
        self.url = url or serving.url
        self.done = threading.Event()
        # (when, status, body, X-Model-Version)
        self.answers: list[tuple[float, int, str, str]] = []

    def run(self) -> None:
        with httpx.Client(timeout=30) as http:
            while not self.done.is_set():
                try:
                    response = http.post(self.url(), json={"prompt": "Hello"})
                    version = response.headers.get("x-model-version", "")
                    self.answers.append((time.monotonic(), response.status_code, response.text, version))
                except (httpx.HTTPError, AssertionError) as exc:
                    self.answers.append((time.monotonic(), 0, repr(exc), ""))
                time.sleep(0.05)

    def failures(self) -> list[tuple[float, int, str, str]]:
        return [a for a in self.answers if not 200 <= a[1] < 300]

    def first(self, text: str) -> float | None:
        return next((at for at, code, body, _ in self.answers if code == 200 and text in body), None)

    def first_version(self, version: str) -> float | None:
        return next((at for at, code, _, v in self.answers if code == 200 and v == version), None)

    def finish(self, more: int = 10) -> None:
        """A few more answers, then stop."""
        count = len(self.answers)
        until("answers after the switch", lambda: len(self.answers) >= count + more, timeout=60)
        self.done.set()
        self.join(timeout=40)


def test_promotion_is_answered_by_the_new_version_without_a_failed_request(serving: Serving) -> None:
    if "raycluster_uid" not in serving.facts:
        pytest.skip("the resource never served (see the first test)")
    v = serving.versions
    client_thread = Client(serving)
    client_thread.start()
    until("the client's first answer", lambda: bool(client_thread.answers), timeout=30)
    promoted = time.monotonic()
    MlflowClient(serving.mlflow.url).set_registered_model_alias(MODEL, "champion", v.french)
    until(
        "the promoted version serving",
        lambda: serving.serving(v.french) and client_thread.first("Bonjour") is not None,
        timeout=ROLLOUT_S,
    )
    answered = client_thread.first("Bonjour")
    assert answered is not None
    client_thread.finish()
    promotion_s = answered - promoted
    print(f"promotion (polling) → new version answering through KubeRay: {promotion_s:.1f} s")
    serving.facts["promotion_s"] = promotion_s
    assert client_thread.failures() == [], client_thread.failures()[:5]
    (raycluster,) = serving.rayclusters()
    assert raycluster["metadata"]["uid"] == serving.facts["raycluster_uid"], "promotion replaced the cluster"
    assert serving.ask().json() == [{"translation_text": "Bonjour"}]
    serving.facts["good"] = v.french


def test_promotion_by_webhook_is_answered_without_a_failed_request(
    serving: Serving, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Polling put off for an hour: only MLflow's webhook delivery to the operator can start this rollout."""
    if "good" not in serving.facts:
        pytest.skip("the polling promotion did not complete (see above)")
    registry = MlflowClient(serving.mlflow.url)
    hooked = log_phrasebook(serving.mlflow.url, MODEL, lang_to="fr")
    rms = serving.cluster.rms(NAME)
    generation = _patch_spec(serving, {"registry": {"pollIntervalSeconds": 3600}})
    assert generation > rms["metadata"]["generation"]
    # As `regserve webhook register` does, with the secret the operator verifies deliveries with.
    monkeypatch.setenv("REGSERVE_WEBHOOK_SECRET", serving.facts["webhook_secret"])
    hook = register_webhook(
        tracking_uri=serving.mlflow.url,
        url=serving.webhook_url,
        name=f"regserve-{serving.namespace}",
        secret_env="REGSERVE_WEBHOOK_SECRET",
    )
    client_thread = Client(serving)
    try:
        client_thread.start()
        until("the client's first answer", lambda: bool(client_thread.answers), timeout=30)
        deliveries = serving.operator.output().count(f"for model {MODEL!r}")
        promoted = time.monotonic()
        registry.set_registered_model_alias(MODEL, "champion", hooked)
        until(
            "the version promoted by webhook serving",
            lambda: serving.serving(hooked) and client_thread.first_version(hooked) is not None,
            timeout=ROLLOUT_S,
        )
        answered = client_thread.first_version(hooked)
        assert answered is not None
        client_thread.finish()
    finally:
        client_thread.done.set()
        registry.delete_webhook(hook)
        _merge_spec(serving, NAME, {"registry": {"pollIntervalSeconds": 2}})
    promotion_s = answered - promoted
    print(f"promotion (webhook) → new version answering through KubeRay: {promotion_s:.1f} s")
    serving.facts["webhook_promotion_s"] = promotion_s
    # The operator verified MLflow's delivery and woke the resource for it.
    delivered = serving.operator.output().count(f"for model {MODEL!r}")
    assert delivered > deliveries, serving.operator.output()[-3000:]
    assert client_thread.failures() == [], client_thread.failures()[:5]
    (raycluster,) = serving.rayclusters()
    assert raycluster["metadata"]["uid"] == serving.facts["raycluster_uid"], "promotion replaced the cluster"
    serving.facts["good"] = hooked


def _merge_spec(serving: Serving, name: str, spec: dict[str, Any]) -> Any:
    """Merge-patch a resource's spec; returns the patched object."""
    return serving.cluster.custom.patch_namespaced_custom_object(
        "regserve.io", "v1alpha1", serving.namespace, "registeredmodelservings", name, {"spec": spec}
    )


def _patch_spec(serving: Serving, spec: dict[str, Any]) -> int:
    """Merge-patch the resource's spec and wait until the operator has seen it; returns the generation."""
    patched = _merge_spec(serving, NAME, spec)
    generation = int(patched["metadata"]["generation"])
    until(
        f"the operator seeing {spec}",
        lambda: serving.status().get("observedGeneration") == generation,
        timeout=60,
    )
    return generation


def test_canary_promotion_through_kuberay_without_a_failed_request(serving: Serving) -> None:
    """A canary step of 50 %: the old and the new version answer side by side, then the new one alone;
    the weights travel in user_config (same RayCluster), and MLflow's tags say where each version is."""
    if "good" not in serving.facts:
        pytest.skip("the earlier promotions did not complete (see above)")
    registry = MlflowClient(serving.mlflow.url)
    old = serving.good
    canaried = log_phrasebook(serving.mlflow.url, MODEL, lang_to="fr")
    canary = {"steps": [50], "stepSeconds": 4, "minRequests": 5, "maxLatencyRatio": 100}
    _patch_spec(serving, {"rollout": {"strategy": "Canary", "canary": canary}})
    client_thread = Client(serving)
    phases: set[str] = set()

    def promoted() -> bool:
        phases.add(str(serving.status().get("rolloutPhase")))
        return serving.serving(canaried) and client_thread.first_version(canaried) is not None

    try:
        client_thread.start()
        until("the client's first answer", lambda: bool(client_thread.answers), timeout=30)
        registry.set_registered_model_alias(MODEL, "champion", canaried)
        until("the canaried version serving", promoted, timeout=ROLLOUT_S)
        client_thread.finish(more=20)
    finally:
        client_thread.done.set()
        _patch_spec(serving, {"rollout": {"strategy": "Immediate"}})
    assert "Canary" in phases, phases
    assert client_thread.failures() == [], client_thread.failures()[:5]
    answered = [v for _, code, _, v in client_thread.answers if code == 200]
    first_new = answered.index(canaried)
    last_old = len(answered) - 1 - answered[::-1].index(old)
    # Side by side: the old version still answered after the new one first did (an immediate switch
    # on one replica would put every old answer before every new one).
    assert first_new < last_old, (first_new, last_old)
    assert set(answered[-20:]) == {canaried}, answered[-20:]
    (raycluster,) = serving.rayclusters()
    assert raycluster["metadata"]["uid"] == serving.facts["raycluster_uid"], "the canary replaced the cluster"
    key = f"regserve.io/{serving.namespace}/{NAME}"

    def tag(version: str) -> str:
        return str(registry.get_model_version(MODEL, version).tags.get(key, ""))

    until(
        "the deployment state in MLflow's tags",
        lambda: tag(canaried).startswith("serving") and tag(old).startswith(f"superseded by {canaried}"),
        timeout=60,
    )
    serving.facts["good"] = canaried


def test_incompatible_version_is_held_and_the_old_one_answers(serving: Serving) -> None:
    if "raycluster_uid" not in serving.facts:
        pytest.skip("the resource never served (see the first test)")
    v = serving.versions
    MlflowClient(serving.mlflow.url).set_registered_model_alias(MODEL, "champion", v.incompatible)
    until(
        "the incompatible version rejected",
        lambda: (serving.status().get("rejected") or {}).get("version") == v.incompatible,
        timeout=ROLLOUT_S,
    )
    status = serving.status()
    assert status["servingVersion"] == serving.good
    compatible = cond({"status": status}, "SignatureCompatible")
    assert compatible.get("status") == "False", status
    assert serving.ask().json() == [{"translation_text": "Bonjour"}]


def test_broken_artifacts_are_rolled_back(serving: Serving) -> None:
    if "raycluster_uid" not in serving.facts:
        pytest.skip("the resource never served (see the first test)")
    v = serving.versions
    MlflowClient(serving.mlflow.url).set_registered_model_alias(MODEL, "champion", v.broken)
    until(
        "the broken version rolled back",
        lambda: (
            (serving.status().get("rejected") or {}).get("version") == v.broken
            and serving.serving(serving.good)
        ),
        timeout=ROLLOUT_S,
    )
    assert serving.ask().json() == [{"translation_text": "Bonjour"}]
    history = serving.status().get("history") or []
    assert any(entry.get("version") == v.broken for entry in history), history


def test_rollout_cut_by_a_registry_outage_is_retried_and_completes(serving: Serving) -> None:
    """The registry is gone for the pods (the operator still reads it): the replica cannot load the
    promoted version, the app reports why, the operator rolls back with cause RegistryUnavailable and
    retries with back-off; once the registry is back the version rolls out by itself."""
    if "raycluster_uid" not in serving.facts:
        pytest.skip("the resource never served (see the first test)")
    registry = MlflowClient(serving.mlflow.url)
    # A version no replica has loaded yet: its switch needs the registry.
    unseen = log_phrasebook(serving.mlflow.url, MODEL, lang_to="de")
    serving.registry.set(only_from=network.BRIDGE_IP)
    try:
        registry.set_registered_model_alias(MODEL, "champion", unseen)

        def waiting_for_the_registry() -> bool:
            rejected = serving.status().get("rejected") or {}
            return rejected.get("version") == unseen and rejected.get("cause") == "RegistryUnavailable"

        until("the rollout rolled back for the registry outage", waiting_for_the_registry, timeout=ROLLOUT_S)
        rejected = serving.status()["rejected"]
        assert rejected["reason"] == "RolledBack" and "retried in" in rejected["message"], rejected
        assert serving.registry.refused > 0
        assert serving.ask().json() == [{"translation_text": "Bonjour"}]  # the old default answers
    finally:
        serving.registry.set()
    until(
        "the version serving once the registry is back",
        lambda: serving.serving(unseen) and serving.answers("Hallo"),
        timeout=ROLLOUT_S,
    )
    status = serving.status()
    assert status.get("rejected") is None and status["lastGoodVersion"] == unseen, status
    outcomes = [(e.get("version"), e.get("outcome")) for e in status.get("history") or []]
    assert (unseen, "RolledBack") in outcomes and (unseen, "Serving") in outcomes, outcomes
    serving.facts["good"] = unseen


def test_head_restarted_under_the_running_app_comes_back(serving: Serving) -> None:
    """Every process of the head dies at once (a container crash: the OOM killer, a segfault): the runner
    reports and restarts it as a kubelet does, KubeRay deploys the app on the new head, and it answers
    again on the same RayCluster."""
    if "good" not in serving.facts:
        pytest.skip("the resource is not serving (see above)")
    runner = serving.plane.runner
    assert runner is not None
    raycluster = serving.active_cluster()
    (head,) = serving.pods(raycluster["metadata"]["name"], "head")
    (before,) = head.status.container_statuses
    netns = runner.workers[head.metadata.uid].sandbox.netns
    pids = network.netns_pids(netns)
    assert pids, "the head runs nothing"
    crashed = time.monotonic()
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    seen: list[Any] = []

    def restarted() -> bool:
        pod = serving.cluster.core.read_namespaced_pod(head.metadata.name, serving.namespace)
        seen[:] = pod.status.container_statuses or []
        return (
            bool(seen) and seen[0].restart_count > before.restart_count and seen[0].state.running is not None
        )

    until("the head container restarted", restarted, timeout=60)
    (after,) = seen
    assert after.last_state.terminated is not None, after
    assert after.last_state.terminated.exit_code == 128 + signal.SIGKILL, after.last_state
    assert after.last_state.terminated.reason == "Error"
    # Nothing of the crashed container lives on beside the new one.
    assert not [pid for pid in pids if network._alive(pid) and not network._zombie(pid)]

    def app_back() -> bool:
        """The new head (a fresh GCS, which knows nothing of the old one's app) runs the app again,
        deployed by KubeRay, with a replica on a worker node that joined it, and that replica answers."""
        try:
            apps = serving.head_get(raycluster, "/api/serve/applications/")
            if apps.status_code != 200:
                return False
            app = apps.json()["applications"].get(NAME) or {}
            if app.get("status") != "RUNNING":
                return False
            nodes = serving.ray_state(raycluster, "/api/v0/nodes?detail=true&limit=100")
            actors = serving.ray_state(raycluster, "/api/v0/actors?detail=true&limit=1000")
        except (httpx.HTTPError, AssertionError, KeyError, ValueError):
            return False
        workers = {n["node_id"] for n in nodes if n["state"] == "ALIVE" and not n["is_head_node"]}
        replicas = [
            a
            for a in actors
            if a["class_name"].startswith(f"ServeReplica:{NAME}:")
            and a["state"] == "ALIVE"
            and a["node_id"] in workers
        ]
        return bool(replicas) and serving.answered_by(serving.good)

    until("the app deployed on the new head and answering", app_back, timeout=FIRST_SERVE_S)
    restarts = [
        status.restart_count
        for pod in serving.pods(raycluster["metadata"]["name"], "worker")
        for status in pod.status.container_statuses or []
    ]
    print(
        f"head crash → app running on the new head and answering: {time.monotonic() - crashed:.0f} s "
        f"(worker container restarts: {restarts})"
    )
    assert serving.active_cluster()["metadata"]["uid"] == raycluster["metadata"]["uid"]
    until("the resource Ready again", lambda: serving.serving(serving.good), timeout=ROLLOUT_S)


def log_padded_phrasebook(tracking_uri: str, model_name: str, padding: Path, lang_to: str) -> str:
    """A phrasebook version whose artifacts carry `padding`: the same signature, a larger model size."""
    import mlflow
    import pandas as pd
    from mlflow.models import infer_signature

    mlflow.set_tracking_uri(tracking_uri)
    signature = infer_signature(pd.DataFrame({"prompt": ["Hello"]}), [{"translation_text": "Hallo"}])
    with mlflow.start_run():
        info = mlflow.pyfunc.log_model(
            name="model",
            python_model=str(PHRASEBOOK_MODEL),
            artifacts={"padding": str(padding)},
            model_config={"lang_to": lang_to, "input_label": "prompt", "fail_on_load": False},
            signature=signature,
            pip_requirements=["mlflow", "pandas"],
            registered_model_name=model_name,
        )
    return str(info.registered_model_version)


def _worker_memory(raycluster: dict[str, Any]) -> int:
    from kubernetes.utils import parse_quantity

    (group,) = raycluster["spec"]["workerGroupSpecs"]
    (container,) = group["template"]["spec"]["containers"]
    return int(parse_quantity(container["resources"]["limits"]["memory"]))


@pytest.mark.timeout(NEW_CLUSTER_S + 300)
def test_promotion_needing_more_memory_moves_to_a_new_cluster_without_a_failed_request(
    serving: Serving, tmp_path: Path
) -> None:
    """A version too large for the replica's memory: sizing grows the worker pods, KubeRay (upgrade
    strategy NewCluster, its default) brings up a new RayCluster while the old one answers, switches the
    serve Service once the new one serves, and deletes the old one (checked at the end of the module,
    after KubeRay's deletion delay)."""
    if "good" not in serving.facts:
        pytest.skip("the resource is not serving (see above)")
    old = serving.active_cluster()
    old_memory = int(serving.status()["sizing"]["memoryBytes"])
    padding = tmp_path / "padding.bin"
    # 16 MiB x memoryMultiplier 20 x 2 versions per replica = 640 MiB more than a small version needs.
    padding.write_bytes(os.urandom(16 * 1024 * 1024))
    big = log_padded_phrasebook(serving.mlflow.url, MODEL, padding, lang_to="fr")
    client_thread = Client(serving)
    try:
        client_thread.start()
        until("the client's first answer", lambda: bool(client_thread.answers), timeout=30)
        promoted = time.monotonic()
        MlflowClient(serving.mlflow.url).set_registered_model_alias(MODEL, "champion", big)
        until(
            "the larger version serving from a new RayCluster",
            lambda: serving.serving(big) and client_thread.first_version(big) is not None,
            timeout=NEW_CLUSTER_S,
        )
        client_thread.finish()
    finally:
        client_thread.done.set()
    answered = client_thread.first_version(big)
    assert answered is not None
    print(f"promotion needing a new RayCluster → new version answering: {answered - promoted:.0f} s")
    assert client_thread.failures() == [], client_thread.failures()[:5]
    versions = [v for _, _, _, v in client_thread.answers]
    switched = versions.index(big)
    assert set(versions[:switched]) == {serving.good}, "the old cluster did not answer until the switch"
    assert set(versions[switched:]) == {big}, "answers went back to the old cluster after the switch"
    new = serving.active_cluster()
    assert new["metadata"]["uid"] != old["metadata"]["uid"], "the cluster was not replaced"
    assert int(serving.status()["sizing"]["memoryBytes"]) > old_memory
    assert _worker_memory(new) > _worker_memory(old)
    serving.facts["replaced_cluster"] = old["metadata"]["name"]
    serving.facts["good"] = big


@pytest.mark.timeout(FIRST_SERVE_S + 300)
def test_proxy_ingress_mode_and_a_gpu_model_on_the_gpu_node(serving: Serving) -> None:
    """The other ingress mode (Ray's Python proxy instead of HAProxy), on a cluster of its own, for a
    model that needs a GPU: its worker asks for `nvidia.com/gpu`, lands on the GPU node, Ray there
    advertises the GPU (KubeRay's `ray start --num-gpus` from the limit) and the replica runs on it."""
    if "raycluster_uid" not in serving.facts:
        pytest.skip("the resource never served (see the first test)")
    name = "proxied"
    # A version known to serve (a no-op when the alias already names it).
    MlflowClient(serving.mlflow.url).set_registered_model_alias(MODEL, "champion", serving.good)
    spec = _spec(serving.mlflow.url)
    spec["serving"]["ingressMode"] = "proxy"
    spec["resources"] = {"accelerator": "gpu"}
    serving.cluster.create_rms(name, spec)

    def answer() -> httpx.Response | None:
        return serving.answer_at(name, name)

    try:
        until(
            "the proxy-mode resource answering",
            lambda: (r := answer()) is not None and r.status_code == 200,
            timeout=FIRST_SERVE_S,
        )
        response = answer()
        assert response is not None and response.headers["x-model-version"] == serving.good, response
        rs = serving.cluster.rayservice(name)
        assert rs is not None
        head = rs["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0]
        assert HAPROXY_ENV not in {e["name"] for e in head.get("env", [])}
        _assert_replica_on_the_gpu_worker(serving, name)
    finally:
        serving.cluster.custom.delete_namespaced_custom_object(
            "regserve.io", "v1alpha1", serving.namespace, "registeredmodelservings", name
        )
    until("the proxy-mode RayService gone", lambda: serving.cluster.rayservice(name) is None, timeout=120)


def _assert_replica_on_the_gpu_worker(serving: Serving, name: str) -> None:
    raycluster = serving.active_cluster(name)
    (worker,) = serving.pods(raycluster["metadata"]["name"], "worker")
    assert worker.spec.node_name == plane.GPU_NODE, worker.spec.node_name
    (container,) = worker.spec.containers
    assert container.resources.limits[GPU_RESOURCE] == "1", container.resources
    # KubeRay turned the limit into Ray's GPU count, as in a real pod.
    assert "--num-gpus=1" in " ".join([*(container.command or []), *(container.args or [])])
    nodes = serving.ray_state(raycluster, "/api/v0/nodes?detail=true&limit=100")
    by_id = {n["node_id"]: n for n in nodes if n["state"] == "ALIVE"}
    gpu_nodes = [n for n in by_id.values() if n["resources_total"].get("GPU")]
    assert [n["node_ip"] for n in gpu_nodes] == [worker.status.pod_ip], nodes
    actors = serving.ray_state(raycluster, "/api/v0/actors?detail=true&limit=1000")
    replicas = [
        a for a in actors if a["class_name"].startswith(f"ServeReplica:{name}:") and a["state"] == "ALIVE"
    ]
    assert replicas, [(a["class_name"], a["state"]) for a in actors]
    for replica in replicas:
        assert by_id[replica["node_id"]]["node_ip"] == worker.status.pod_ip, (replica, nodes)
        assert replica["required_resources"].get("GPU") == 1, replica


@pytest.mark.timeout(FIRST_SERVE_S + ROLLOUT_S + 300)
def test_two_resources_share_one_cluster_and_a_promotion_leaves_the_other_alone(serving: Serving) -> None:
    """Two resources naming one cluster: one RayService, one Ray cluster, an application each behind
    its own route prefix. Promoting one reconfigures its application only: the other's replicas are
    the same Ray actors, and it answers throughout."""
    if "raycluster_uid" not in serving.facts:
        pytest.skip("the resource never served (see the first test)")
    pool, first, second = "pool", "pool-a", "pool-b"
    german, french = serving.versions.german, serving.versions.french
    MlflowClient(serving.mlflow.url).set_registered_model_alias(MODEL, "champion", serving.good)
    specs = {first: _spec(serving.mlflow.url), second: _spec(serving.mlflow.url)}
    specs[second]["model"] = {"name": MODEL, "version": german}
    for name, spec in specs.items():
        spec["placement"] = {"cluster": pool}
        serving.cluster.create_rms(name, spec)

    def answer(name: str) -> httpx.Response | None:
        return serving.answer_at(pool, name)

    def answers(name: str, version: str) -> bool:
        response = answer(name)
        return (
            response is not None
            and response.status_code == 200
            and response.headers["x-model-version"] == version
        )

    def replica_ids(app: str) -> set[str]:
        actors = serving.ray_state(serving.active_cluster(pool), "/api/v0/actors?detail=true&limit=1000")
        return {
            a["actor_id"]
            for a in actors
            if a["class_name"].startswith(f"ServeReplica:{app}:") and a["state"] == "ALIVE"
        }

    traffic: Client | None = None
    try:
        until(
            "both applications answering on the shared cluster",
            lambda: answers(first, serving.good) and answers(second, german),
            timeout=FIRST_SERVE_S,
        )
        assert serving.cluster.rayservice(first) is None and serving.cluster.rayservice(second) is None
        assert len(serving.rayclusters(pool)) == 1
        before = replica_ids(first)
        assert before, "no replica of the first application"

        traffic = Client(serving, url=lambda: serving.url_at(pool, first))
        traffic.start()
        started = time.monotonic()
        _merge_spec(serving, second, {"model": {"version": french}})
        until("the second application promoted", lambda: answers(second, french), timeout=ROLLOUT_S)
        shared_s = time.monotonic() - started
        traffic.finish()
        assert traffic.failures() == [], traffic.failures()[:5]
        assert {version for _, _, _, version in traffic.answers} == {serving.good}
        assert replica_ids(first) == before  # the other application was not touched
        assert len(serving.rayclusters(pool)) == 1

        # The same promotion (a spec change to a version the replica has not loaded) of the resource
        # with a RayService of its own, for the comparison.
        target = german if serving.good != german else french
        started = time.monotonic()
        _merge_spec(serving, NAME, {"model": {"alias": None, "version": target}})
        until(
            "the resource with its own cluster promoted",
            lambda: serving.answered_by(target),
            timeout=ROLLOUT_S,
        )
        own_s = time.monotonic() - started
        serving.facts["good"] = target
        print(
            f"promotion by a spec change answered after {shared_s:.1f} s as a member of a shared cluster,"
            f" {own_s:.1f} s with a RayService of its own"
        )
    finally:
        if traffic is not None:
            traffic.done.set()
        for name in (first, second):
            serving.cluster.custom.delete_namespaced_custom_object(
                "regserve.io", "v1alpha1", serving.namespace, "registeredmodelservings", name
            )
    until(
        "the shared RayService gone with its members",
        lambda: serving.cluster.rayservice(pool) is None,
        timeout=120,
    )


def test_monitoring_logs_payloads_to_mlflow_and_reports_a_shifted_prompt_as_drift(
    serving: Serving, tmp_path: Path
) -> None:
    """spec.monitoring with real Ray behind KubeRay: every request's record read back from MLflow with
    pandas as the client sent and got it; prompts the training data never had → InputDrift naming
    `prompt`, the window's figures in status and on the version's MLflow run; then CloudEvents with a
    Secret's headers at a receiver of our own. Turned off again after."""
    if "raycluster_uid" not in serving.facts:
        pytest.skip("the resource never served (see the first test)")
    prompts = ["Hello", "Goodbye", "Thank you"] * 40
    monitored = log_phrasebook(serving.mlflow.url, MODEL, lang_to="de", training_prompts=prompts)
    _merge_spec(
        serving,
        NAME,
        {
            "model": {"alias": "champion", "version": None},
            "monitoring": {
                "payloads": {"sampleRate": 1.0},
                "drift": {"windowSeconds": 10, "minRows": 20, "psiThreshold": 0.2},
            },
        },
    )
    MlflowClient(serving.mlflow.url).set_registered_model_alias(MODEL, "champion", monitored)
    until("the monitored version serving", lambda: serving.serving(monitored), timeout=ROLLOUT_S)
    serving.facts["good"] = monitored
    until("it answers", lambda: serving.answered_by(monitored), timeout=ROLLOUT_S)

    sent: dict[str, str] = {}
    answers: dict[str, Any] = {}

    condition: dict[str, Any] = {}

    def drifted() -> bool:
        for _ in range(10):
            rid = f"mon-{len(sent)}"
            sent[rid] = f"Good morning {len(sent) % 3}"
            response = httpx.post(
                serving.url(), json={"prompt": sent[rid]}, headers={"X-Request-Id": rid}, timeout=30
            )
            assert response.status_code == 200, response.text
            answers[rid] = response.json()[0]["translation_text"]
        condition.update(cond({"status": serving.status()}, "InputDrift") or {})
        return condition.get("status") == "True"

    try:
        until("InputDrift=True", drifted, timeout=180)
    except plane.PlaneError:
        raise AssertionError(f"no drift: {serving.status().get('monitoring')} {condition}") from None
    assert condition["message"].startswith(f"version {monitored}: prompt (PSI "), condition
    figures = {f["version"]: f for f in serving.status()["monitoring"]["versions"]}[monitored]
    assert figures["reference"] == "training" and figures["drifted"] == ["prompt"]

    registry = MlflowClient(serving.mlflow.url)
    experiment = registry.get_experiment_by_name(f"regserve/{serving.namespace}/{NAME}")
    assert experiment is not None
    (run,) = registry.search_runs(
        [experiment.experiment_id], filter_string=f"tags.`regserve.model_version` = '{monitored}'"
    )
    assert registry.get_metric_history(run.info.run_id, "psi.prompt")[-1].value > 0.2

    read: dict[str, pd.DataFrame] = {}

    def records() -> bool:
        into = tmp_path / f"payloads-{time.monotonic_ns()}"
        read["frame"] = pd.read_parquet(registry.download_artifacts(run.info.run_id, "payloads", str(into)))
        return set(sent) <= set(read["frame"]["request_id"])

    until("every request's record in MLflow", records, timeout=60)
    frame = read["frame"].set_index("request_id")
    for rid, prompt in sent.items():
        assert frame.loc[rid, "input_prompt"] == prompt
        assert frame.loc[rid, "output_translation_text"] == answers[rid]
        assert frame.loc[rid, "version"] == monitored and frame.loc[rid, "status"] == 200

    # The CloudEvents sink, its headers from a Secret by reference: events in KServe's format reach a
    # receiver of our own on the pod bridge, with the Secret's header.
    token = f"Bearer {uuid.uuid4().hex}"
    serving.cluster.secret("payload-headers", {"headers": f"Authorization: {token}"})
    try:
        with EventReceiver(host=network.BRIDGE_IP) as receiver:
            http = {"url": receiver.url, "headersSecretRef": {"name": "payload-headers", "key": "headers"}}
            _merge_spec(serving, NAME, {"monitoring": {"payloads": {"sink": {"mlflow": None, "http": http}}}})
            asked: list[str] = []

            def delivered() -> bool:
                asked.append(f"event-{len(asked)}")
                response = httpx.post(
                    serving.url(), json={"prompt": "Hello"}, headers={"X-Request-Id": asked[-1]}, timeout=30
                )
                assert response.status_code == 200, response.text
                return any(len(receiver.of(rid)) == 2 for rid in asked)

            until("CloudEvents at the receiver", delivered, timeout=NEW_CLUSTER_S)
            events = next(receiver.of(rid) for rid in asked if len(receiver.of(rid)) == 2)
    finally:
        serving.cluster.core.delete_namespaced_secret("payload-headers", serving.namespace)
    (request, asked_body), (response, answered_body) = (
        events["org.kubeflow.serving.inference.request"],
        events["org.kubeflow.serving.inference.response"],
    )
    for headers in (request, response):
        assert headers["authorization"] == token
        assert (headers["ce-inferenceservicename"], headers["ce-namespace"]) == (NAME, serving.namespace)
        assert (headers["ce-modelversion"], headers["ce-statuscode"]) == (monitored, "200")
    assert asked_body == {"dataframe_records": [{"prompt": "Hello"}]}
    assert list(answered_body["predictions"][0]) == ["translation_text"]

    _merge_spec(serving, NAME, {"monitoring": None})
    until(
        "monitoring off in the app's args",
        lambda: "monitoring" not in _app_args(serving),
        timeout=60,
    )
    until("answering without it", lambda: serving.answered_by(monitored), timeout=ROLLOUT_S)


def _app_args(serving: Serving) -> dict[str, Any]:
    rayservice = serving.cluster.rayservice(NAME) or {}
    config = yaml.safe_load((rayservice.get("spec") or {}).get("serveConfigV2") or "{}") or {}
    return dict((config.get("applications") or [{}])[0].get("args") or {})


def _cli(argv: list[str], env: dict[str, str], timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, *argv], env={**os.environ, **env}, capture_output=True, text=True, timeout=timeout
    )


@pytest.mark.timeout(FIRST_SERVE_S + 3 * ROLLOUT_S + 300)
def test_mlflow_deployments_create_predict_canary_update_rollback_and_delete(
    serving: Serving, admin_kubeconfig: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """What a user of MLflow does, with MLflow's own CLI and client and regserve's verbs: create blocks until
    the version answers, predict goes through the API server's service proxy, an update to another alias
    with a canary returns the rollout's verdict, a rollback follows its own, delete twice is no error."""
    if "raycluster_uid" not in serving.facts:
        pytest.skip("the resource never served (see the first test)")
    name, v = "deployed", serving.versions
    registry = MlflowClient(serving.mlflow.url)
    registry.set_registered_model_alias(MODEL, "plugin-stable", v.german)
    registry.set_registered_model_alias(MODEL, "plugin-next", v.french)
    target = f"regserve:/{serving.namespace}"
    # The tracking URI the resource names is the one the pods reach (the plugin's default: the caller's).
    env = {"KUBECONFIG": str(admin_kubeconfig), "MLFLOW_TRACKING_URI": serving.registry.url}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    mlflow_cli = ["-m", "mlflow", "deployments"]
    traffic: Client | None = None
    try:
        created = _cli(
            [*mlflow_cli, "create", "-t", target, "--name", name, "-m", f"models:/{MODEL}@plugin-stable",
             "-C", "credentialsSecretRef.name=mlflow-auth", "-C", "pollIntervalSeconds=2",
             "-C", "cpusPerReplica=0.5", "-C", f"timeout={FIRST_SERVE_S}"],
            env, timeout=FIRST_SERVE_S + 60,
        )  # fmt: skip
        assert created.returncode == 0, created.stderr[-3000:]
        assert serving.cluster.rms(name)["status"]["servingVersion"] == v.german

        inputs = tmp_path / "inputs.json"
        inputs.write_text(json.dumps([{"prompt": "Hello"}]))
        predicted = _cli(
            [*mlflow_cli, "predict", "-t", target, "--name", name, "--input-path", str(inputs)],
            env,
            timeout=120,
        )
        assert predicted.returncode == 0, predicted.stderr[-3000:]
        assert json.loads(predicted.stdout.strip().splitlines()[-1])["predictions"] == [
            {"translation_text": "Hallo"}
        ]

        traffic = Client(serving, url=lambda: serving.url_at(name, name))
        traffic.start()
        deployments = get_deploy_client(target)
        # The verdict is what is shown, not the latency gate: a few requests on a loaded machine make a
        # noisy p95, so the latency bound is as wide as the CRD allows.
        canary = {
            "strategy": "Canary",
            "canary.steps": "50",
            "stepSeconds": "2",
            "minRequests": "5",
            "maxLatencyRatio": "100",
        }
        updated = deployments.update_deployment(
            name, model_uri=f"models:/{MODEL}@plugin-next", config={**canary, "timeout": str(ROLLOUT_S)}
        )
        assert (updated["serving_version"], updated["phase"], updated["ready"]) == (v.french, "Idle", True)
        until("the canary step's Event", lambda: bool(serving.cluster.events(name, "CanaryStep")), timeout=60)
        assert {v.german, v.french} <= {version for _, code, _, version in traffic.answers if code == 200}
        pinned = deployments.predict(name, pd.DataFrame({"prompt": ["Hello"]}), version=v.german)
        assert pinned.get_predictions().iloc[0, 0] == "Hallo"
        assert deployments.get_deployment(name)["serving_version"] == v.french
        assert name in [d["name"] for d in deployments.list_deployments()]

        shown = _cli(["-m", "regserve_operator.cli", "status", name, "-t", target], env, timeout=60)
        assert shown.returncode == 0 and f"{name}  {v.french}" in shown.stdout, shown
        rolled_back = _cli(
            ["-m", "regserve_operator.cli", "rollback", name, "-t", target,
             "--tracking-uri", serving.mlflow.url, "--timeout", str(ROLLOUT_S)],
            env, timeout=ROLLOUT_S + 60,
        )  # fmt: skip
        assert rolled_back.returncode == 0, rolled_back.stdout[-3000:] + rolled_back.stderr[-3000:]
        assert f"version {v.german} is serving" in rolled_back.stdout
        assert registry.get_model_version_by_alias(MODEL, "plugin-next").version == v.german
        traffic.finish()
        assert traffic.failures() == [], traffic.failures()[:5]
    finally:
        if traffic is not None:
            traffic.done.set()
        for _ in range(2):  # the second finds nothing to delete, and is no error
            deleted = _cli([*mlflow_cli, "delete", "-t", target, "--name", name], env, timeout=120)
            assert deleted.returncode == 0, deleted.stderr[-3000:]
        # Whatever happened above: the next tests count the namespace's Ray clusters.
        until(
            "the deployment's RayService gone", lambda: serving.cluster.rayservice(name) is None, timeout=120
        )
        until("the deployment's RayCluster gone", lambda: not serving.rayclusters(name), timeout=240)


# Replica bounds of the autoscaling test: one replica per worker pod, as pods are sized today.
ELASTIC_MAX = 2


@pytest.mark.timeout(FIRST_SERVE_S + 3 * ROLLOUT_S + AUTOSCALER_IDLE_TIMEOUT_S + 300)
def test_autoscaling_adds_worker_pods_under_load_and_scales_to_zero(serving: Serving) -> None:
    """`serving.autoscaling` from zero replicas: under a load step Serve asks for more replicas and
    KubeRay's autoscaler (a sidecar of the head pod calling the apiserver as its service account) adds a
    worker pod for each, on the same RayCluster, without a failed request; when the load stops the replicas
    go to zero and the idle worker pods are removed; the first request after that waits for a pod and a
    replica and is answered by the serving version."""
    if "raycluster_uid" not in serving.facts:
        pytest.skip("the resource never served (see the first test)")
    name, model = "elastic", f"{MODEL}_slow"
    version = log_slow_echo(serving.mlflow.url, model, delay_s=0.25)
    MlflowClient(serving.mlflow.url).set_registered_model_alias(model, "champion", version)
    spec = _spec(serving.mlflow.url)
    spec["model"] = {"name": model, "alias": "champion"}
    spec["serving"]["autoscaling"] = {
        "minReplicas": 0,
        "maxReplicas": ELASTIC_MAX,
        "targetOngoingRequests": 1,
        "upscaleDelaySeconds": 0,
        "downscaleDelaySeconds": 5,
    }
    serving.cluster.create_rms(name, spec)

    def ask(text: str, timeout: float) -> httpx.Response:
        return httpx.post(serving.url_at(name, name), json={"prompt": text}, timeout=timeout)

    def settled() -> bool:
        status = dict(serving.cluster.rms(name).get("status") or {})
        ready = (cond({"status": status}, "Ready") or {}).get("status") == "True"
        return ready and status.get("servingVersion") == version and not status.get("rolloutVersion")

    def workers() -> list[Any]:
        return serving.pods(serving.active_cluster(name)["metadata"]["name"], "worker")

    def _heads() -> list[Any]:
        clusters = serving.rayclusters(name)
        return serving.pods(clusters[0]["metadata"]["name"], "head") if clusters else []

    until("the head pod", lambda: bool(_heads()), timeout=FIRST_SERVE_S)

    # The autoscaler sidecar calls the API server: it alone mounts a ServiceAccount token, not ray-head.
    for head in _heads():
        _assert_hardened(head, token=True)

    def ready_workers() -> int:
        return sum(1 for pod in workers() if not pod.metadata.deletion_timestamp and pod_ready(pod))

    def replicas() -> int:
        actors = serving.ray_state(serving.active_cluster(name), "/api/v0/actors?detail=true&limit=1000")
        return sum(
            1 for a in actors if a["class_name"].startswith(f"ServeReplica:{name}:") and a["state"] == "ALIVE"
        )

    clients: list[Client] = []
    try:
        until("the autoscaled resource serving", settled, timeout=FIRST_SERVE_S)
        raycluster = serving.active_cluster(name)
        uid = raycluster["metadata"]["uid"]
        assert raycluster["spec"]["enableInTreeAutoscaling"] is True
        (group,) = raycluster["spec"]["workerGroupSpecs"]
        assert (group["minReplicas"], group["maxReplicas"]) == (0, ELASTIC_MAX), group
        # Ready in status can come before KubeRay marks a pod behind the Serve Service.
        assert serving.plane.cluster_hosts is not None
        service = f"{name}-serve-svc.{serving.namespace}.svc"
        until(
            f"{service} with a ready endpoint",
            lambda: service in serving.plane.cluster_hosts.entries,
            timeout=ROLLOUT_S,
        )
        warm = ask("warm", timeout=ROLLOUT_S)  # from zero or not, whatever the rollout probe left
        assert warm.status_code == 200 and warm.json() == [{"echo": "warm"}], warm.text

        clients = [Client(serving, url=lambda: serving.url_at(name, name)) for _ in range(6)]
        stepped = time.monotonic()
        for client_thread in clients:
            client_thread.start()
        until(
            f"{ELASTIC_MAX} replicas on {ELASTIC_MAX} worker pods",
            lambda: replicas() == ELASTIC_MAX and ready_workers() == ELASTIC_MAX,
            timeout=2 * ROLLOUT_S,
        )
        grew_s = time.monotonic() - stepped
        for client_thread in clients:
            client_thread.finish(more=5)
        failures = [f for c in clients for f in c.failures()]
        assert failures == [], failures[:5]
        assert {v for c in clients for _, _, _, v in c.answers} == {version}

        stopped = time.monotonic()
        until("no replica left", lambda: replicas() == 0, timeout=ROLLOUT_S)
        until(
            "the idle worker pods removed",
            lambda: not workers(),
            timeout=AUTOSCALER_IDLE_TIMEOUT_S + ROLLOUT_S,
        )
        idle_s = time.monotonic() - stopped
        assert [c["metadata"]["uid"] for c in serving.rayclusters(name)] == [uid]  # growth replaced nothing

        woken = time.monotonic()
        first = ask("wake up", timeout=2 * ROLLOUT_S)
        wake_s = time.monotonic() - woken
        assert first.status_code == 200, first.text
        assert first.json() == [{"echo": "wake up"}]
        assert first.headers["x-model-version"] == version
        # The pod answered before its readiness probe caught up: Ready follows within a probe period.
        until("one worker pod and one replica", lambda: ready_workers() == 1 and replicas() == 1, timeout=60)
        print(
            f"autoscaling on KubeRay: {ELASTIC_MAX} replicas on {ELASTIC_MAX} pods {grew_s:.0f} s into the"
            f" load step, no replica and no worker pod {idle_s:.0f} s after it, first request after scale"
            f" to zero answered in {wake_s:.1f} s"
        )
    finally:
        for client_thread in clients:
            client_thread.done.set()
        serving.cluster.custom.delete_namespaced_custom_object(
            "regserve.io", "v1alpha1", serving.namespace, "registeredmodelservings", name
        )
    until("the autoscaled RayService gone", lambda: serving.cluster.rayservice(name) is None, timeout=120)


def test_delete_removes_ray_pods_processes_and_namespaces(serving: Serving) -> None:
    if "raycluster_uid" not in serving.facts:
        pytest.skip("the resource never served (see the first test)")
    runner = serving.plane.runner
    assert runner is not None
    replaced = serving.facts.get("replaced_cluster")
    if replaced:
        # KubeRay deletes the cluster a new one replaced after its deletion delay (60 s by default).
        until(
            "the RayCluster replaced by the memory growth deleted",
            lambda: replaced not in {c["metadata"]["name"] for c in serving.rayclusters()},
            timeout=300,
        )
        assert not serving.pods(replaced, "head") or all(
            p.metadata.deletion_timestamp for p in serving.pods(replaced, "head")
        )
    serving.cluster.custom.delete_namespaced_custom_object(
        "regserve.io", "v1alpha1", serving.namespace, "registeredmodelservings", NAME
    )

    def gone() -> bool:
        pods = serving.cluster.core.list_namespaced_pod(serving.namespace).items
        return (
            serving.cluster.rayservice(NAME) is None
            and not serving.rayclusters()
            and not pods
            and not runner.workers
            and not network.list_namespaces(runner.netns_prefix)
        )

    until("RayService, RayCluster, pods, processes and namespaces gone", gone, timeout=120)
