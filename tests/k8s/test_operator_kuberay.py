"""The operator with the real KubeRay: what a promotion does to the RayCluster KubeRay made.

These RayServices live in the namespace KubeRay watches; KubeRay creates their RayClusters and KWOK
runs the pods. No Ray runs in them, so applications never become RUNNING: the tests look at specs.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import mlflow
import pytest
from kopf.testing import KopfRunner
from kubernetes import client
from regserve_operator.sandbox.mlflow_server import MlflowServer

from tests.k8s import plane
from tests.k8s.operator_support import (
    Cluster,
    carried,
    new_model,
    operator_account,
    rms_spec,
    running_operator,
    steady,
    until,
)
from tests.operator.mlflow_fixture import log_version

pytestmark = pytest.mark.k8s

KUBERAY_REACTION_S = 40.0


@pytest.fixture
def operator(
    kube_api: client.ApiClient,
    kuberay_namespace: str,
    mint_kubeconfig: plane.MintKubeconfig,
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[KopfRunner]:
    account = f"regserve-{uuid.uuid4().hex[:6]}"
    with (
        operator_account(kube_api, kuberay_namespace, mint_kubeconfig, account) as kubeconfig,
        running_operator(kubeconfig, kuberay_namespace, monkeypatch) as runner,
    ):
        yield runner


@pytest.fixture
def cluster(kube_api: client.ApiClient, kuberay_namespace: str) -> Iterator[Cluster]:
    view = Cluster(kube_api, kuberay_namespace)
    yield view
    for name in view.created:
        view.custom.delete_namespaced_custom_object(
            "regserve.io", "v1alpha1", kuberay_namespace, "registeredmodelservings", name
        )


def _rayclusters(cluster: Cluster, rayservice: dict[str, Any]) -> list[dict[str, Any]]:
    listing: Any = cluster.custom.list_namespaced_custom_object(
        "ray.io", "v1", cluster.namespace, "rayclusters"
    )
    uid = rayservice["metadata"]["uid"]
    return [
        c
        for c in listing["items"]
        if any(ref["uid"] == uid for ref in c["metadata"].get("ownerReferences", []))
    ]


def _shape(cluster: Cluster, name: str) -> list[tuple[str, int, Any]]:
    rs = cluster.rayservice(name)
    if rs is None:
        return []
    return sorted(
        (c["metadata"]["name"], c["metadata"]["generation"], c["spec"]) for c in _rayclusters(cluster, rs)
    )


def test_similar_size_promotion_keeps_the_raycluster(
    cluster: Cluster, operator: KopfRunner, mlflow_server: MlflowServer
) -> None:
    model = new_model()
    name = f"kr-{uuid.uuid4().hex[:6]}"
    log_version(mlflow_server.url, model, {"prompt": "string"}, alias="champion")
    v2 = log_version(mlflow_server.url, model, {"prompt": "string"})
    secret = f"auth-{name}"
    cluster.secret(secret, {})
    spec = rms_spec(model, mlflow_server.url)
    spec["registry"]["credentialsSecretRef"] = {"name": secret}
    cluster.create_rms(name, spec)
    cluster.created.append(name)
    until("KubeRay created the RayCluster", lambda: len(_shape(cluster, name)) == 1, timeout=90)
    before = _shape(cluster, name)

    mlflow.MlflowClient(mlflow_server.url).set_registered_model_alias(model, "champion", v2)
    until("serveConfigV2 patched to v2", lambda: carried(cluster, name) == v2)
    # Watch longer than KubeRay takes to act on a real shape change here (the counterpart test below
    # measured about 33 s on this machine): the cluster must stay the same one, unchanged.
    after = steady("RayClusters", lambda: _shape(cluster, name), KUBERAY_REACTION_S)
    assert after == before


def test_gpu_spec_lands_workers_on_gpu_nodes(
    cluster: Cluster, operator: KopfRunner, mlflow_server: MlflowServer, kube_api: client.ApiClient
) -> None:
    model = new_model()
    name = f"gpu-{uuid.uuid4().hex[:6]}"
    log_version(mlflow_server.url, model, {"prompt": "string"}, alias="champion")
    secret = f"auth-{name}"
    cluster.secret(secret, {})
    spec = rms_spec(
        model,
        mlflow_server.url,
        resources={
            "accelerator": "gpu",
            "gpuNodeSelector": {plane.GPU_PRODUCT_LABEL: plane.GPU_PRODUCT},
            "gpuTolerations": [{"key": plane.GPU_TAINT["key"], "operator": "Exists", "effect": "NoSchedule"}],
        },
    )
    spec["registry"]["credentialsSecretRef"] = {"name": secret}
    cluster.create_rms(name, spec)
    cluster.created.append(name)
    until("KubeRay created the RayCluster", lambda: len(_shape(cluster, name)) == 1, timeout=90)
    (raycluster,) = [c for c, _, _ in _shape(cluster, name)]
    core = client.CoreV1Api(kube_api)

    def worker_on_gpu() -> bool:
        pods = core.list_namespaced_pod(
            cluster.namespace, label_selector=f"ray.io/cluster={raycluster}"
        ).items
        workers = [p for p in pods if p.metadata.labels.get("ray.io/node-type") == "worker"]
        return bool(workers) and all(p.spec.node_name == plane.GPU_NODE for p in workers)

    until("worker pod bound to the GPU node", worker_on_gpu, timeout=90)


def test_cluster_shape_change_reaches_kuberay(
    cluster: Cluster, operator: KopfRunner, mlflow_server: MlflowServer
) -> None:
    """The counterpart: a spec change that needs bigger pods does reach the RayCluster side."""
    model = new_model()
    name = f"kr-{uuid.uuid4().hex[:6]}"
    log_version(mlflow_server.url, model, {"prompt": "string"}, alias="champion")
    secret = f"auth-{name}"
    cluster.secret(secret, {})
    spec = rms_spec(model, mlflow_server.url)
    spec["registry"]["credentialsSecretRef"] = {"name": secret}
    cluster.create_rms(name, spec)
    cluster.created.append(name)
    until("KubeRay created the RayCluster", lambda: len(_shape(cluster, name)) == 1, timeout=90)
    before = _shape(cluster, name)
    cluster.custom.patch_namespaced_custom_object(
        "regserve.io",
        "v1alpha1",
        cluster.namespace,
        "registeredmodelservings",
        name,
        {"spec": {"serving": {"cpusPerReplica": 3}}},
    )
    # A positive wait: generous, it costs nothing when KubeRay is quick (a loaded machine slows it).
    until("RayClusters changed", lambda: _shape(cluster, name) != before, timeout=4 * KUBERAY_REACTION_S)
