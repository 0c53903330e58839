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
import yaml
from kopf.testing import KopfRunner
from kubernetes import client
from regserve_operator.builders import serving_version_of
from regserve_operator.sandbox.mlflow_server import MlflowServer

from tests.k8s import plane
from tests.k8s.operator_support import (
    GROUP,
    PLURAL,
    VERSION,
    Cluster,
    carried,
    cond,
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


def _apps(rayservice: dict[str, Any] | None) -> dict[str, dict[str, Any]]:
    text = ((rayservice or {}).get("spec") or {}).get("serveConfigV2") or ""
    return {app["name"]: app for app in (yaml.safe_load(text) or {}).get("applications") or []}


def _owners(rayservice: dict[str, Any] | None) -> list[str]:
    return [ref["name"] for ref in ((rayservice or {}).get("metadata") or {}).get("ownerReferences") or []]


def test_resources_naming_one_cluster_share_one_rayservice(
    cluster: Cluster, operator: KopfRunner, mlflow_server: MlflowServer
) -> None:
    """Members join one RayService (an application each, every member an owner, one RayCluster); a
    promotion changes only its member's application; a member with other cluster settings is refused
    with a condition; removing a member drops only its application; the last one takes it away."""
    suffix = uuid.uuid4().hex[:6]
    pool, first, second, odd = f"pool-{suffix}", f"sa-{suffix}", f"sb-{suffix}", f"sc-{suffix}"
    secret = f"auth-{suffix}"
    cluster.secret(secret, {})
    models = {}
    for name in (first, second, odd):
        models[name] = new_model()
        log_version(mlflow_server.url, models[name], {"prompt": "string"}, alias="champion")

    def member_spec(name: str, **serving: Any) -> dict[str, Any]:
        spec = rms_spec(models[name], mlflow_server.url, placement={"cluster": pool})
        spec["registry"]["credentialsSecretRef"] = {"name": secret}
        if serving:
            spec["serving"] = serving
        return spec

    cluster.create_rms(first, member_spec(first))
    cluster.created.append(first)
    until("the first member's application", lambda: list(_apps(cluster.rayservice(pool))) == [first])
    cluster.create_rms(second, member_spec(second))
    cluster.created.append(second)
    until(
        "both applications and both owners",
        lambda: (
            list(_apps(cluster.rayservice(pool))) == [first, second]
            and _owners(cluster.rayservice(pool)) == [first, second]
        ),
    )
    assert cluster.rayservice(first) is None and cluster.rayservice(second) is None  # none of their own
    until("KubeRay created one RayCluster", lambda: len(_shape(cluster, pool)) == 1, timeout=90)
    raycluster = [name for name, _, _ in _shape(cluster, pool)]
    workers = cluster.rayservice(pool)["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]  # type: ignore[index]
    assert (workers["minReplicas"], workers["maxReplicas"]) == (2, 2)  # one replica of each member

    before = _apps(cluster.rayservice(pool))[first]
    v2 = log_version(mlflow_server.url, models[second], {"prompt": "string"})
    mlflow.MlflowClient(mlflow_server.url).set_registered_model_alias(models[second], "champion", v2)
    until("the second member promoted", lambda: carried_by(cluster, pool, second) == v2)
    assert _apps(cluster.rayservice(pool))[first] == before
    assert [name for name, _, _ in _shape(cluster, pool)] == raycluster

    cluster.create_rms(odd, member_spec(odd, ingressMode="proxy"))
    cluster.created.append(odd)
    until(
        "the odd member refused", lambda: cond(cluster.rms(odd), "Ready").get("reason") == "ClusterConflict"
    )
    assert "serving.ingressMode" in cond(cluster.rms(odd), "Ready")["message"]
    assert list(_apps(cluster.rayservice(pool))) == [first, second]
    assert _owners(cluster.rayservice(pool)) == [first, second]

    for name in (first, odd):
        cluster.custom.delete_namespaced_custom_object(GROUP, VERSION, cluster.namespace, PLURAL, name)
        cluster.created.remove(name)
    until(
        "the first member's application and ownership dropped",
        lambda: (
            list(_apps(cluster.rayservice(pool))) == [second]
            and _owners(cluster.rayservice(pool)) == [second]
        ),
    )
    assert carried_by(cluster, pool, second) == v2
    cluster.custom.delete_namespaced_custom_object(GROUP, VERSION, cluster.namespace, PLURAL, second)
    cluster.created.remove(second)
    until(
        "the shared RayService garbage-collected with its last member",
        lambda: cluster.rayservice(pool) is None,
    )


def carried_by(cluster: Cluster, rayservice: str, app: str) -> str | None:
    rs = cluster.rayservice(rayservice)
    return serving_version_of(rs, app) if rs else None
