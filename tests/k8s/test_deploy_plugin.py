"""`mlflow deployments -t regserve` against the real API server: the resource the plugin writes (through
the CRD's own validation), idempotent delete, and the refusals a user gets as MlflowException. No operator
runs here (`wait=false`); following a rollout to its verdict with real Ray is in test_kuberay_e2e.py."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mlflow
import pytest
from kubernetes import client
from mlflow.deployments import get_deploy_client
from mlflow.exceptions import MlflowException

from tests.k8s import plane
from tests.k8s.operator_support import GROUP, PLURAL, VERSION

pytestmark = pytest.mark.k8s

TRACKING = "http://mlflow.mlflow.svc:5000"
MLFLOW_CLI = [sys.executable, "-m", "mlflow"]


@pytest.fixture
def as_admin(admin_kubeconfig: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("KUBECONFIG", str(admin_kubeconfig))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return admin_kubeconfig


@pytest.fixture
def custom(kube_api: client.ApiClient) -> client.CustomObjectsApi:
    return client.CustomObjectsApi(kube_api)


def _stored(custom: client.CustomObjectsApi, namespace: str, name: str) -> dict[str, Any] | None:
    try:
        return dict(custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name))
    except client.ApiException as error:
        if error.status == 404:
            return None
        raise


def test_create_update_get_list_delete_write_the_resource(
    as_admin: Path, kube_namespace: str, custom: client.CustomObjectsApi
) -> None:
    deployments = get_deploy_client(f"regserve:/{kube_namespace}")
    created = deployments.create_deployment(
        "t",
        "models:/translator@champion",
        config={
            "trackingUri": TRACKING,
            "strategy": "Canary",
            "canary.steps": "10,50",
            "maxModelsPerReplica": "3",
            "wait": "false",
        },
    )
    assert (created["name"], created["namespace"]) == ("t", kube_namespace)
    assert created["model_uri"] == "models:/translator@champion"
    stored = _stored(custom, kube_namespace, "t")
    assert stored is not None
    spec = stored["spec"]
    assert spec["model"] == {"name": "translator", "alias": "champion"}
    assert spec["registry"]["trackingUri"] == TRACKING
    assert spec["rollout"]["strategy"] == "Canary" and spec["rollout"]["canary"]["steps"] == [10, 50]
    assert spec["serving"]["maxModelsPerReplica"] == 3

    updated = deployments.update_deployment(
        "t", model_uri="models:/translator/7", config={"stepSeconds": "5", "wait": "false"}
    )
    assert updated["model_uri"] == "models:/translator/7"
    stored = _stored(custom, kube_namespace, "t")
    assert stored is not None and stored["metadata"]["generation"] == 2
    assert stored["spec"]["model"] == {"name": "translator", "version": "7"}
    # What the update did not name stays as it was.
    canary = stored["spec"]["rollout"]["canary"]
    assert (canary["steps"], canary["stepSeconds"]) == ([10, 50], 5)

    assert deployments.get_deployment("t")["model_uri"] == "models:/translator/7"
    assert [d["name"] for d in deployments.list_deployments()] == ["t"]

    deployments.delete_deployment("t")
    assert _stored(custom, kube_namespace, "t") is None
    deployments.delete_deployment("t")  # idempotent
    with pytest.raises(MlflowException, match="no deployment t") as missing:
        deployments.get_deployment("t")
    assert missing.value.error_code == "RESOURCE_DOES_NOT_EXIST"


def _refusal(target: str, **kwargs: Any) -> str:
    with pytest.raises(MlflowException) as refused:
        get_deploy_client(target).create_deployment(
            kwargs.pop("name", "t"), kwargs.pop("model_uri", "models:/m@champion"), **kwargs
        )
    return refused.value.message


def test_refusals_say_what_to_change(
    as_admin: Path,
    kube_namespace: str,
    custom: client.CustomObjectsApi,
    mint_kubeconfig: plane.MintKubeconfig,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    target = f"regserve:/{kube_namespace}"
    ok = {"trackingUri": TRACKING, "wait": "false"}
    assert "Register the model" in _refusal(target, model_uri="runs:/0123/model", config=ok)
    assert "did you mean rollout.strategy" in _refusal(target, config={**ok, "stratgy": "Canary"})
    # Earlier tests in this process may have pointed MLflow at a server: a local store here, which no
    # cluster could read from.
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(tmp_path.as_uri())
    try:
        assert "no tracking URI the cluster can reach" in _refusal(target, config={"wait": "false"})
    finally:
        mlflow.set_tracking_uri(previous)
    assert "canary.steps must be strictly increasing" in _refusal(target, config={**ok, "steps": "50,10"})
    with_password = {**ok, "trackingUri": "http://reader:secret@mlflow:5000"}
    assert "must not carry credentials" in _refusal(target, config=with_password)
    # What only the API server checks comes back as its refusal.
    assert "refused the resource" in _refusal(target, name="Not_A_Name", config=ok)
    assert "does not exist" in _refusal("regserve:/no-such-namespace", config=ok)
    with pytest.raises(MlflowException, match="not a regserve target"):
        get_deploy_client("regserve://elsewhere/ns")

    # Someone whose account may not create the resource.
    monkeypatch.setenv("KUBECONFIG", str(mint_kubeconfig(kube_namespace, "nobody")))
    assert "forbidden" in _refusal(target, config=ok)
    assert _stored(custom, kube_namespace, "t") is None


def _mlflow(*args: str, kubeconfig: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "KUBECONFIG": str(kubeconfig)}
    env.pop("MLFLOW_TRACKING_URI", None)
    return subprocess.run(
        [*MLFLOW_CLI, "deployments", *args], env=env, capture_output=True, text=True, timeout=120
    )


def test_the_mlflow_cli_drives_the_plugin(
    admin_kubeconfig: Path, kube_namespace: str, custom: client.CustomObjectsApi
) -> None:
    target = f"regserve:/{kube_namespace}"
    helped = _mlflow("help", "-t", "regserve", kubeconfig=admin_kubeconfig)
    assert helped.returncode == 0, helped.stderr
    assert "regserve-local" in helped.stdout and "rollout.canary.steps" in helped.stdout

    created = _mlflow(
        "create", "-t", target, "--name", "cli", "-m", "models:/translator@champion",
        "-C", f"trackingUri={TRACKING}", "-C", "strategy=Shadow", "-C", "wait=false",
        kubeconfig=admin_kubeconfig,
    )  # fmt: skip
    assert created.returncode == 0, created.stderr
    stored = _stored(custom, kube_namespace, "cli")
    assert stored is not None and stored["spec"]["rollout"]["strategy"] == "Shadow"

    listed = _mlflow("list", "-t", target, kubeconfig=admin_kubeconfig)
    assert listed.returncode == 0 and "'name': 'cli'" in listed.stdout, listed.stderr

    refused = _mlflow(
        "create", "-t", target, "--name", "bad", "-m", "runs:/0123/model", kubeconfig=admin_kubeconfig
    )
    assert refused.returncode != 0 and "Register the model" in refused.stderr

    for _ in range(2):  # the second delete finds nothing and is not an error
        deleted = _mlflow("delete", "-t", target, "--name", "cli", kubeconfig=admin_kubeconfig)
        assert deleted.returncode == 0, deleted.stderr
    assert _stored(custom, kube_namespace, "cli") is None


@pytest.fixture(autouse=True)
def _no_leftovers(kube_namespace: str, kube_api: client.ApiClient) -> Iterator[None]:
    yield
    custom = client.CustomObjectsApi(kube_api)
    for item in custom.list_namespaced_custom_object(GROUP, VERSION, kube_namespace, PLURAL)["items"]:
        custom.delete_namespaced_custom_object(
            GROUP, VERSION, kube_namespace, PLURAL, item["metadata"]["name"]
        )
