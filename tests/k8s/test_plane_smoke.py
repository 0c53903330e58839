"""Smoke tests proving the test control plane is real: CEL, RBAC, garbage collection, KubeRay, scheduling.

Each test checks both sides (the allowed and the refused, the present and the gone), so a fake or
half-started plane cannot pass it.
"""

from __future__ import annotations

import uuid
from typing import Any

import pytest
import yaml
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from tests.k8s import plane

pytestmark = pytest.mark.k8s

DEADLINE = 60.0


def _config_map(name: str, owner: client.V1OwnerReference | None = None) -> client.V1ConfigMap:
    references = [owner] if owner else None
    return client.V1ConfigMap(metadata=client.V1ObjectMeta(name=name, owner_references=references))


def _status_of(call: Any, *args: Any, **kwargs: Any) -> int:
    """HTTP status of an API call: 200 on success, else the ApiException's status."""
    try:
        call(*args, **kwargs)
    except ApiException as exc:
        return int(exc.status)
    return 200


# --------------------------------------------------------------------------------------------------
# CEL validation


def _cel_crd() -> dict[str, Any]:
    schema = {
        "type": "object",
        "properties": {
            "spec": {
                "type": "object",
                "properties": {"min": {"type": "integer"}, "max": {"type": "integer"}},
                "x-kubernetes-validations": [{"rule": "self.min <= self.max", "message": "min exceeds max"}],
            }
        },
    }
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": "ranges.smoke.regserve.io"},
        "spec": {
            "group": "smoke.regserve.io",
            "scope": "Namespaced",
            "names": {"plural": "ranges", "singular": "range", "kind": "Range"},
            "versions": [
                {"name": "v1", "served": True, "storage": True, "schema": {"openAPIV3Schema": schema}}
            ],
        },
    }


def test_cel_violating_custom_resource_is_refused(kube_api: client.ApiClient, kube_namespace: str) -> None:
    crd = _cel_crd()
    plane.create_crds(kube_api, [crd])
    name = crd["metadata"]["name"]
    plane.wait_for(f"CRD {name} Established", lambda: plane.crd_established(kube_api, name), DEADLINE)
    objects = client.CustomObjectsApi(kube_api)

    def create(obj_name: str, low: int, high: int) -> None:
        body = {
            "apiVersion": "smoke.regserve.io/v1",
            "kind": "Range",
            "metadata": {"name": obj_name},
            "spec": {"min": low, "max": high},
        }
        objects.create_namespaced_custom_object("smoke.regserve.io", "v1", kube_namespace, "ranges", body)

    create("valid", 1, 2)
    with pytest.raises(ApiException) as refused:
        create("invalid", 3, 2)
    assert refused.value.status == 422
    assert "min exceeds max" in str(refused.value.body)


# --------------------------------------------------------------------------------------------------
# RBAC


def test_service_account_without_verb_gets_403(
    kube_api: client.ApiClient, kube_namespace: str, mint_kubeconfig: plane.MintKubeconfig
) -> None:
    rbac = client.RbacAuthorizationV1Api(kube_api)
    core = client.CoreV1Api(kube_api)
    core.create_namespaced_config_map(kube_namespace, _config_map("visible"))
    rule = client.V1PolicyRule(api_groups=[""], resources=["configmaps"], verbs=["get"])
    rbac.create_namespaced_role(
        kube_namespace, client.V1Role(metadata=client.V1ObjectMeta(name="get-configmaps"), rules=[rule])
    )
    binding = client.V1RoleBinding(
        metadata=client.V1ObjectMeta(name="reader"),
        role_ref=client.V1RoleRef(api_group="rbac.authorization.k8s.io", kind="Role", name="get-configmaps"),
        subjects=[client.RbacV1Subject(kind="ServiceAccount", name="reader", namespace=kube_namespace)],
    )
    rbac.create_namespaced_role_binding(kube_namespace, binding)
    kubeconfig = mint_kubeconfig(kube_namespace, "reader")

    with plane.api_client_from_kubeconfig(kubeconfig) as sa_api:
        as_reader = client.CoreV1Api(sa_api)
        assert _status_of(as_reader.read_namespaced_config_map, "visible", kube_namespace) == 200
        assert _status_of(as_reader.list_namespaced_config_map, kube_namespace) == 403
        assert _status_of(as_reader.delete_namespaced_config_map, "visible", kube_namespace) == 403
        assert _status_of(as_reader.read_namespaced_secret, "anything", kube_namespace) == 403


