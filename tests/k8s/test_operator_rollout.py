"""The operator on the real API server, running as its ServiceAccount with the RBAC we ship.

RayServices live in a namespace KubeRay does not watch, so their status is ours to write: the tests
play KubeRay's part (RUNNING, DEPLOY_FAILED) and check what the operator does about it.
"""

from __future__ import annotations

import copy
import json
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from kopf.testing import KopfRunner
from kubernetes import client
from kubernetes.client.exceptions import ApiException
from regserve_operator import rbac
from regserve_operator.builders import DEPLOYMENT_NAME, serving_version_of

from tests.k8s import plane
from tests.operator.mlflow_fixture import log_version
from tests.support.mlflow_server import MlflowServer

pytestmark = pytest.mark.k8s

GROUP, VERSION, PLURAL = "regserve.io", "v1alpha1", "registeredmodelservings"
POLL_S = 2
DEADLINE = 60.0
SA = "regserve-operator"


# ----------------------------------------------------------------------------------------- fixtures


@pytest.fixture
def operator_kubeconfig(
    kube_api: client.ApiClient, kube_namespace: str, mint_kubeconfig: plane.MintKubeconfig
) -> Iterator[Path]:
    """A kubeconfig for the operator's ServiceAccount, bound to exactly the rendered ClusterRole."""
    rbac_api = client.RbacAuthorizationV1Api(kube_api)
    role = rbac.cluster_role()
    try:
        rbac_api.create_cluster_role(role)
    except ApiException as exc:
        if exc.status != 409:
            raise
        rbac_api.replace_cluster_role(role["metadata"]["name"], role)
    binding_name = f"{rbac.NAME}-{kube_namespace}"
    binding = next(d for d in rbac.manifests(kube_namespace) if d["kind"] == "ClusterRoleBinding")
    binding = copy.deepcopy(binding)
    binding["metadata"]["name"] = binding_name
    rbac_api.create_cluster_role_binding(binding)
    path = mint_kubeconfig(kube_namespace, SA)
    yield path
    rbac_api.delete_cluster_role_binding(binding_name)


@pytest.fixture
def operator(
    operator_kubeconfig: Path, kube_namespace: str, monkeypatch: pytest.MonkeyPatch
) -> Iterator[KopfRunner]:
    monkeypatch.setenv("KUBECONFIG", str(operator_kubeconfig))
    monkeypatch.setenv("REGSERVE_WEBHOOK_PORT", "0")
    monkeypatch.setenv("REGSERVE_METRICS_PORT", "0")
    monkeypatch.setenv("REGSERVE_SETTLE_SECONDS", "1")
    monkeypatch.setenv("REGSERVE_IMAGE", "regserve/test:1")
    args = ["run", "--standalone", "--namespace", kube_namespace, "-m", "regserve_operator.main"]
    with KopfRunner(args, timeout=60) as runner:
        yield runner
    assert runner.exception is None, runner.output[-3000:]
    assert "Forbidden" not in runner.output and "403" not in runner.output, runner.output[-3000:]


class Cluster:
    """The test's view of one namespace, as the admin (the user applying resources)."""

    def __init__(self, api: client.ApiClient, namespace: str) -> None:
        self.namespace = namespace
        self.custom = client.CustomObjectsApi(api)
        self.core = client.CoreV1Api(api)

    def create_rms(self, name: str, spec: dict[str, Any]) -> dict[str, Any]:
        body = {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": "RegisteredModelServing",
            "metadata": {"name": name},
            "spec": spec,
        }
        return dict(self.custom.create_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURAL, body))

    def rms(self, name: str) -> dict[str, Any]:
        return dict(self.custom.get_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURAL, name))

    def rayservice(self, name: str) -> dict[str, Any] | None:
        try:
            return dict(
                self.custom.get_namespaced_custom_object("ray.io", "v1", self.namespace, "rayservices", name)
            )
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise

    def set_app_status(self, name: str, app_status: str, message: str = "") -> None:
        status = {
            "conditions": [
                {
                    "type": "Ready",
                    "status": "True" if app_status == "RUNNING" else "False",
                    "reason": "Test",
                    "message": "",
                    "lastTransitionTime": "2026-01-01T00:00:00Z",
                }
            ],
            "activeServiceStatus": {
                "applicationStatuses": {name: {"status": app_status, "message": message}}
            },
        }
        self.custom.patch_namespaced_custom_object_status(
            "ray.io", "v1", self.namespace, "rayservices", name, {"status": status}
        )

    def events(self, name: str, reason: str) -> list[Any]:
        items = self.core.list_namespaced_event(
            self.namespace, field_selector=f"involvedObject.name={name}"
        ).items
        return [e for e in items if e.reason == reason]

    def secret(self, name: str, data: dict[str, str]) -> None:
        self.core.create_namespaced_secret(
            self.namespace, client.V1Secret(metadata=client.V1ObjectMeta(name=name), string_data=data)
        )


