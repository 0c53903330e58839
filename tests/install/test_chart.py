"""The chart, Dockerfile and manifests, checked without a cluster (helm, hadolint, kubectl kustomize)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from regserve_operator import rbac
from regserve_operator.builders import RAY_GID, RAY_UID
from regserve_operator.settings import Settings

from tests.install import chart_sync
from tests.install.support import (
    CHART,
    KUBECTL,
    ROOT,
    VENV_BIN,
    docs,
    helm_template,
    of_kind,
    run,
    run_status,
)


def test_generated_chart_files_match_their_sources(helm_binary: Path) -> None:
    stale = chart_sync.stale_files(helm_binary)
    assert not stale, f"out of date (run `python -m tests.install.chart_sync`): {stale}"
    # Spelled out for the CRD, the contract the issue names: the chart's crds/ is byte-identical to crds/.
    sources = sorted(p.name for p in (ROOT / "crds").glob("*.yaml"))
    assert sources and sorted(p.name for p in (CHART / "crds").iterdir()) == sources
    for name in sources:
        assert (CHART / "crds" / name).read_bytes() == (ROOT / "crds" / name).read_bytes()


def test_chart_rules_are_exactly_the_operators_rules() -> None:
    rules = yaml.safe_load((CHART / "files" / "rbac-rules.yaml").read_text())
    both = rules["clusterScoped"] + rules["namespaced"]
    assert rules["clusterScoped"] and rules["namespaced"]
    assert sorted(map(json.dumps, both)) == sorted(map(json.dumps, rbac.cluster_role()["rules"]))


def test_every_value_is_documented_and_in_the_readme_table() -> None:
    documented, undocumented = chart_sync.documented_values((CHART / "values.yaml").read_text())
    assert not undocumented, f"values without a `# --` comment: {undocumented}"
    assert len(documented) > 20
    assert chart_sync.values_table() in (CHART / "README.md").read_text()


def _schema() -> dict[str, Any]:
    return dict(json.loads((CHART / "values.schema.json").read_text()))


def test_values_schema_accepts_the_defaults() -> None:
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    jsonschema.Draft7Validator.check_schema(_schema())
    jsonschema.validate(values, _schema(), cls=jsonschema.Draft7Validator)


@pytest.mark.parametrize(
    ("override", "path"),
    [
        ({"watch": {"mode": "everywhere"}}, "watch.mode"),
        ({"webhook": {"enabled": True, "existingSecret": ""}}, "webhook.existingSecret"),
        ({"metrics": {"port": 0}}, "metrics.port"),
        ({"unknownKey": 1}, "unknownKey"),
        ({"watch": {"mode": "namespaces", "namespaces": ["Not_A_Name"]}}, "watch.namespaces"),
    ],
)
def test_values_schema_rejects_bad_values(override: dict[str, Any], path: str, helm_binary: Path) -> None:
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    for key, value in override.items():
        values[key] = {**values[key], **value} if isinstance(value, dict) and key in values else value
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(values, _schema(), cls=jsonschema.Draft7Validator)
    # helm applies the same schema at template time.
    flags: list[str | Path] = []
    for key, value in override.items():
        flags += ["--set-json", f"{key}={json.dumps(value)}"]
    proc = run_status([helm_binary, "template", "rs", CHART, *flags])
    assert proc.returncode != 0 and path.replace(".", "/") in proc.stderr, proc.stderr


@pytest.mark.parametrize(
    "values",
    [
        [],
        ["watch.mode=cluster"],
        ["webhook.enabled=true", "webhook.existingSecret=hook", "metrics.serviceMonitor.enabled=true"],
    ],
    ids=["defaults", "cluster", "webhook+monitor"],
)
def test_helm_lint_strict(helm_binary: Path, values: list[str]) -> None:
    args: list[str | Path] = [helm_binary, "lint", "--strict", CHART]
    for value in values:
        args += ["--set", value]
    out = run(args)
    assert "1 chart(s) linted, 0 chart(s) failed" in out


def _rules_of(documents: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [r for d in of_kind(documents, kind) for r in d["rules"]]


AGGREGATES = "rbac.authorization.k8s.io/aggregate-to-"


def _operator_cluster_roles(documents: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The ClusterRoles the operator is bound to (not those aggregated into the built-in user roles)."""
    return [
        role
        for role in of_kind(documents, "ClusterRole")
        if not any(label.startswith(AGGREGATES) for label in role["metadata"].get("labels") or {})
    ]


