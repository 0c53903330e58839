"""The chart and manifests against the real API server (tests/k8s/plane.py).

One release is installed per module (``release``); the operator then runs as a subprocess with exactly
the command, arguments and environment of the installed Deployment and a kubeconfig for the chart's
ServiceAccount, so it holds only the RBAC the chart grants.
"""

from __future__ import annotations

import base64
import copy
import json
import os
import subprocess
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import httpx
import mlflow
import pytest
import yaml
from kubernetes import client
from kubernetes.client.exceptions import ApiException
from regserve_operator import rbac
from regserve_operator.builders import serving_version_of
from regserve_operator.sandbox.mlflow_server import MlflowServer
from regserve_operator.sandbox.models import log_phrasebook
from regserve_operator.sandbox.processes import start_and_wait, stop
from regserve_operator.spec import manifest

from tests.install.support import CHART, KUBECTL, ROOT, VENV_BIN, docs, helm_template, kubectl, run
from tests.k8s import plane

pytestmark = pytest.mark.k8s

GOLDEN = Path(__file__).parent / "golden"
UPDATE_GOLDEN = os.environ.get("REGSERVE_UPDATE_GOLDEN") == "1"
GROUP, VERSION, PLURAL = "regserve.io", "v1alpha1", "registeredmodelservings"
CRD_NAME = f"{PLURAL}.{GROUP}"
RELEASE = "regserve"
SA = "regserve"  # the chart's ServiceAccount for release "regserve" (fullname == release name)


def _deployment(kube_api: client.ApiClient, namespace: str) -> dict[str, Any]:
    """The release's Deployment as a camelCase dict."""
    found = client.AppsV1Api(kube_api).read_namespaced_deployment(RELEASE, namespace)
    return dict(kube_api.sanitize_for_serialization(found))


def _custom(
    custom: client.CustomObjectsApi, group: str, namespace: str, plural: str, name: str
) -> dict[str, Any]:
    version = VERSION if group == GROUP else "v1"
    return dict(
        cast(dict[str, Any], custom.get_namespaced_custom_object(group, version, namespace, plural, name))
    )


def _dry_run(kubeconfig: Path, manifests: str) -> list[str]:
    out = kubectl(kubeconfig, "apply", "--server-side", "--dry-run=server", "-f", "-", stdin=manifests)
    return [line for line in out.splitlines() if line.strip()]


def _retarget(documents: list[dict[str, Any]], namespace: str) -> str:
    """The documents moved into `namespace` (dropping Namespace objects), as one YAML stream."""
    moved = []
    for doc in documents:
        if doc["kind"] == "Namespace":
            continue
        doc = copy.deepcopy(doc)
        if "namespace" in doc["metadata"]:
            doc["metadata"]["namespace"] = namespace
        for subject in doc.get("subjects", []):
            subject["namespace"] = namespace
        moved.append(doc)
    return "---\n".join(yaml.safe_dump(d) for d in moved)


@pytest.mark.parametrize(
    "values",
    [[], ["watch.mode=cluster"], ["webhook.enabled=true", "webhook.existingSecret=hook"]],
    ids=["namespaces", "cluster", "webhook"],
)
def test_helm_template_passes_a_server_side_dry_run(
    helm_binary: Path, admin_kubeconfig: Path, kube_namespace: str, values: list[str]
) -> None:
    rendered = helm_template(
        helm_binary, *values, namespace=kube_namespace, release=f"dry-{uuid.uuid4().hex[:6]}"
    )
    lines = _dry_run(admin_kubeconfig, rendered)
    assert len(lines) == len(docs(rendered)) >= 5
    assert all(line.endswith("serverside-applied (server dry run)") for line in lines), lines


