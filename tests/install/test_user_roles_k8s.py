"""The chart's user roles on the real API server: a team member bound to the built-in `edit` role in the
team's namespace may deploy with `mlflow deployments -t regserve` there (the aggregation controller adds
the chart's rules to `edit`), one bound to `view` may read deployments and not create them."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client
from mlflow.deployments import get_deploy_client
from mlflow.exceptions import MlflowException

from tests.install.support import docs, helm_template, kubectl, of_kind
from tests.k8s import plane
from tests.k8s.operator_support import until

pytestmark = pytest.mark.k8s

CONFIG = {"trackingUri": "http://mlflow.mlflow.svc:5000", "wait": "false"}


@pytest.fixture
def user_roles(helm_binary: Path, admin_kubeconfig: Path) -> Iterator[list[dict[str, Any]]]:
    """The chart's two user ClusterRoles, applied (cluster-scoped: removed afterwards)."""
    rendered = docs(helm_template(helm_binary, release=f"u{uuid.uuid4().hex[:6]}"))
    roles = [
        r for r in of_kind(rendered, "ClusterRole") if r["metadata"]["name"].endswith(("-edit", "-view"))
    ]
    assert len(roles) == 2
    manifests = "---\n".join(yaml.safe_dump(role) for role in roles)
    kubectl(admin_kubeconfig, "apply", "-f", "-", stdin=manifests)
    try:
        yield roles
    finally:
        kubectl(admin_kubeconfig, "delete", "--ignore-not-found", "-f", "-", stdin=manifests)


def _bind(rbac: client.RbacAuthorizationV1Api, namespace: str, account: str, built_in: str) -> None:
    rbac.create_namespaced_role_binding(
        namespace,
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "RoleBinding",
            "metadata": {"name": f"{account}-{built_in}"},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": built_in},
            "subjects": [{"kind": "ServiceAccount", "name": account, "namespace": namespace}],
        },
    )


def _aggregated(rbac: client.RbacAuthorizationV1Api, built_in: str) -> bool:
    rules = rbac.read_cluster_role(built_in).rules or []
    return any("registeredmodelservings" in (rule.resources or []) for rule in rules)


def test_edit_deploys_and_view_reads(
    user_roles: list[dict[str, Any]],
    kube_api: client.ApiClient,
    kube_namespace: str,
    mint_kubeconfig: plane.MintKubeconfig,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    rbac = client.RbacAuthorizationV1Api(kube_api)
    until(
        "the chart's rules aggregated into edit and view",
        lambda: _aggregated(rbac, "edit") and _aggregated(rbac, "view"),
    )
    _bind(rbac, kube_namespace, "developer", "edit")
    _bind(rbac, kube_namespace, "auditor", "view")
    target = f"regserve:/{kube_namespace}"

    monkeypatch.setenv("KUBECONFIG", str(mint_kubeconfig(kube_namespace, "developer")))
    created = get_deploy_client(target).create_deployment("t", "models:/m@champion", config=CONFIG)
    assert created["name"] == "t"

    monkeypatch.setenv("KUBECONFIG", str(mint_kubeconfig(kube_namespace, "auditor")))
    auditor = get_deploy_client(target)
    assert [d["name"] for d in auditor.list_deployments()] == ["t"]
    with pytest.raises(MlflowException, match="forbidden"):
        auditor.create_deployment("u", "models:/m@champion", config=CONFIG)
    with pytest.raises(MlflowException, match="forbidden"):
        auditor.delete_deployment("t")

    monkeypatch.setenv("KUBECONFIG", str(mint_kubeconfig(kube_namespace, "developer")))
    get_deploy_client(target).delete_deployment("t")
    assert auditor.list_deployments() == []