@pytest.fixture
def cluster(kube_api: client.ApiClient, kube_namespace: str) -> Cluster:
    return Cluster(kube_api, kube_namespace)


def _until(what: str, check: Callable[[], bool], timeout: float = DEADLINE) -> None:
    plane.wait_for(what, check, timeout=timeout, interval=0.25)


def _steady(what: str, value: Callable[[], Any], seconds: float) -> Any:
    """Observe `value` over `seconds` (an observation window, not synchronisation): it must not change."""
    first = value()
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert value() == first, f"{what} changed"
        time.sleep(0.25)
    return first


def _cond(obj: dict[str, Any], type_: str) -> dict[str, Any]:
    return next((c for c in (obj.get("status") or {}).get("conditions") or [] if c["type"] == type_), {})


def _spec(model: str, mlflow_url: str, **extra: Any) -> dict[str, Any]:
    return {
        "model": {"name": model, "alias": "champion"},
        "registry": {
            "trackingUri": mlflow_url,
            "credentialsSecretRef": {"name": "mlflow-auth"},
            "pollIntervalSeconds": POLL_S,
        },
        **extra,
    }


def _model() -> str:
    return f"k8s_{uuid.uuid4().hex[:8]}"


def _carried(cluster: Cluster, name: str) -> str | None:
    rs = cluster.rayservice(name)
    return serving_version_of(rs) if rs else None


def _serving_up(cluster: Cluster, mlflow_server: MlflowServer, name: str, **extra: Any) -> tuple[str, str]:
    """Register v1 under `champion`, apply the resource, play KubeRay: RUNNING. Returns (model, v1)."""
    model = _model()
    v1 = log_version(mlflow_server.url, model, {"prompt": "string"}, alias="champion")
    cluster.secret("mlflow-auth", {"MLFLOW_TRACKING_TOKEN": "token-that-must-not-leak"})
    cluster.create_rms(name, _spec(model, mlflow_server.url, **extra))
    _until("RayService created", lambda: cluster.rayservice(name) is not None)
    cluster.set_app_status(name, "RUNNING")
    _until(
        "first version confirmed",
        lambda: (cluster.rms(name).get("status") or {}).get("lastGoodVersion") == v1,
    )
    return model, v1


# ---------------------------------------------------------------------------------------------- tests