# --------------------------------------------------------------------------------------------------
# Garbage collection (kube-controller-manager)


def test_owned_object_is_garbage_collected(kube_api: client.ApiClient, kube_namespace: str) -> None:
    core = client.CoreV1Api(kube_api)
    owner = core.create_namespaced_config_map(kube_namespace, _config_map("owner"))
    assert owner.metadata is not None and owner.metadata.uid
    reference = client.V1OwnerReference(
        api_version="v1", kind="ConfigMap", name="owner", uid=owner.metadata.uid
    )
    core.create_namespaced_config_map(kube_namespace, _config_map("owned", owner=reference))
    core.create_namespaced_config_map(kube_namespace, _config_map("bystander"))
    assert _status_of(core.read_namespaced_config_map, "owned", kube_namespace) == 200

    core.delete_namespaced_config_map("owner", kube_namespace)

    def gone() -> bool:
        return _status_of(core.read_namespaced_config_map, "owned", kube_namespace) == 404

    plane.wait_for("owned ConfigMap garbage-collected", gone, DEADLINE)
    assert _status_of(core.read_namespaced_config_map, "bystander", kube_namespace) == 200


# --------------------------------------------------------------------------------------------------
# KubeRay + scheduler + KWOK

SERVE_CONFIG = {
    "applications": [
        {
            "name": "smoke",
            "route_prefix": "/smoke",
            "import_path": "serving_app.app:build_app",
            "args": {"model_name": "smoke"},
            "deployments": [{"name": "Ingress", "num_replicas": 1}],
        }
    ]
}


def _container(name: str, resources: dict[str, Any]) -> dict[str, Any]:
    return {"name": name, "image": "rayproject/ray:2.60.0", "resources": resources}


def _rayservice(name: str) -> dict[str, Any]:
    head_resources = {"requests": {"cpu": "1", "memory": "2Gi"}, "limits": {"cpu": "2", "memory": "2Gi"}}
    gpu_resources = {
        "requests": {"cpu": "2", "memory": "8Gi"},
        "limits": {"cpu": "4", "memory": "8Gi", plane.GPU_RESOURCE: "1"},
    }
    cpu_resources = {"requests": {"cpu": "1", "memory": "1Gi"}, "limits": {"cpu": "1", "memory": "1Gi"}}
    gpu_toleration = {
        "key": plane.GPU_TAINT["key"],
        "operator": "Equal",
        "value": plane.GPU_TAINT["value"],
        "effect": plane.GPU_TAINT["effect"],
    }
    return {
        "apiVersion": "ray.io/v1",
        "kind": "RayService",
        "metadata": {"name": name},
        "spec": {
            "serveConfigV2": yaml.safe_dump(SERVE_CONFIG),
            "rayClusterConfig": {
                "rayVersion": "2.60.0",
                "headGroupSpec": {
                    "rayStartParams": {"dashboard-host": "0.0.0.0"},
                    "template": {"spec": {"containers": [_container("ray-head", head_resources)]}},
                },
                "workerGroupSpecs": [
                    {
                        "groupName": "gpu",
                        "replicas": 1,
                        "minReplicas": 1,
                        "maxReplicas": 1,
                        "rayStartParams": {},
                        "template": {
                            "spec": {
                                "containers": [_container("ray-worker", gpu_resources)],
                                "nodeSelector": {plane.GPU_PRODUCT_LABEL: plane.GPU_PRODUCT},
                                "tolerations": [gpu_toleration],
                            }
                        },
                    },
                    {
                        "groupName": "cpu",
                        "replicas": 1,
                        "minReplicas": 1,
                        "maxReplicas": 1,
                        "rayStartParams": {},
                        "template": {"spec": {"containers": [_container("ray-worker", cpu_resources)]}},
                    },
                ],
            },
        },
    }


def test_rayservice_schema_is_kuberays(kube_api: client.ApiClient, kuberay_namespace: str) -> None:
    """The sample is accepted (the other test creates it); these violations of KubeRay's schema are not.

    (``upgradeStrategy.type`` is a free string in the CRD: KubeRay checks it while reconciling.)
    """
    objects = client.CustomObjectsApi(kube_api)
    bad = _rayservice(f"bad-{uuid.uuid4().hex[:6]}")
    del bad["spec"]["rayClusterConfig"]  # required
    bad["spec"]["serviceUnhealthySecondThreshold"] = "soon"  # int32
    with pytest.raises(ApiException) as refused:
        objects.create_namespaced_custom_object("ray.io", "v1", kuberay_namespace, "rayservices", bad)
    assert refused.value.status == 422
    assert "spec.rayClusterConfig" in str(refused.value.body)
    assert "spec.serviceUnhealthySecondThreshold" in str(refused.value.body)