def test_kustomize_base_and_examples_pass_a_server_side_dry_run(
    admin_kubeconfig: Path, kube_namespace: str
) -> None:
    base = docs(run([KUBECTL, "kustomize", ROOT / "deploy"]))
    mlflow_example = docs(run([KUBECTL, "kustomize", ROOT / "deploy" / "examples" / "mlflow"]))
    models = [
        d
        for f in sorted((ROOT / "deploy" / "examples" / "models").glob("*.yaml"))
        for d in docs(f.read_text())
    ]
    for doc in models:
        doc["metadata"]["namespace"] = kube_namespace
    everything = _retarget(base + mlflow_example + models, kube_namespace)
    lines = _dry_run(admin_kubeconfig, everything)
    assert len(lines) == len([d for d in base + mlflow_example + models if d["kind"] != "Namespace"])
    assert sum("registeredmodelserving.regserve.io/" in line for line in lines) == 2, lines


def test_rule_scopes_match_the_api_servers_discovery(admin_kubeconfig: Path) -> None:
    cluster_scoped = {
        name.split(".")[0]
        for name in kubectl(admin_kubeconfig, "api-resources", "--namespaced=false", "-o", "name").split()
    }
    rules = rbac.rules_by_scope()
    for rule in rules["clusterScoped"]:
        assert {r.split("/")[0] for r in rule["resources"]} <= cluster_scoped, rule
    for rule in rules["namespaced"]:
        assert not {r.split("/")[0] for r in rule["resources"]} & cluster_scoped, rule


def differences(live: Any, wanted: Any, path: str = "") -> list[str]:
    """Where `live` differs from `wanted`, by path (a plain `==` names only the top-level key)."""
    if isinstance(live, dict) and isinstance(wanted, dict):
        return [
            found
            for key in sorted(set(live) | set(wanted))
            for found in differences(live.get(key), wanted.get(key), f"{path}.{key}")
        ]
    if isinstance(live, list) and isinstance(wanted, list) and len(live) == len(wanted):
        return [
            found
            for i, (a, b) in enumerate(zip(live, wanted, strict=True))
            for found in differences(a, b, f"{path}[{i}]")
        ]
    return [] if live == wanted else [f"{path}: {live!r} != {wanted!r}"]


def test_documented_crd_upgrade_step_brings_a_drifted_crd_back(
    kube_api: client.ApiClient, admin_kubeconfig: Path
) -> None:
    ext = client.ApiextensionsV1Api(kube_api)
    chart_crd = yaml.safe_load((CHART / "crds" / "regserve.io_registeredmodelservings.yaml").read_text())
    wanted = [c["name"] for c in chart_crd["spec"]["versions"][0]["additionalPrinterColumns"]]
    # An "older" CRD, as another field manager left it: an extra printer column and a changed description.
    patch = [
        {
            "op": "add",
            "path": "/spec/versions/0/additionalPrinterColumns/-",
            "value": {"name": "Drifted", "type": "string", "jsonPath": ".spec.model.name"},
        },
        {
            "op": "replace",
            "path": "/spec/versions/0/schema/openAPIV3Schema/properties/spec/properties/paused/description",
            "value": "an old description",
        },
    ]
    kubectl(
        admin_kubeconfig,
        "patch",
        "crd",
        CRD_NAME,
        "--type=json",
        "-p",
        json.dumps(patch),
        "--field-manager=old-installer",
    )

    def live() -> dict[str, Any]:
        return dict(kube_api.sanitize_for_serialization(ext.read_custom_resource_definition(CRD_NAME)))

    assert "Drifted" in [c["name"] for c in live()["spec"]["versions"][0]["additionalPrinterColumns"]]
    # The documented step, verbatim (charts/regserve/README.md, "Upgrade").
    out = kubectl(
        admin_kubeconfig, "apply", "--server-side", "--force-conflicts", "-f", str(CHART / "crds") + "/"
    )
    assert f"customresourcedefinition.apiextensions.k8s.io/{CRD_NAME} serverside-applied" in out
    after = live()
    assert [c["name"] for c in after["spec"]["versions"][0]["additionalPrinterColumns"]] == wanted
    spec_props = after["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]
    chart_props = chart_crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"][
        "properties"
    ]
    assert not (found := differences(spec_props, chart_props)), found[:10]
    plane.wait_for(
        "CRD Established after the apply",
        lambda: any(
            c["type"] == "Established" and c["status"] == "True" for c in live()["status"]["conditions"]
        ),
        timeout=30,
    )


