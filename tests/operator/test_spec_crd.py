"""The CRD is generated from spec.py; the checked-in copy must match, and the schema must be structural."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import ValidationError
from regserve_operator import crd
from regserve_operator.spec import RegisteredModelServingSpec, parse_spec

ROOT = Path(__file__).resolve().parents[2]
CRD_FILE = ROOT / "crds" / "regserve.io_registeredmodelservings.yaml"

BASE: dict[str, Any] = {
    "model": {"name": "m", "alias": "champion"},
    "registry": {"trackingUri": "http://mlflow:5000"},
}


def test_checked_in_crd_matches_generator() -> None:
    assert CRD_FILE.read_text() == crd.crd_yaml(), "crds/ is stale: run `regserve crd > crds/...yaml`"


def _walk(node: Any, path: str = "") -> list[tuple[str, dict[str, Any]]]:
    out = []
    if isinstance(node, dict):
        out.append((path, node))
        for key, value in node.get("properties", {}).items():
            out += _walk(value, f"{path}.{key}")
        if isinstance(node.get("items"), dict):
            out += _walk(node["items"], f"{path}[]")
        if isinstance(node.get("additionalProperties"), dict):
            out += _walk(node["additionalProperties"], f"{path}{{}}")
    return out


def test_schema_is_structural() -> None:
    schema = crd.crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    for path, node in _walk(schema):
        assert "type" in node, f"{path} has no type"
        for banned in ("$ref", "anyOf", "allOf", "oneOf", "title", "$defs"):
            assert banned not in node, f"{path} has {banned}"
    status = schema["properties"]["status"]
    assert status["x-kubernetes-preserve-unknown-fields"] is True


def test_names_and_columns() -> None:
    body = crd.crd()
    assert body["metadata"]["name"] == "registeredmodelservings.regserve.io"
    names = body["spec"]["names"]
    assert (names["kind"], names["plural"], names["shortNames"]) == (
        "RegisteredModelServing",
        "registeredmodelservings",
        ["rms"],
    )
    version = body["spec"]["versions"][0]
    assert version["name"] == "v1alpha1" and version["subresources"] == {"status": {}}
    assert [c["name"] for c in version["additionalPrinterColumns"]] == [
        "Model",
        "Selector",
        "Serving",
        "Ready",
        "Rollout",
        "Weight",
        "Age",
    ]


def test_selector_rule_present() -> None:
    model = crd.crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"][
        "model"
    ]
    rules = [v["rule"] for v in model["x-kubernetes-validations"]]
    assert any("has(self.alias)" in r and "has(self.version)" in r for r in rules)


def _serving_schema() -> dict[str, Any]:
    spec = crd.crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    schema: dict[str, Any] = spec["properties"]["serving"]
    return schema


def test_autoscaling_rules_present() -> None:
    serving = _serving_schema()
    assert "default" not in serving["properties"]["replicas"], (
        "a default would always trip the exclusion rule"
    )
    assert [v["rule"] for v in serving["x-kubernetes-validations"]] == [
        "!(has(self.replicas) && has(self.autoscaling))"
    ]
    autoscaling = serving["properties"]["autoscaling"]
    assert [v["rule"] for v in autoscaling["x-kubernetes-validations"]] == [
        "self.minReplicas <= self.maxReplicas"
    ]
    assert autoscaling["required"] == ["maxReplicas"]
    assert autoscaling["properties"]["minReplicas"] == {
        **autoscaling["properties"]["minReplicas"],
        "minimum": 0,
    }


def _with(**changes: Any) -> dict[str, Any]:
    body = yaml.safe_load(yaml.safe_dump(BASE))
    for dotted, value in changes.items():
        node = body
        *parents, leaf = dotted.split("__")
        for key in parents:
            node = node.setdefault(key, {})
        if value is None:
            node.pop(leaf, None)
        else:
            node[leaf] = value
    return body


@pytest.mark.parametrize(
    ("case", "body", "ok"),
    [
        ("alias", _with(), True),
        ("version", _with(model__alias=None, model__version="3"), True),
        ("stage", _with(model__alias=None, model__stage="Production"), True),
        ("two selectors", _with(model__version="3"), False),
        ("no selector", _with(model__alias=None), False),
        ("bad stage", _with(model__alias=None, model__stage="Prod"), False),
        ("version not a number", _with(model__alias=None, model__version="v3"), False),
        ("no tracking uri", {"model": {"name": "m", "alias": "a"}, "registry": {}}, False),
        ("file uri refused", _with(registry__trackingUri="file:///tmp/x"), False),
        ("user and password refused", _with(registry__trackingUri="https://u:p@mlflow:5000"), False),
        ("token as user refused", _with(registry__trackingUri="http://token@mlflow"), False),
        ("@ in the path is no userinfo", _with(registry__trackingUri="http://mlflow:5000/a@b"), True),
        ("query refused", _with(registry__trackingUri="http://mlflow:5000/?token=x"), False),
        ("dot segment refused", _with(registry__trackingUri="http://mlflow/team-a/../team-b"), False),
        ("percent-encoding refused", _with(registry__trackingUri="http://mlflow/team-a/%2e%2e/b"), False),
        ("dots inside a segment", _with(registry__trackingUri="http://mlflow/v1..2/x"), True),
        ("newline in model name refused", _with(model__name="m\nINFO forged"), False),
        ("poll too fast", _with(registry__pollIntervalSeconds=1), False),
        ("zero replicas", _with(serving__replicas=0), False),
        ("batch too big", _with(serving__batching={"maxBatchSize": 5000}), False),
        ("ingress enum", _with(serving__ingressMode="envoy"), False),
        ("ingress haproxy", _with(serving__ingressMode="haproxy"), True),
        ("route prefix must start with /", _with(serving__routePrefix="x"), False),
        ("accelerator enum", _with(resources__accelerator="tpu"), False),
        ("multiplier below 1", _with(resources__memoryMultiplier=0.5), False),
        ("upgrade strategy enum", _with(rayService__upgradeStrategy={"type": "Rolling"}), False),
        ("typo refused", _with(serving__replica=2), False),
        ("autoscaling", _with(serving__autoscaling={"minReplicas": 1, "maxReplicas": 8}), True),
        ("scale to zero", _with(serving__autoscaling={"minReplicas": 0, "maxReplicas": 2}), True),
        ("autoscaling needs maxReplicas", _with(serving__autoscaling={"minReplicas": 1}), False),
        ("min above max", _with(serving__autoscaling={"minReplicas": 3, "maxReplicas": 2}), False),
        ("default min above max", _with(serving__autoscaling={"maxReplicas": 0}), False),
        (
            "replicas and autoscaling",
            _with(serving__replicas=2, serving__autoscaling={"minReplicas": 1, "maxReplicas": 2}),
            False,
        ),
        ("negative min", _with(serving__autoscaling={"minReplicas": -1, "maxReplicas": 2}), False),
        ("zero target", _with(serving__autoscaling={"maxReplicas": 2, "targetOngoingRequests": 0}), False),
        ("canary", _with(rollout__strategy="Canary"), True),
        (
            "shadow gated",
            _with(rollout__strategy="Shadow", rollout__shadow={"maxDisagreementRate": 0.05}),
            True,
        ),
        ("strategy enum", _with(rollout__strategy="BlueGreen"), False),
        ("steps increasing", _with(rollout__canary={"steps": [1, 5, 99]}), True),
        ("steps decreasing", _with(rollout__canary={"steps": [50, 10]}), False),
        ("steps repeated", _with(rollout__canary={"steps": [10, 10]}), False),
        ("step 0", _with(rollout__canary={"steps": [0, 10]}), False),
        ("step 100", _with(rollout__canary={"steps": [10, 100]}), False),
        ("no steps", _with(rollout__canary={"steps": []}), False),
        ("error rate above 1", _with(rollout__canary={"maxErrorRate": 1.5}), False),
        ("latency ratio below 1", _with(rollout__canary={"maxLatencyRatio": 0.5}), False),
        ("zero min requests", _with(rollout__canary={"minRequests": 0}), False),
        ("shadow percent 0", _with(rollout__shadow={"percent": 0}), False),
        ("disagreement rate negative", _with(rollout__shadow={"maxDisagreementRate": -0.1}), False),
    ],
)
def test_spec_validation(case: str, body: dict[str, Any], ok: bool) -> None:
    if ok:
        parse_spec(body)
    else:
        with pytest.raises(ValidationError):
            parse_spec(body)


def test_defaults_fill_in() -> None:
    spec = parse_spec(BASE)
    assert spec.serving.ingress_mode == "haproxy"
    assert spec.serving.max_models_per_replica == 2
    assert spec.registry.poll_interval_seconds == 30
    assert spec.paused is False
    rollout = spec.rollout
    assert (rollout.strategy, rollout.smoke_test) == ("Immediate", True)
    assert rollout.canary.steps == [10, 50] and rollout.canary.step_seconds == 60
    assert (rollout.canary.min_requests, rollout.canary.max_error_rate) == (20, 0.01)
    assert rollout.canary.max_latency_ratio == 2.0
    assert (rollout.shadow.percent, rollout.shadow.duration_seconds) == (100, 300)
    assert rollout.shadow.max_disagreement_rate is None


def test_canary_steps_rule_in_the_crd() -> None:
    rollout = crd.crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"][
        "properties"
    ]["rollout"]
    steps = rollout["properties"]["canary"]["properties"]["steps"]
    assert steps["items"] == {"type": "integer", "minimum": 1, "maximum": 99}
    assert steps["default"] == [10, 50]
    assert [v["rule"] for v in steps["x-kubernetes-validations"]] == [
        "self.isSorted() && self.all(x, self.filter(y, y == x).size() == 1)"
    ]


@pytest.mark.parametrize(
    ("model", "text"),
    [
        ({"name": "m", "alias": "champion"}, "@champion"),
        ({"name": "m", "stage": "Production"}, "stage:Production"),
        ({"name": "m", "version": "7"}, "v7"),
    ],
)
def test_selector_text(model: dict[str, str], text: str) -> None:
    assert RegisteredModelServingSpec.model_validate({**BASE, "model": model}).model.selector_text() == text
