"""What the operator leaves behind and what it cannot read, on the real control plane with the shipped
RBAC and a real MLflow: a Secret whose value is not UTF-8 is a condition (not a failing pass), and a
deleted resource's MLflow tags are removed by its finalizer, without a dead registry ever holding up the
deletion."""

from __future__ import annotations

import base64
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import mlflow
import pytest
from kubernetes import client
from kubernetes.client.exceptions import ApiException
from regserve_operator.finalizer import BUDGET_S, FINALIZER
from regserve_operator.sandbox.mlflow_server import MlflowServer
from regserve_operator.tags import tag_key

from tests.k8s import plane
from tests.k8s.operator_support import (
    GROUP,
    PLURAL,
    VERSION,
    Cluster,
    OperatorProcess,
    carried,
    cond,
    new_model,
    operator_account,
    operator_process,
    rms_spec,
    until,
)
from tests.operator.mlflow_fixture import log_version

pytestmark = pytest.mark.k8s

SIGNATURE = {"prompt": "string"}


@pytest.fixture
def cluster(kube_api: client.ApiClient, kube_namespace: str) -> Iterator[Cluster]:
    cluster = Cluster(kube_api, kube_namespace)
    yield cluster
    # A failed test may leave a resource holding our finalizer, and its namespace could then never go.
    listed = cast(
        dict[str, Any], cluster.custom.list_namespaced_custom_object(GROUP, VERSION, kube_namespace, PLURAL)
    )
    for item in listed["items"]:
        if item["metadata"].get("finalizers"):
            cluster.custom.patch_namespaced_custom_object(
                GROUP,
                VERSION,
                kube_namespace,
                PLURAL,
                item["metadata"]["name"],
                {"metadata": {"finalizers": None}},
            )


@pytest.fixture
def operator(
    kube_api: client.ApiClient, kube_namespace: str, mint_kubeconfig: plane.MintKubeconfig, tmp_path: Path
) -> Iterator[OperatorProcess]:
    with (
        operator_account(kube_api, kube_namespace, mint_kubeconfig) as kubeconfig,
        operator_process(kubeconfig, kube_namespace, tmp_path / "operator.log") as process,
    ):
        yield process


def _secret(cluster: Cluster, name: str, raw: dict[str, bytes]) -> None:
    data = {key: base64.b64encode(value).decode() for key, value in raw.items()}
    cluster.core.create_namespaced_secret(
        cluster.namespace, client.V1Secret(metadata=client.V1ObjectMeta(name=name), data=data)
    )


def _ready(cluster: Cluster, name: str) -> dict[str, Any]:
    return cond(cluster.rms(name), "Ready")


def _gone(cluster: Cluster, name: str) -> bool:
    try:
        cluster.rms(name)
    except ApiException as exc:
        if exc.status == 404:
            return True
        raise
    return False


def _tags(mlflow_url: str, model: str, version: str) -> dict[str, str]:
    return dict(mlflow.MlflowClient(mlflow_url).get_model_version(model, version).tags)


# --------------------------------------------------------------------------- credentials not UTF-8


def test_a_secret_value_that_is_not_utf8_is_a_condition_and_fixing_it_recovers(
    cluster: Cluster, operator: OperatorProcess, mlflow_server: MlflowServer
) -> None:
    model = new_model()
    v1 = log_version(mlflow_server.url, model, SIGNATURE, alias="champion")
    value = "pässwörd-s3cret".encode("latin-1")
    _secret(cluster, "mlflow-auth", {"MLFLOW_TRACKING_PASSWORD": value, "MLFLOW_TRACKING_USERNAME": b"alice"})
    cluster.create_rms("latin", rms_spec(model, mlflow_server.url))

    until(
        "Ready=False CredentialsUnavailable",
        lambda: _ready(cluster, "latin").get("reason") == "CredentialsUnavailable",
    )
    message = _ready(cluster, "latin")["message"]
    assert "'MLFLOW_TRACKING_PASSWORD'" in message and "UTF-8" in message, message
    assert cluster.rayservice("latin") is None  # nothing was done on credentials it could not read
    until("one Warning Event", lambda: len(cluster.events("latin", "CredentialsUnavailable")) == 1)
    # Every later pass reports the same without failing: no traceback, the value nowhere.
    log = operator.output()
    assert "Traceback" not in log and "UnicodeDecodeError" not in log, log[-3000:]
    assert "s3cret" not in log

    cluster.core.patch_namespaced_secret(
        "mlflow-auth",
        cluster.namespace,
        {"data": {"MLFLOW_TRACKING_PASSWORD": base64.b64encode(b"pw").decode()}},
    )
    until("served once the Secret is fixed", lambda: carried(cluster, "latin") == v1)