def _owned_rayclusters(
    objects: client.CustomObjectsApi, namespace: str, owner_uid: str
) -> list[dict[str, Any]]:
    listing: Any = objects.list_namespaced_custom_object("ray.io", "v1", namespace, "rayclusters")
    return [
        c
        for c in listing["items"]
        if any(ref["uid"] == owner_uid for ref in c["metadata"].get("ownerReferences", []))
    ]


def _running_pods(api: client.ApiClient, namespace: str, cluster: str) -> dict[str, dict[str, Any]]:
    """Bound, Running pods of a RayCluster as plain dicts, keyed by ``head`` or worker group name."""
    listing = client.CoreV1Api(api).list_namespaced_pod(namespace, label_selector=f"ray.io/cluster={cluster}")
    running = {}
    for pod in (api.sanitize_for_serialization(p) for p in listing.items):
        if pod["spec"].get("nodeName") and pod["status"].get("phase") == "Running":
            labels = pod["metadata"]["labels"]
            key = "head" if labels.get("ray.io/node-type") == "head" else labels.get("ray.io/group", "?")
            running[key] = pod
    return running


def _container_named(pod: dict[str, Any], name: str) -> dict[str, Any]:
    return next(c for c in pod["spec"]["containers"] if c["name"] == name)


def test_kuberay_creates_raycluster_and_pods_land_on_right_nodes(
    kube_api: client.ApiClient, kuberay_namespace: str
) -> None:
    objects = client.CustomObjectsApi(kube_api)
    name = f"smoke-{uuid.uuid4().hex[:6]}"
    created: Any = objects.create_namespaced_custom_object(
        "ray.io", "v1", kuberay_namespace, "rayservices", _rayservice(name)
    )
    uid = created["metadata"]["uid"]

    clusters: list[dict[str, Any]] = []

    def cluster_created() -> bool:
        clusters[:] = _owned_rayclusters(objects, kuberay_namespace, uid)
        return bool(clusters)

    plane.wait_for(f"KubeRay to create the RayCluster of {name}", cluster_created, DEADLINE)
    cluster = clusters[0]["metadata"]["name"]

    pods: dict[str, dict[str, Any]] = {}

    def all_running() -> bool:
        pods.update(_running_pods(kube_api, kuberay_namespace, cluster))
        return {"head", "gpu", "cpu"} <= pods.keys()

    plane.wait_for(f"head, gpu and cpu pods of {cluster} bound and Running", all_running, DEADLINE)
    head, gpu, cpu = pods["head"], pods["gpu"], pods["cpu"]

    assert head["spec"]["nodeName"] == plane.CPU_NODE  # no toleration: the GPU node's taint keeps it off
    assert gpu["spec"]["nodeName"] == plane.GPU_NODE
    assert cpu["spec"]["nodeName"] == plane.CPU_NODE

    gpu_resources = _container_named(gpu, "ray-worker")["resources"]
    assert gpu_resources["limits"] == {"cpu": "4", "memory": "8Gi", plane.GPU_RESOURCE: "1"}
    # Requests of an extended resource default to its limit.
    assert gpu_resources["requests"] == {"cpu": "2", "memory": "8Gi", plane.GPU_RESOURCE: "1"}
    assert gpu["spec"]["nodeSelector"] == {plane.GPU_PRODUCT_LABEL: plane.GPU_PRODUCT}
    assert {**plane.GPU_TAINT, "operator": "Equal"} in gpu["spec"]["tolerations"]

    cpu_resources = _container_named(cpu, "ray-worker")["resources"]
    assert cpu_resources == {
        "requests": {"cpu": "1", "memory": "1Gi"},
        "limits": {"cpu": "1", "memory": "1Gi"},
    }
    assert not cpu["spec"].get("nodeSelector")
    assert not any(t.get("key") == plane.GPU_TAINT["key"] for t in cpu["spec"].get("tolerations", []))

    head_resources = _container_named(head, "ray-head")["resources"]
    assert head_resources == {
        "requests": {"cpu": "1", "memory": "2Gi"},
        "limits": {"cpu": "2", "memory": "2Gi"},
    }
