"""The one builder of RegisteredModelServing manifests (demo, benchmarks, tests, the deployments plugin)
and the YAML files written from them."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from regserve_operator import local
from regserve_operator.spec import manifest, manifests_yaml, parse_spec

SPEC = {"model": {"name": "m", "alias": "champion"}, "registry": {"trackingUri": "http://127.0.0.1:5000"}}


@dataclass(frozen=True)
class Case:
    name: str
    spec: dict[str, Any]
    kwargs: dict[str, Any] = field(default_factory=dict)
    metadata: dict[str, Any] = field(default_factory=dict)


CASES = [
    Case("name only", SPEC, metadata={"name": "r"}),
    Case("namespace", SPEC, {"namespace": "ml"}, {"name": "r", "namespace": "ml"}),
    Case("labels", SPEC, {"labels": {"team": "a"}}, {"name": "r", "labels": {"team": "a"}}),
    Case(
        "namespace and labels",
        SPEC,
        {"namespace": "ml", "labels": {"team": "a"}},
        {"name": "r", "namespace": "ml", "labels": {"team": "a"}},
    ),
    Case("empty labels are still given", SPEC, {"labels": {}}, {"name": "r", "labels": {}}),
    # Tests send specs the API server must refuse: the builder passes them on as they are.
    Case("invalid spec kept as given", {"model": {"name": "m"}, "replicas": -1}, metadata={"name": "r"}),
    Case("empty spec", {}, metadata={"name": "r"}),
]


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.name)
def test_manifest(case: Case) -> None:
    built = manifest("r", case.spec, **case.kwargs)
    assert built == {
        "apiVersion": "regserve.io/v1alpha1",
        "kind": "RegisteredModelServing",
        "metadata": case.metadata,
        "spec": case.spec,
    }


def test_the_manifest_owns_its_spec() -> None:
    """Callers edit a built manifest (a field the API server must refuse): their spec stays as it was."""
    spec = {"registry": {"trackingUri": "http://127.0.0.1:5000"}}
    labels = {"team": "a"}
    built = manifest("r", spec, labels=labels)
    built["spec"]["registry"]["trackingUri"] = "http://user:pw@mlflow"
    built["metadata"]["labels"]["team"] = "b"
    assert spec == {"registry": {"trackingUri": "http://127.0.0.1:5000"}}
    assert labels == {"team": "a"}


@pytest.mark.parametrize(
    ("name", "manifests"),
    [
        ("none", []),
        ("one", [manifest("one", SPEC)]),
        ("several", [manifest("one", SPEC), manifest("two", SPEC, namespace="ml", labels={"team": "a"})]),
    ],
)
def test_yaml_reads_back_as_the_manifests(name: str, manifests: list[dict[str, Any]]) -> None:
    text = manifests_yaml(*manifests)
    assert list(yaml.safe_load_all(text)) == manifests, name
    assert "&id" not in text and "*id" not in text, text


def test_a_value_met_twice_is_written_out_twice() -> None:
    registry = {"trackingUri": "http://127.0.0.1:5000"}
    text = manifests_yaml(manifest("r", {"registry": registry, "other": registry}))
    assert "&" not in text and "*" not in text, text
    assert text.count("trackingUri: http://127.0.0.1:5000") == 2


def test_local_mode_reads_the_file_written(tmp_path: Path) -> None:
    path = tmp_path / "rms.yaml"
    path.write_text(manifests_yaml(manifest("one", SPEC), manifest("two", SPEC, namespace="ml")))
    resources = local.load_resources(path)
    assert [(r.owner.namespace, r.owner.name) for r in resources] == [("default", "one"), ("ml", "two")]
    assert all(r.spec == parse_spec(SPEC) for r in resources)