def test_user_roles_aggregate_into_the_built_in_roles(helm_binary: Path) -> None:
    rendered = docs(helm_template(helm_binary))
    by_name = {r["metadata"]["name"]: r for r in of_kind(rendered, "ClusterRole")}
    edit, view = by_name["rs-regserve-edit"], by_name["rs-regserve-view"]
    assert {k for k in edit["metadata"]["labels"] if k.startswith(AGGREGATES)} == {
        f"{AGGREGATES}admin",
        f"{AGGREGATES}edit",
    }
    assert {k for k in view["metadata"]["labels"] if k.startswith(AGGREGATES)} == {f"{AGGREGATES}view"}
    (view_rule,) = view["rules"]
    assert view_rule["verbs"] == ["get", "list", "watch"]
    # Only the model-serving resource: nothing the operator itself may do reaches a user this way.
    for role in (edit, view):
        assert {g for r in role["rules"] for g in r["apiGroups"]} == {"regserve.io"}
    assert not [
        r
        for r in of_kind(docs(helm_template(helm_binary, "rbac.userRoles=false")), "ClusterRole")
        if r["metadata"]["name"].endswith(("-edit", "-view"))
    ]


def test_namespaces_mode_grants_namespaced_rules_only_in_watched_namespaces(helm_binary: Path) -> None:
    rendered = docs(helm_template(helm_binary, "watch.namespaces={ml-a,ml-b}", namespace="ops"))
    rules = yaml.safe_load((CHART / "files" / "rbac-rules.yaml").read_text())
    (cluster_role,) = _operator_cluster_roles(rendered)
    assert cluster_role["rules"] == rules["clusterScoped"]
    roles = of_kind(rendered, "Role")
    assert sorted(r["metadata"]["namespace"] for r in roles) == ["ml-a", "ml-b"]
    assert all(r["rules"] == rules["namespaced"] for r in roles)
    for binding in of_kind(rendered, "RoleBinding") + of_kind(rendered, "ClusterRoleBinding"):
        assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "rs-regserve", "namespace": "ops"}]
    (deployment,) = of_kind(rendered, "Deployment")
    args = deployment["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args == ["run", "--standalone", "--namespace", "ml-a", "--namespace", "ml-b"]


def test_namespaces_mode_defaults_to_the_release_namespace(helm_binary: Path) -> None:
    rendered = docs(helm_template(helm_binary, namespace="ops"))
    assert [r["metadata"]["namespace"] for r in of_kind(rendered, "Role")] == ["ops"]


def test_cluster_mode_grants_every_rule_cluster_wide(helm_binary: Path) -> None:
    rendered = docs(helm_template(helm_binary, "watch.mode=cluster"))
    assert not of_kind(rendered, "Role") and not of_kind(rendered, "RoleBinding")
    (cluster_role,) = _operator_cluster_roles(rendered)
    assert sorted(map(json.dumps, cluster_role["rules"])) == sorted(
        map(json.dumps, rbac.cluster_role()["rules"])
    )
    (deployment,) = of_kind(rendered, "Deployment")
    assert deployment["spec"]["template"]["spec"]["containers"][0]["args"][-1] == "--all-namespaces"


def test_no_rendering_lets_the_operator_list_or_watch_secrets(helm_binary: Path) -> None:
    for values in ([], ["watch.mode=cluster"]):
        rendered = docs(helm_template(helm_binary, *values))
        for rule in _rules_of(rendered, "ClusterRole") + _rules_of(rendered, "Role"):
            if "secrets" in rule["resources"] or "*" in rule["resources"]:
                assert rule["verbs"] == ["get"], rule
            assert "*" not in rule["verbs"] and "*" not in rule["resources"], rule


def test_deployment_is_single_hardened_and_probed(helm_binary: Path) -> None:
    rendered = docs(helm_template(helm_binary))
    (deployment,) = of_kind(rendered, "Deployment")
    spec = deployment["spec"]
    assert spec["replicas"] == 1 and spec["strategy"] == {"type": "Recreate"}
    pod = spec["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["serviceAccountName"] == "rs-regserve"
    (container,) = pod["containers"]
    sc = container["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"] == {"drop": ["ALL"]}
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert container[probe]["httpGet"]["port"] == "metrics"
    assert {m["mountPath"] for m in container["volumeMounts"]} == {"/tmp"}
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["REGSERVE_WEBHOOK_PORT"] == "0" and env["REGSERVE_METRICS_PORT"] == "9090"
    assert json.loads(env["REGSERVE_IMAGE_PINS"]) == {"mlflow": "3.17.2"}
    standard = {"app.kubernetes.io/name", "app.kubernetes.io/instance", "app.kubernetes.io/version"}
    for doc in rendered:
        assert standard <= set(doc["metadata"]["labels"]), doc["kind"]


def test_webhook_values_wire_the_secret_port_and_readiness(helm_binary: Path) -> None:
    rendered = docs(helm_template(helm_binary, "webhook.enabled=true", "webhook.existingSecret=hook"))
    (deployment,) = of_kind(rendered, "Deployment")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e for e in container["env"]}
    assert env["REGSERVE_WEBHOOK_PORT"]["value"] == "8080"
    assert env["REGSERVE_WEBHOOK_SECRET"]["valueFrom"]["secretKeyRef"] == {
        "name": "hook",
        "key": "webhook-secret",
    }
    assert container["readinessProbe"]["httpGet"] == {"path": "/healthz", "port": "webhook"}
    (service,) = of_kind(rendered, "Service")
    assert {p["name"]: p["targetPort"] for p in service["spec"]["ports"]} == {
        "metrics": "metrics",
        "webhook": "webhook",
    }


def test_service_monitor_is_optional(helm_binary: Path) -> None:
    assert not of_kind(docs(helm_template(helm_binary)), "ServiceMonitor")
    rendered = docs(helm_template(helm_binary, "metrics.serviceMonitor.enabled=true"))
    (monitor,) = of_kind(rendered, "ServiceMonitor")
    assert monitor["spec"]["endpoints"][0]["port"] == "metrics"


@pytest.mark.parametrize(
    ("values", "admission", "enabled"),
    [
        ((), True, True),
        (("policy.admission.enabled=false",), False, True),
        # One value turns the whole policy off, at admission and in the operator.
        (("policy.enabled=false",), False, False),
    ],
)
def test_tenant_policy_is_on_by_default_and_off_in_one_value(
    helm_binary: Path,
    values: tuple[str, ...],
    admission: bool,
    enabled: bool,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    rendered = docs(helm_template(helm_binary, *values))
    assert bool(of_kind(rendered, "ValidatingAdmissionPolicy")) is admission
    assert bool(of_kind(rendered, "ValidatingAdmissionPolicyBinding")) is admission
    (deployment,) = of_kind(rendered, "Deployment")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    for env in container["env"]:
        if env["name"].startswith("REGSERVE_POLICY_"):
            monkeypatch.setenv(env["name"], env["value"])
    policy = Settings().policy()  # the operator reads the chart's env as it is rendered
    assert policy.enabled is enabled
    assert (policy.images, policy.service_accounts, policy.allow_gpus, policy.max_replicas) == (
        (),
        (),
        False,
        8,
    )


def test_admission_policy_carries_the_operators_values(
    helm_binary: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    values = (
        "policy.allowedTrackingUriPrefixes={https://mlflow.example.com/}",
        "policy.allowedImages={a/b:1,c/d:2}",
        "policy.maxReplicas=3",
        "watch.namespaces={team-a,team-b}",
    )
    rendered = docs(helm_template(helm_binary, *values))
    (policy,) = of_kind(rendered, "ValidatingAdmissionPolicy")
    variables = {v["name"]: v["expression"] for v in policy["spec"]["variables"]}
    assert json.loads(variables["trackingUriPrefixes"]) == ["https://mlflow.example.com"]
    assert json.loads(variables["images"]) == ["a/b:1", "c/d:2"]
    assert any("<= 3" in v["expression"] for v in policy["spec"]["validations"])
    (binding,) = of_kind(rendered, "ValidatingAdmissionPolicyBinding")
    assert binding["spec"]["policyName"] == policy["metadata"]["name"]
    (selector,) = binding["spec"]["matchResources"]["namespaceSelector"]["matchExpressions"]
    assert selector["values"] == ["team-a", "team-b"]
    cluster = docs(helm_template(helm_binary, *values[:3], "watch.mode=cluster"))
    assert "matchResources" not in of_kind(cluster, "ValidatingAdmissionPolicyBinding")[0]["spec"]
    (deployment,) = of_kind(rendered, "Deployment")
    for env in deployment["spec"]["template"]["spec"]["containers"][0]["env"]:
        if env["name"].startswith("REGSERVE_POLICY_"):
            monkeypatch.setenv(env["name"], env["value"])
    operator = Settings().policy()
    assert operator.images == ("a/b:1", "c/d:2") and operator.max_replicas == 3
    assert operator.tracking_uri_prefixes == ("https://mlflow.example.com/",)


def test_network_policy_is_optional_and_selects_the_ray_pods(helm_binary: Path) -> None:
    assert not of_kind(docs(helm_template(helm_binary)), "NetworkPolicy")
    rendered = docs(
        helm_template(helm_binary, "networkPolicy.enabled=true", "watch.namespaces={team-a,team-b}")
    )
    policies = of_kind(rendered, "NetworkPolicy")
    assert [p["metadata"]["namespace"] for p in policies] == ["team-a", "team-b"]
    spec = policies[0]["spec"]
    assert spec["podSelector"] == {"matchLabels": {"app.kubernetes.io/managed-by": "regserve"}}
    by_ports = {
        tuple(sorted(p["port"] for p in rule.get("ports", []))): rule["from"] for rule in spec["ingress"]
    }
    assert by_ports[(8000,)] == [{"namespaceSelector": {"matchLabels": {"regserve.io/clients": "true"}}}]
    head = by_ports[(6379, 8000, 8265, 10001, 52365)]
    assert [peer["namespaceSelector"]["matchLabels"] for peer in head] == [
        {"kubernetes.io/metadata.name": "regserve-system"},
        {"kubernetes.io/metadata.name": "kuberay-system"},
    ]
    failed = run_status(
        [
            helm_binary,
            "template",
            "rs",
            CHART,
            "--set",
            "networkPolicy.enabled=true",
            "--set",
            "watch.mode=cluster",
        ]
    )
    assert failed.returncode != 0 and "networkPolicy.namespaces is required" in failed.stderr


def test_hadolint_passes_on_the_dockerfile() -> None:
    out = run([VENV_BIN / "hadolint", "--failure-threshold", "info", ROOT / "Dockerfile"])
    assert out.strip() == ""
    # The same invocation does fail on a violation (unpinned pip install), so a clean run means something.
    bad = run_status(
        [VENV_BIN / "hadolint", "--failure-threshold", "info", "-"],
        stdin="FROM python:3.11-slim\nRUN pip install requests\n",
        timeout=30,
    )
    assert bad.returncode != 0 and "DL3013" in bad.stdout, bad.stdout


def test_dockerfile_has_both_targets_pinned_installs_and_non_root_users() -> None:
    text = (ROOT / "Dockerfile").read_text()
    assert "AS operator\n" in text and "AS serving\n" in text
    assert "FROM rayproject/ray:${RAY_IMAGE_TAG} AS serving" in text
    assert "ARG RAY_IMAGE_TAG=2.60.0-py311" in text
    installs = [line for line in text.splitlines() if "pip install" in line]
    assert installs and all("-c constraints.txt" in line or "--no-deps" in line for line in installs)
    # The serving image runs as the uid and gid the operator's Ray pods ask for (runAsNonRoot).
    assert "USER 10001:10001" in text and f"USER {RAY_UID}:{RAY_GID}\n" in text


def test_kustomize_base_renders(tmp_path: Path) -> None:
    rendered = docs(run([KUBECTL, "kustomize", ROOT / "deploy"]))
    kinds = sorted({d["kind"] for d in rendered})
    assert {
        "Namespace",
        "ServiceAccount",
        "ClusterRole",
        "ClusterRoleBinding",
        "Deployment",
        "Service",
    } <= set(kinds)