# --------------------------------------------------------------------------------------------------
# One installed release


@dataclass
class Release:
    namespace: str  # release namespace = the watched namespace
    other: str  # a namespace the release does not watch
    kubeconfig: Path  # the chart's ServiceAccount
    install_output: str


def _helm(helm: Path, kubeconfig: Path, *args: str, timeout: float = 180) -> str:
    return run([helm, "--kubeconfig", kubeconfig, *args], timeout=timeout)


@pytest.fixture(scope="module")
def release(
    helm_binary: Path,
    admin_kubeconfig: Path,
    kube_api: client.ApiClient,
    mint_kubeconfig: plane.MintKubeconfig,
) -> Iterator[Release]:
    core = client.CoreV1Api(kube_api)
    names = [f"inst-{uuid.uuid4().hex[:8]}", f"other-{uuid.uuid4().hex[:8]}"]
    for name in names:
        core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=name)))
    namespace, other = names
    core.create_namespaced_secret(
        namespace,
        client.V1Secret(metadata=client.V1ObjectMeta(name="hook"), string_data={"webhook-secret": "s3cr3t"}),
    )
    out = _helm(
        helm_binary, admin_kubeconfig,
        "install", RELEASE, str(CHART), "--namespace", namespace, "--wait", "--timeout", "150s",
        "--set", "webhook.enabled=true", "--set", "webhook.existingSecret=hook",
        "--set", "operator.settleSeconds=1",
    )  # fmt: skip
    try:
        yield Release(namespace, other, mint_kubeconfig(namespace, SA), out)
    finally:
        subprocess.run(
            [str(helm_binary), "--kubeconfig", str(admin_kubeconfig), "uninstall", RELEASE, "-n", namespace],
            capture_output=True, timeout=120, check=False,
        )  # fmt: skip
        for name in names:
            core.delete_namespace(name, propagation_policy="Background")


def test_helm_install_reports_deployed_and_the_deployment_becomes_available(
    release: Release, kube_api: client.ApiClient, helm_binary: Path, admin_kubeconfig: Path
) -> None:
    assert "STATUS: deployed" in release.install_output
    assert _deployment(kube_api, release.namespace)["status"]["availableReplicas"] == 1
    status = json.loads(
        _helm(helm_binary, admin_kubeconfig, "status", RELEASE, "-n", release.namespace, "-o", "json")
    )
    assert status["info"]["status"] == "deployed"


def _can_i(kubeconfig: Path, namespace: str) -> str:
    return kubectl(kubeconfig, "auth", "can-i", "--list", "--namespace", namespace)


def _golden(name: str, actual: str) -> None:
    path = GOLDEN / name
    if UPDATE_GOLDEN:
        path.parent.mkdir(exist_ok=True)
        path.write_text(actual)
    assert path.exists(), f"{path} missing (REGSERVE_UPDATE_GOLDEN=1 writes it; review it before committing)"
    assert actual == path.read_text(), f"`kubectl auth can-i --list` changed:\n{actual}"