# ------------------------------------------------------------------------------ tags and finalizer


def _served_and_tagged(cluster: Cluster, mlflow_url: str, name: str) -> tuple[str, str]:
    model = new_model()
    v1 = log_version(mlflow_url, model, SIGNATURE, alias="champion")
    if not cluster.core.list_namespaced_secret(
        cluster.namespace, field_selector="metadata.name=mlflow-auth"
    ).items:
        cluster.secret("mlflow-auth", {})
    cluster.create_rms(name, rms_spec(model, mlflow_url))
    until("RayService created", lambda: carried(cluster, name) == v1)
    cluster.set_app_status(name, "RUNNING")
    until("v1 confirmed", lambda: (cluster.rms(name).get("status") or {}).get("lastGoodVersion") == v1)
    until("finalizer added", lambda: FINALIZER in (cluster.rms(name)["metadata"].get("finalizers") or []))
    assert (cluster.rms(name)["status"].get("registryTags") or {}).get(v1, "").startswith("serving")
    assert _tags(mlflow_url, model, v1)[tag_key(cluster.namespace, name)].startswith("serving")
    return model, v1


def test_deleting_a_resource_removes_its_tags_and_then_it_goes(
    cluster: Cluster, operator: OperatorProcess, mlflow_server: MlflowServer
) -> None:
    model, v1 = _served_and_tagged(cluster, mlflow_server.url, "tagged")
    # Another controller's finalizer beside ours is left to it.
    other = "example.com/keep"
    add_other = [{"op": "add", "path": "/metadata/finalizers/-", "value": other}]
    cluster.custom.patch_namespaced_custom_object(
        GROUP,
        VERSION,
        cluster.namespace,
        PLURAL,
        "tagged",
        add_other,
        _content_type="application/json-patch+json",
    )
    cluster.custom.delete_namespaced_custom_object(GROUP, VERSION, cluster.namespace, PLURAL, "tagged")
    until("our finalizer removed", lambda: cluster.rms("tagged")["metadata"].get("finalizers") == [other])
    assert tag_key(cluster.namespace, "tagged") not in _tags(mlflow_server.url, model, v1)
    cluster.custom.patch_namespaced_custom_object(
        GROUP, VERSION, cluster.namespace, PLURAL, "tagged", {"metadata": {"finalizers": None}}
    )
    until("the resource is gone", lambda: _gone(cluster, "tagged"))
    assert not cluster.events("tagged", "RegistryTagsNotRemoved")


def test_a_registry_that_never_answers_does_not_hold_up_a_deletion(
    cluster: Cluster, operator: OperatorProcess, tmp_path: Path
) -> None:
    server = MlflowServer(root=tmp_path / "mlflow").start()
    try:
        model, v1 = _served_and_tagged(cluster, server.url, "stranded")
    finally:
        server.stop()
    # The registry's port now accepts connections (the kernel's backlog) and never answers a byte.
    with socket.socket() as silent:
        silent.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        silent.bind((server.host, server.port))
        silent.listen(64)
        started = time.monotonic()
        cluster.custom.delete_namespaced_custom_object(GROUP, VERSION, cluster.namespace, PLURAL, "stranded")
        until("the resource is gone", lambda: _gone(cluster, "stranded"), timeout=BUDGET_S + 20)
        took = time.monotonic() - started
    print(f"deleted in {took:.1f} s with the registry silent (budget {BUDGET_S:.0f} s)")
    assert took < BUDGET_S + 5, took
    (event,) = cluster.events("stranded", "RegistryTagsNotRemoved")
    assert v1 in event.message and event.type == "Warning"
    restarted = MlflowServer(root=tmp_path / "mlflow", port=server.port).start()
    try:  # the tag stayed (and the Event said so): the deletion did not wait for it
        assert tag_key(cluster.namespace, "stranded") in _tags(restarted.url, model, v1)
    finally:
        restarted.stop()
