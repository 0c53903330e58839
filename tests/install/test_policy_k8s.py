"""The tenant policy on the real API server: the chart's ValidatingAdmissionPolicy refuses a tenant's
`kubectl apply` for each rule and lets what is within policy through; the operator, run with the
chart's policy settings, reports PolicyViolation for a resource admission never saw."""

from __future__ import annotations

import contextlib
import json
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client
from regserve_operator import conditions as c
from regserve_operator.spec import manifest, manifests_yaml

from tests.install.support import KUBECTL, docs, helm_template, kubectl, of_kind, run_status
from tests.k8s import plane
from tests.k8s.operator_support import Cluster, OperatorProcess, cond, operator_account, until

pytestmark = pytest.mark.k8s

GROUP, VERSION, PLURAL = "regserve.io", "v1alpha1", "registeredmodelservings"
ALLOWED_URI = "http://mlflow.allowed:5000"
APPROVED_IMAGE = "regserve/approved:1"
READER = "ray-reader"
POLICY_VALUES = (
    f"policy.allowedTrackingUriPrefixes={{{ALLOWED_URI}/}}",
    f"policy.allowedImages={{{APPROVED_IMAGE}}}",
    f"policy.allowedServiceAccounts={{{READER}}}",
    "policy.maxReplicas=4",
)
DENIED = "not allowed by the cluster policy"


def _rendered(helm: Path, namespace: str, release: str) -> list[dict[str, Any]]:
    return docs(
        helm_template(
            helm, *POLICY_VALUES, f"watch.namespaces={{{namespace}}}", namespace=namespace, release=release
        )
    )


def _spec(**extra: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "model": {"name": "m", "alias": "champion"},
        "registry": {"trackingUri": f"{ALLOWED_URI}/team-a"},
    }
    for key, value in extra.items():
        spec[key] = {**spec.get(key, {}), **value}
    return spec


def _manifest(name: str, spec: dict[str, Any], labels: dict[str, str] | None = None) -> str:
    return manifests_yaml(manifest(name, spec, labels=labels or None))


@dataclass(frozen=True)
class Tenant:
    namespace: str
    kubeconfig: Path

    def apply(self, manifest: str, *extra: str) -> tuple[bool, str]:
        proc = run_status(
            [KUBECTL, "--kubeconfig", self.kubeconfig, "-n", self.namespace, "apply", *extra, "-f", "-"],
            stdin=manifest,
        )
        return proc.returncode == 0, proc.stdout + proc.stderr


@pytest.fixture
def tenant(kube_api: client.ApiClient, kube_namespace: str, mint_kubeconfig: plane.MintKubeconfig) -> Tenant:
    """A user with what a model team gets: RegisteredModelServings in its own namespace, nothing else."""
    rbac_api = client.RbacAuthorizationV1Api(kube_api)
    role: dict[str, Any] = {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "Role",
        "metadata": {"name": "rms-editor"},
        "rules": [
            {
                "apiGroups": [GROUP],
                "resources": [PLURAL],
                "verbs": ["get", "list", "watch", "create", "update", "patch", "delete"],
            }
        ],
    }
    rbac_api.create_namespaced_role(kube_namespace, role)
    binding: dict[str, Any] = {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "RoleBinding",
        "metadata": {"name": "rms-editor"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "rms-editor"},
        "subjects": [{"kind": "ServiceAccount", "name": "tenant", "namespace": kube_namespace}],
    }
    rbac_api.create_namespaced_role_binding(kube_namespace, binding)
    return Tenant(kube_namespace, mint_kubeconfig(kube_namespace, "tenant"))


@contextlib.contextmanager
def admission_policy(helm: Path, admin: Path, namespace: str) -> Iterator[str]:
    """The chart's ValidatingAdmissionPolicy and binding (cluster-scoped: removed afterwards)."""
    release = f"p{uuid.uuid4().hex[:6]}"
    rendered = _rendered(helm, namespace, release)
    objects = of_kind(rendered, "ValidatingAdmissionPolicy") + of_kind(
        rendered, "ValidatingAdmissionPolicyBinding"
    )
    assert len(objects) == 2
    manifests = "---\n".join(yaml.safe_dump(o) for o in objects)
    kubectl(admin, "apply", "-f", "-", stdin=manifests)
    try:
        yield objects[0]["metadata"]["name"]
    finally:
        kubectl(admin, "delete", "--ignore-not-found", "-f", "-", stdin=manifests)