def test_service_account_permissions_match_the_reviewed_golden_files(release: Release) -> None:
    watched = _can_i(release.kubeconfig, release.namespace)
    _golden("can-i-watched-namespace.txt", watched)
    _golden("can-i-unwatched-namespace.txt", _can_i(release.kubeconfig, release.other))
    # Least privilege, spelled out (also in the golden files): Secrets get only, nothing else anywhere.
    for verb in ("list", "watch", "create", "update", "patch", "delete"):
        proc = subprocess.run(
            [KUBECTL, "--kubeconfig", str(release.kubeconfig), "auth", "can-i", verb, "secrets",
             "-n", release.namespace],
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        assert proc.stdout.strip() == "no", (verb, proc.stdout, proc.stderr)
    assert "secrets" not in _can_i(release.kubeconfig, release.other)


@dataclass
class OperatorProcess:
    proc: subprocess.Popen[bytes]
    log: Path
    metrics_port: int
    webhook_port: int

    def output(self) -> str:
        return self.log.read_text(errors="replace")


def _pod_environment(kube_api: client.ApiClient, namespace: str, container: dict[str, Any]) -> dict[str, str]:
    """The container's env as the kubelet would resolve it (literal values and secretKeyRefs)."""
    core = client.CoreV1Api(kube_api)
    env: dict[str, str] = {}
    for var in container.get("env", []):
        if "valueFrom" not in var:
            env[var["name"]] = var.get("value", "")
            continue
        ref = var["valueFrom"]["secretKeyRef"]  # the only source the chart uses
        data = core.read_namespaced_secret(ref["name"], namespace).data or {}
        env[var["name"]] = base64.b64decode(data[ref["key"]]).decode()
    return env


@pytest.fixture(scope="module")
def chart_operator(
    release: Release, kube_api: client.ApiClient, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[OperatorProcess]:
    (container,) = _deployment(kube_api, release.namespace)["spec"]["template"]["spec"]["containers"]
    assert container["command"] == ["regserve"]
    env = _pod_environment(kube_api, release.namespace, container)
    metrics_port, webhook_port = plane.free_port(), plane.free_port()
    # Only the ports move (this machine is shared); everything else is the Deployment's.
    env["REGSERVE_METRICS_PORT"], env["REGSERVE_WEBHOOK_PORT"] = str(metrics_port), str(webhook_port)
    home = tmp_path_factory.mktemp("operator-home")
    env["HOME"] = str(home)
    base = {k: v for k, v in os.environ.items() if k in ("PATH", "LANG", "LC_ALL", "TZ")}
    log = home / "operator.log"
    metrics = f"http://127.0.0.1:{metrics_port}/metrics"
    healthz = f"http://127.0.0.1:{webhook_port}/healthz"
    proc = start_and_wait(
        [str(VENV_BIN / "regserve"), *container["args"]],
        log=log,
        ready=lambda: _answers(metrics) and _answers(healthz),
        what="the operator with the chart's Deployment env (its metrics and webhook endpoints)",
        timeout=60,
        env={**base, **env, "KUBECONFIG": str(release.kubeconfig), "PYTHONUNBUFFERED": "1"},
        cwd=home,
        inherit_env=False,
    )
    try:
        yield OperatorProcess(proc, log, metrics_port, webhook_port)
    finally:
        stop(proc, timeout=20)


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def test_probe_endpoints_answer_on_the_deployments_ports(chart_operator: OperatorProcess) -> None:
    metrics = f"http://127.0.0.1:{chart_operator.metrics_port}/metrics"
    healthz = f"http://127.0.0.1:{chart_operator.webhook_port}/healthz"
    assert "python_info" in httpx.get(metrics, timeout=5).text
    assert httpx.get(healthz, timeout=5).status_code == 200
    # An unsigned delivery is refused: the receiver runs with the Secret the chart wired in.
    refused = httpx.post(f"http://127.0.0.1:{chart_operator.webhook_port}/webhook", content=b"{}", timeout=5)
    assert refused.status_code == 401


def test_operator_with_only_the_charts_rbac_reconciles_end_to_end(
    release: Release, chart_operator: OperatorProcess, kube_api: client.ApiClient, mlflow_server: MlflowServer
) -> None:
    custom = client.CustomObjectsApi(kube_api)
    core = client.CoreV1Api(kube_api)
    model = f"inst_{uuid.uuid4().hex[:8]}"
    name = f"rms-{uuid.uuid4().hex[:6]}"
    v1 = log_phrasebook(mlflow_server.url, model)
    registry = mlflow.MlflowClient(mlflow_server.url)
    registry.set_registered_model_alias(model, "champion", v1)
    core.create_namespaced_secret(
        release.namespace, client.V1Secret(metadata=client.V1ObjectMeta(name="mlflow-auth"))
    )
    body = manifest(
        name,
        {
            "model": {"name": model, "alias": "champion"},
            "registry": {
                "trackingUri": mlflow_server.url,
                "credentialsSecretRef": {"name": "mlflow-auth"},
                "pollIntervalSeconds": 2,
            },
        },
    )
    custom.create_namespaced_custom_object(GROUP, VERSION, release.namespace, PLURAL, body)

    def carried() -> str | None:
        try:
            rs = _custom(custom, "ray.io", release.namespace, "rayservices", name)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise
        return serving_version_of(rs)

    def resolved() -> str | None:
        rms = _custom(custom, GROUP, release.namespace, PLURAL, name)
        return (rms.get("status") or {}).get("resolvedVersion")

    def until(what: str, check: Callable[[], bool], timeout: float = 90) -> None:
        def alive() -> None:
            assert chart_operator.proc.poll() is None, chart_operator.output()[-4000:]

        try:
            plane.wait_for(what, check, timeout=timeout, interval=0.25, watch=alive)
        except plane.PlaneError as exc:
            pytest.fail(f"{exc}\noperator output:\n{chart_operator.output()[-4000:]}", pytrace=False)

    until("RayService created for v1", lambda: carried() == v1)
    # The status is written after the pass that created the RayService returns: wait for it too.
    until("status.resolvedVersion is v1", lambda: resolved() == v1, timeout=30)
    rs = _custom(custom, "ray.io", release.namespace, "rayservices", name)
    assert rs["metadata"]["ownerReferences"][0]["kind"] == "RegisteredModelServing"

    v2 = log_phrasebook(mlflow_server.url, model)
    registry.set_registered_model_alias(model, "champion", v2)
    until("serveConfigV2 moved to v2", lambda: carried() == v2)
    until("status.resolvedVersion is v2", lambda: resolved() == v2, timeout=30)
    output = chart_operator.output()
    assert "Forbidden" not in output and " 403" not in output, output[-3000:]


def test_helm_upgrade_to_cluster_mode_then_uninstall(
    release: Release, chart_operator: OperatorProcess, helm_binary: Path, admin_kubeconfig: Path,
    kube_api: client.ApiClient,
) -> None:  # fmt: skip
    # Runs last in the module: it changes the release the other tests share.
    out = _helm(
        helm_binary, admin_kubeconfig, "upgrade", RELEASE, str(CHART), "-n", release.namespace,
        "--reuse-values", "--set", "watch.mode=cluster", "--wait", "--timeout", "150s",
    )  # fmt: skip
    assert "has been upgraded" in out
    # Cluster-wide now: the unwatched namespace gets exactly what the watched one had.
    plane.wait_for(
        "cluster-wide grants",
        lambda: (
            _can_i(release.kubeconfig, release.other) == (GOLDEN / "can-i-watched-namespace.txt").read_text()
        ),
        timeout=30,
    )
    (container,) = _deployment(kube_api, release.namespace)["spec"]["template"]["spec"]["containers"]
    assert container["args"] == ["run", "--standalone", "--all-namespaces"]
    rbac_api = client.RbacAuthorizationV1Api(kube_api)
    assert not rbac_api.list_namespaced_role(
        release.namespace, label_selector=f"app.kubernetes.io/instance={RELEASE}"
    ).items

    _helm(helm_binary, admin_kubeconfig, "uninstall", RELEASE, "-n", release.namespace, "--wait")
    with pytest.raises(ApiException) as gone:
        rbac_api.read_cluster_role(RELEASE)
    assert gone.value.status == 404
    # Helm leaves the CRD (documented): resources survive an uninstall.
    client.ApiextensionsV1Api(kube_api).read_custom_resource_definition(CRD_NAME)
