"""The operator on the real API server, running as its ServiceAccount with the RBAC we ship.

RayServices live in a namespace KubeRay does not watch, so their status is ours to write: the tests
play KubeRay's part (RUNNING, DEPLOY_FAILED) and check what the operator does about it.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import yaml
from kopf.testing import KopfRunner
from kubernetes import client
from kubernetes.client.exceptions import ApiException
from regserve_operator.builders import DEPLOYMENT_NAME
from regserve_operator.sandbox.mlflow_server import MlflowServer

from tests.k8s import plane
from tests.k8s.operator_support import (
    GROUP,
    PLURAL,
    POLL_S,
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


# ----------------------------------------------------------------------------------------- fixtures


@pytest.fixture
def operator(
    kube_api: client.ApiClient,
    kube_namespace: str,
    mint_kubeconfig: plane.MintKubeconfig,
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[KopfRunner]:
    with (
        operator_account(kube_api, kube_namespace, mint_kubeconfig) as kubeconfig,
        running_operator(kubeconfig, kube_namespace, monkeypatch) as runner,
    ):
        yield runner


@pytest.fixture
def cluster(kube_api: client.ApiClient, kube_namespace: str) -> Cluster:
    return Cluster(kube_api, kube_namespace)


def _serving_up(cluster: Cluster, mlflow_server: MlflowServer, name: str, **extra: Any) -> tuple[str, str]:
    """Register v1 under `champion`, apply the resource, play KubeRay: RUNNING. Returns (model, v1)."""
    model = new_model()
    v1 = log_version(mlflow_server.url, model, {"prompt": "string"}, alias="champion")
    cluster.secret("mlflow-auth", {"MLFLOW_TRACKING_TOKEN": "token-that-must-not-leak"})
    cluster.create_rms(name, rms_spec(model, mlflow_server.url, **extra))
    until("RayService created", lambda: cluster.rayservice(name) is not None)
    cluster.set_app_status(name, "RUNNING")
    until(
        "first version confirmed",
        lambda: (cluster.rms(name).get("status") or {}).get("lastGoodVersion") == v1,
    )
    return model, v1


# ---------------------------------------------------------------------------------------------- tests


def test_apply_creates_rayservice(
    cluster: Cluster, operator: KopfRunner, mlflow_server: MlflowServer
) -> None:
    model = new_model()
    v1 = log_version(mlflow_server.url, model, {"prompt": "string"}, alias="champion")
    cluster.secret("mlflow-auth", {"MLFLOW_TRACKING_TOKEN": "token-that-must-not-leak"})
    rms = cluster.create_rms("translator", rms_spec(model, mlflow_server.url))
    until("RayService created", lambda: cluster.rayservice("translator") is not None)
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

    until(
        "status written", lambda: (cluster.rms("translator").get("status") or {}).get("servingVersion") == v1
    )
    status = cluster.rms("translator")["status"]
    assert status["resolvedVersion"] == v1 and status["rayServiceName"] == "translator"
    assert status["selector"] == "@champion"
    assert status["url"].endswith("/translator")
    assert cond(cluster.rms("translator"), "RolloutInProgress")["status"] == "True"
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
    until("serveConfigV2 patched to v2", lambda: carried(cluster, "promo") == v2)
    after = cluster.rayservice("promo")
    assert after is not None
    assert after["spec"]["rayClusterConfig"] == before["spec"]["rayClusterConfig"]
    assert after["metadata"]["annotations"] == before["metadata"]["annotations"]
    cluster.set_app_status("promo", "RUNNING")
    until("v2 confirmed", lambda: (cluster.rms("promo").get("status") or {}).get("lastGoodVersion") == v2)
    assert cond(cluster.rms("promo"), "Ready")["status"] == "True"
    assert len(cluster.events("promo", "RolloutSucceeded")) == 2


def test_incompatible_version_is_held(
    cluster: Cluster, operator: KopfRunner, mlflow_server: MlflowServer
) -> None:
    model, v1 = _serving_up(cluster, mlflow_server, "held")
    v2 = log_version(mlflow_server.url, model, {"text": "string"})  # `prompt` gone: incompatible
    import mlflow

    mlflow.MlflowClient(mlflow_server.url).set_registered_model_alias(model, "champion", v2)
    until("held", lambda: cond(cluster.rms("held"), "SignatureCompatible").get("status") == "False")
    message = cond(cluster.rms("held"), "SignatureCompatible")["message"]
    assert "inputs.prompt" in message
    rs = cluster.rayservice("held")
    assert rs is not None
    rv = steady(
        "RayService resourceVersion",
        lambda: (cluster.rayservice("held") or {})["metadata"]["resourceVersion"],
        2 * POLL_S + 1,
    )
    assert rv == rs["metadata"]["resourceVersion"]
    assert carried(cluster, "held") == v1
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
    until("v2 rolled out", lambda: carried(cluster, "rollback") == v2)
    cluster.set_app_status("rollback", "DEPLOY_FAILED", "ModelServer: failed to load version")
    until("restored v1", lambda: carried(cluster, "rollback") == v1)
    # The status write follows the RayService patch: wait for it rather than race it.
    until("rollback recorded", lambda: bool((cluster.rms("rollback").get("status") or {}).get("rejected")))
    status = cluster.rms("rollback")["status"]
    assert (
        status["rejected"] == {**status["rejected"], "version": v2, "reason": "RolledBack"}
        and "failed to load" in status["rejected"]["message"]
    )
    cluster.set_app_status("rollback", "RUNNING")
    rs = cluster.rayservice("rollback")
    assert rs is not None
    steady("restored version", lambda: carried(cluster, "rollback"), 2 * POLL_S + 1)
    assert len(cluster.events("rollback", "RolledBack")) == 1


def test_delete_collects_rayservice(
    cluster: Cluster, operator: KopfRunner, mlflow_server: MlflowServer
) -> None:
    model = new_model()
    log_version(mlflow_server.url, model, {"prompt": "string"}, alias="champion")
    cluster.secret("mlflow-auth", {})
    cluster.create_rms("gone", rms_spec(model, mlflow_server.url))
    until("RayService created", lambda: cluster.rayservice("gone") is not None)
    cluster.custom.delete_namespaced_custom_object(GROUP, VERSION, cluster.namespace, PLURAL, "gone")
    until("RayService garbage-collected", lambda: cluster.rayservice("gone") is None)


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
    columns = {c["name"]: c.get("priority", 0) for c in table["columnDefinitions"]}
    assert list(columns) == ["Name", "Model", "Selector", "Serving", "Ready", "Rollout", "Weight", "Age"]
    assert columns["Weight"] == 1, "the weight is shown with -o wide only"


def test_missing_alias_creates_nothing(
    cluster: Cluster, operator: KopfRunner, mlflow_server: MlflowServer
) -> None:
    model = new_model()
    log_version(mlflow_server.url, model, {"prompt": "string"})  # no alias
    cluster.secret("mlflow-auth", {})
    cluster.create_rms("orphan", rms_spec(model, mlflow_server.url))
    until("unresolved", lambda: cond(cluster.rms("orphan"), "SelectorResolved").get("status") == "False")
    assert "no alias 'champion'" in cond(cluster.rms("orphan"), "SelectorResolved")["message"]
    steady("RayService absence", lambda: cluster.rayservice("orphan"), 2 * POLL_S + 1)
    assert len(cluster.events("orphan", "SelectorUnresolved")) == 1


def test_mlflow_webhook_triggers_the_rollout(
    kube_api: client.ApiClient,
    kube_namespace: str,
    mint_kubeconfig: plane.MintKubeconfig,
    monkeypatch: pytest.MonkeyPatch,
    mlflow_server: MlflowServer,
) -> None:
    """With an hour-long poll interval, only the webhook can make the operator see the alias move
    within the deadline: `regserve webhook register` creates it, MLflow delivers, the operator verifies
    the signature and rolls out."""
    from regserve_operator import cli

    from tests.operator.mlflow_fixture import free_port

    port = free_port()
    monkeypatch.setenv("REGSERVE_WEBHOOK_PORT", str(port))
    monkeypatch.setenv("REGSERVE_WEBHOOK_HOST", "127.0.0.1")
    monkeypatch.setenv("REGSERVE_WEBHOOK_SECRET", f"whsec-{uuid.uuid4().hex}")
    view = Cluster(kube_api, kube_namespace)
    model = new_model()
    v1 = log_version(mlflow_server.url, model, {"prompt": "string"}, alias="champion")
    v2 = log_version(mlflow_server.url, model, {"prompt": "string"})
    view.secret("mlflow-auth", {})
    spec = rms_spec(model, mlflow_server.url)
    spec["registry"]["pollIntervalSeconds"] = 3600
    with (
        operator_account(kube_api, kube_namespace, mint_kubeconfig) as kubeconfig,
        running_operator(kubeconfig, kube_namespace, monkeypatch, webhook=True),
    ):
        view.create_rms("hooked", spec)
        until("RayService created", lambda: carried(view, "hooked") == v1)
        view.set_app_status("hooked", "RUNNING")
        until("v1 confirmed", lambda: (view.rms("hooked").get("status") or {}).get("lastGoodVersion") == v1)
        url = f"http://127.0.0.1:{port}/webhook"
        until("webhook receiver up", lambda: _answers(url.replace("/webhook", "/healthz")))
        args = ["webhook", "register", "--tracking-uri", mlflow_server.url, "--url", url]
        assert cli.main([*args, "--name", f"regserve-{kube_namespace}"]) == 0
        import mlflow

        mlflow.MlflowClient(mlflow_server.url).set_registered_model_alias(model, "champion", v2)
        until("webhook-triggered rollout", lambda: carried(view, "hooked") == v2, timeout=30)


def _answers(url: str) -> bool:
    import httpx

    try:
        return httpx.get(url, timeout=1).status_code == 200
    except httpx.HTTPError:
        return False