def test_apply_creates_rayservice(
    cluster: Cluster, operator: KopfRunner, mlflow_server: MlflowServer
) -> None:
    model = _model()
    v1 = log_version(mlflow_server.url, model, {"prompt": "string"}, alias="champion")
    cluster.secret("mlflow-auth", {"MLFLOW_TRACKING_TOKEN": "token-that-must-not-leak"})
    rms = cluster.create_rms("translator", _spec(model, mlflow_server.url))
    _until("RayService created", lambda: cluster.rayservice("translator") is not None)
    rs = cluster.rayservice("translator")
    assert rs is not None
    (ref,) = rs["metadata"]["ownerReferences"]
    assert (ref["kind"], ref["name"], ref["uid"], ref["controller"]) == (
        "RegisteredModelServing",
        "translator",
        rms["metadata"]["uid"],
        True,
    )
    config = yaml.safe_load(rs["spec"]["serveConfigV2"])
    (app,) = config["applications"]
    assert app["import_path"] == "serving_app.app:build_app" and app["route_prefix"] == "/translator"
    assert app["args"]["model_name"] == model and "default_version" not in app["args"]
    (dep,) = app["deployments"]
    assert dep["name"] == DEPLOYMENT_NAME and dep["user_config"] == {"default_version": v1}
    worker = rs["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]
    assert worker["envFrom"] == [{"secretRef": {"name": "mlflow-auth"}}]
    assert worker["image"] == "regserve/test:1"
    assert "token-that-must-not-leak" not in json.dumps(rs)

    _until(
        "status written", lambda: (cluster.rms("translator").get("status") or {}).get("servingVersion") == v1
    )
    status = cluster.rms("translator")["status"]
    assert status["resolvedVersion"] == v1 and status["rayServiceName"] == "translator"
    assert status["selector"] == "@champion"
    assert status["url"].endswith("/translator")
    assert _cond(cluster.rms("translator"), "RolloutInProgress")["status"] == "True"
    assert "token-that-must-not-leak" not in json.dumps(cluster.rms("translator"))
    assert len(cluster.events("translator", "Created")) == 1


def test_alias_move_patches_serve_config_only(
    cluster: Cluster, operator: KopfRunner, mlflow_server: MlflowServer
) -> None:
    model, _v1 = _serving_up(cluster, mlflow_server, "promo")
    before = cluster.rayservice("promo")
    assert before is not None
    v2 = log_version(mlflow_server.url, model, {"prompt": "string"})
    import mlflow

    mlflow.MlflowClient(mlflow_server.url).set_registered_model_alias(model, "champion", v2)
    _until("serveConfigV2 patched to v2", lambda: _carried(cluster, "promo") == v2)
    after = cluster.rayservice("promo")
    assert after is not None
    assert after["spec"]["rayClusterConfig"] == before["spec"]["rayClusterConfig"]
    assert after["metadata"]["annotations"] == before["metadata"]["annotations"]
    cluster.set_app_status("promo", "RUNNING")
    _until("v2 confirmed", lambda: (cluster.rms("promo").get("status") or {}).get("lastGoodVersion") == v2)
    assert _cond(cluster.rms("promo"), "Ready")["status"] == "True"
    assert len(cluster.events("promo", "RolloutSucceeded")) == 2


def test_incompatible_version_is_held(
    cluster: Cluster, operator: KopfRunner, mlflow_server: MlflowServer
) -> None:
    model, v1 = _serving_up(cluster, mlflow_server, "held")
    v2 = log_version(mlflow_server.url, model, {"text": "string"})  # `prompt` gone: incompatible
    import mlflow

    mlflow.MlflowClient(mlflow_server.url).set_registered_model_alias(model, "champion", v2)
    _until("held", lambda: _cond(cluster.rms("held"), "SignatureCompatible").get("status") == "False")
    message = _cond(cluster.rms("held"), "SignatureCompatible")["message"]
    assert "inputs.prompt" in message
    rs = cluster.rayservice("held")
    assert rs is not None
    rv = _steady(
        "RayService resourceVersion",
        lambda: (cluster.rayservice("held") or {})["metadata"]["resourceVersion"],
        2 * POLL_S + 1,
    )
    assert rv == rs["metadata"]["resourceVersion"]
    assert _carried(cluster, "held") == v1
    status = cluster.rms("held")["status"]
    assert status["rejected"]["version"] == v2 and status["rejected"]["reason"] == "Incompatible"
    assert len(cluster.events("held", "SignatureIncompatible")) == 1


def test_failed_rollout_rolls_back(
    cluster: Cluster, operator: KopfRunner, mlflow_server: MlflowServer
) -> None:
    model, v1 = _serving_up(cluster, mlflow_server, "rollback")
    v2 = log_version(mlflow_server.url, model, {"prompt": "string"})
    import mlflow

    mlflow.MlflowClient(mlflow_server.url).set_registered_model_alias(model, "champion", v2)
    _until("v2 rolled out", lambda: _carried(cluster, "rollback") == v2)
    cluster.set_app_status("rollback", "DEPLOY_FAILED", "ModelServer: failed to load version")
    _until("restored v1", lambda: _carried(cluster, "rollback") == v1)
    status = cluster.rms("rollback")["status"]
    assert (
        status["rejected"] == {**status["rejected"], "version": v2, "reason": "RolledBack"}
        and "failed to load" in status["rejected"]["message"]
    )
    cluster.set_app_status("rollback", "RUNNING")
    rs = cluster.rayservice("rollback")
    assert rs is not None
    _steady("restored version", lambda: _carried(cluster, "rollback"), 2 * POLL_S + 1)
    assert len(cluster.events("rollback", "RolledBack")) == 1


def test_delete_collects_rayservice(
    cluster: Cluster, operator: KopfRunner, mlflow_server: MlflowServer
) -> None:
    model = _model()
    log_version(mlflow_server.url, model, {"prompt": "string"}, alias="champion")
    cluster.secret("mlflow-auth", {})
    cluster.create_rms("gone", _spec(model, mlflow_server.url))
    _until("RayService created", lambda: cluster.rayservice("gone") is not None)
    cluster.custom.delete_namespaced_custom_object(GROUP, VERSION, cluster.namespace, PLURAL, "gone")
    _until("RayService garbage-collected", lambda: cluster.rayservice("gone") is None)


@pytest.mark.parametrize(
    ("case", "spec", "message"),
    [
        (
            "two selectors",
            {"model": {"name": "m", "alias": "a", "version": "2"}},
            "exactly one of model.alias",
        ),
        ("no selector", {"model": {"name": "m"}}, "exactly one of model.alias"),
        ("ingress mode", {"serving": {"ingressMode": "envoy"}}, 'supported values: "proxy", "haproxy"'),
        ("replicas", {"serving": {"replicas": 0}}, "spec.serving.replicas"),
        ("tracking uri", {"registry": {"trackingUri": "file:///x"}}, "spec.registry.trackingUri"),
        ("version format", {"model": {"name": "m", "version": "latest"}}, "spec.model.version"),
    ],
)
def test_invalid_resources_are_refused(
    cluster: Cluster, case: str, spec: dict[str, Any], message: str
) -> None:
    body = {"model": {"name": "m", "alias": "a"}, "registry": {"trackingUri": "http://mlflow:5000"}}
    for key, value in spec.items():
        body[key] = {**body.get(key, {}), **value} if key != "model" else value
    with pytest.raises(ApiException) as caught:
        cluster.create_rms(f"bad-{uuid.uuid4().hex[:6]}", body)
    assert caught.value.status == 422
    assert message in json.loads(caught.value.body)["message"], caught.value.body


def test_printer_columns(cluster: Cluster, kube_api: client.ApiClient) -> None:
    cluster.create_rms(
        "cols", {"model": {"name": "m", "alias": "a"}, "registry": {"trackingUri": "http://mlflow:5000"}}
    )
    method, url, headers, _body, _post = kube_api.param_serialize(
        "GET",
        f"/apis/{GROUP}/{VERSION}/namespaces/{cluster.namespace}/{PLURAL}",
        header_params={"Accept": "application/json;as=Table;v=v1;g=meta.k8s.io"},
        auth_settings=["BearerToken"],
    )
    response = kube_api.call_api(method, url, header_params=headers)
    response.read()
    table = json.loads(response.data)
    names = [c["name"] for c in table["columnDefinitions"]]
    assert names == ["Name", "Model", "Selector", "Serving", "Ready", "Age"]


def test_missing_alias_creates_nothing(
    cluster: Cluster, operator: KopfRunner, mlflow_server: MlflowServer
) -> None:
    model = _model()
    log_version(mlflow_server.url, model, {"prompt": "string"})  # no alias
    cluster.secret("mlflow-auth", {})
    cluster.create_rms("orphan", _spec(model, mlflow_server.url))
    _until("unresolved", lambda: _cond(cluster.rms("orphan"), "SelectorResolved").get("status") == "False")
    assert "no alias 'champion'" in _cond(cluster.rms("orphan"), "SelectorResolved")["message"]
    _steady("RayService absence", lambda: cluster.rayservice("orphan"), 2 * POLL_S + 1)
    assert len(cluster.events("orphan", "SelectorUnresolved")) == 1