# (what, spec fields, text the refusal must carry)
REFUSED: list[tuple[str, dict[str, Any], str]] = [
    (
        "tracking uri elsewhere",
        {"registry": {"trackingUri": "http://evil.example.net:5000"}},
        "spec.registry.trackingUri",
    ),
    (
        "tracking uri sharing the host's text",
        {"registry": {"trackingUri": "http://mlflow.allowed:5000.evil.net"}},
        "spec.registry.trackingUri",
    ),
    ("an image of its own", {"rayService": {"image": "attacker/ray:1"}}, "spec.rayService.image"),
    (
        "another service account",
        {"rayService": {"serviceAccountName": "admin"}},
        "spec.rayService.serviceAccountName",
    ),
    ("gpus", {"resources": {"accelerator": "gpu"}}, "spec.resources.accelerator"),
    ("gpu tolerations", {"resources": {"gpuTolerations": [{"operator": "Exists"}]}}, "gpuTolerations"),
    ("too many replicas", {"serving": {"replicas": 5}}, "spec.serving.replicas"),
    (
        "too many autoscaled replicas",
        {"serving": {"autoscaling": {"maxReplicas": 9}}},
        "autoscaling.maxReplicas",
    ),
]
ALLOWED: list[tuple[str, dict[str, Any]]] = [
    ("defaults", {}),
    ("approved image and account", {"rayService": {"image": APPROVED_IMAGE, "serviceAccountName": READER}}),
    ("replicas at the limit", {"serving": {"autoscaling": {"minReplicas": 0, "maxReplicas": 4}}}),
    ("pull secrets of the namespace", {"rayService": {"imagePullSecrets": [{"name": "regcred"}]}}),
    ("tracking uri at the prefix itself", {"registry": {"trackingUri": ALLOWED_URI}}),
]


def test_a_tenant_is_refused_at_apply_for_each_rule_and_allowed_within_policy(
    tenant: Tenant, helm_binary: Path, admin_kubeconfig: Path
) -> None:
    with admission_policy(helm_binary, admin_kubeconfig, tenant.namespace) as policy_name:
        # The API server loads policies asynchronously: wait until this one answers.
        probe = _manifest("probe", _spec(rayService={"image": "attacker/ray:1"}))
        until("the policy refuses", lambda: not tenant.apply(probe, "--dry-run=server")[0], timeout=60)
        for what, fields, field_text in REFUSED:
            ok, out = tenant.apply(_manifest("refused", _spec(**fields)))
            assert not ok, f"{what}: accepted\n{out}"
            assert DENIED in out and field_text in out and policy_name in out, f"{what}: {out}"
        for index, (what, fields) in enumerate(ALLOWED):
            ok, out = tenant.apply(_manifest(f"allowed-{index}", _spec(**fields)))
            assert ok, f"{what}: refused\n{out}"
        # An update that moves the spec beyond the policy is refused; one that leaves the spec alone passes.
        ok, out = tenant.apply(_manifest("allowed-0", _spec(serving={"replicas": 50})))
        assert not ok and "spec.serving.replicas" in out, out
        ok, out = tenant.apply(_manifest("allowed-0", _spec(), labels={"team": "a"}))
        assert ok, out
    # Nothing refused was stored.
    listed = kubectl(tenant.kubeconfig, "-n", tenant.namespace, "get", PLURAL, "-o", "json")
    names = sorted(item["metadata"]["name"] for item in json.loads(listed)["items"])
    assert names == [f"allowed-{i}" for i in range(len(ALLOWED))]


def _policy_env(helm: Path, namespace: str) -> dict[str, str]:
    """REGSERVE_POLICY_* exactly as the chart's Deployment sets them."""
    (deployment,) = of_kind(_rendered(helm, namespace, "rs"), "Deployment")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return {e["name"]: e["value"] for e in container["env"] if e["name"].startswith("REGSERVE_POLICY_")}


def test_the_operator_refuses_a_resource_admission_never_saw(
    kube_api: client.ApiClient,
    kube_namespace: str,
    mint_kubeconfig: plane.MintKubeconfig,
    helm_binary: Path,
    admin_kubeconfig: Path,
    tenant: Tenant,
    tmp_path: Path,
) -> None:
    cluster = Cluster(kube_api, kube_namespace)
    # Created before the policy existed; the registry it names is never contacted (it does not resolve).
    cluster.create_rms(
        "before",
        _spec(registry={"trackingUri": "http://evil.invalid:5000"}, rayService={"image": "attacker/ray:1"}),
    )
    env = _policy_env(helm_binary, kube_namespace)
    assert env["REGSERVE_POLICY_ENABLED"] == "true"
    with operator_account(kube_api, kube_namespace, mint_kubeconfig) as kubeconfig:
        operator = OperatorProcess(kubeconfig, kube_namespace, tmp_path / "operator.log", env=env).start()
        try:
            until(
                "PolicyViolation",
                lambda: cond(cluster.rms("before"), c.READY).get("reason") == "PolicyViolation",
            )
            ready = cond(cluster.rms("before"), c.READY)
            assert ready["status"] == "False"
            assert (
                "spec.registry.trackingUri" in ready["message"]
                and "spec.rayService.image" in ready["message"]
            )
            until("one Event", lambda: len(cluster.events("before", "PolicyViolation")) == 1)
            assert cluster.rayservice("before") is None
            # Refused before the registry was asked: an unresolvable host would have made it unreachable.
            assert cond(cluster.rms("before"), c.REGISTRY_REACHABLE) == {}
        finally:
            operator.stop()
    # With the policy in place, the resource can still be labelled and deleted by its tenant.
    with admission_policy(helm_binary, admin_kubeconfig, kube_namespace):
        probe = _manifest("probe", _spec(rayService={"image": "attacker/ray:1"}))
        until("the policy refuses", lambda: not tenant.apply(probe, "--dry-run=server")[0], timeout=60)
        labelled = kubectl(tenant.kubeconfig, "-n", kube_namespace, "label", PLURAL, "before", "team=a")
        assert "labeled" in labelled
        kubectl(tenant.kubeconfig, "-n", kube_namespace, "delete", PLURAL, "before", "--wait=false")
