"""Target and model URIs, table-tested."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from regserve_operator.deploy.uris import ModelSelector, Target, UriError, parse_model_uri, parse_target


@dataclass(frozen=True)
class TargetCase:
    uri: str
    want: Target | None  # None: refused


TARGETS = [
    TargetCase("regserve", Target("kube", None)),
    TargetCase("regserve:/", Target("kube", None)),
    TargetCase("regserve:/kuberay-ray", Target("kube", "kuberay-ray")),
    TargetCase("regserve-local", Target("local", None)),
    TargetCase("regserve-local:/team-a", Target("local", "team-a")),
    TargetCase("regserve:/Team_A", None),  # not a DNS label
    TargetCase("regserve://host/ns", None),
    TargetCase("regserve:/ns?context=x", None),
    TargetCase("sagemaker", None),
    TargetCase("regserve:/" + "a" * 64, None),
]


@pytest.mark.parametrize("case", TARGETS, ids=[c.uri[:30] for c in TARGETS])
def test_target_uris(case: TargetCase) -> None:
    if case.want is None:
        with pytest.raises(UriError):
            parse_target(case.uri)
    else:
        assert parse_target(case.uri) == case.want


@dataclass(frozen=True)
class ModelCase:
    uri: str
    want: ModelSelector | None
    says: str = ""  # a part of the refusal a user acts on


MODELS = [
    ModelCase("models:/translator@champion", ModelSelector("translator", alias="champion")),
    ModelCase("models:/translator/Production", ModelSelector("translator", stage="Production")),
    ModelCase("models:/translator/staging", ModelSelector("translator", stage="Staging")),
    ModelCase("models:/translator/12", ModelSelector("translator", version="12")),
    ModelCase("models:/my model@v2-a", ModelSelector("my model", alias="v2-a")),
    ModelCase("runs:/abc/model", None, "Register the model"),
    ModelCase("/tmp/model", None, "Register the model"),
    ModelCase("s3://bucket/model", None, "Register the model"),
    ModelCase("models://profile/translator/1", None, "trackingUri"),
    ModelCase("models:/translator/latest", None, "alias"),
    ModelCase("models:/translator/0", None, "neither a version nor a stage"),
    ModelCase("models:/translator", None, "expected models:/"),
    ModelCase("models:/a/b/c", None, "expected models:/"),
    ModelCase("models:/translator@", None, "expected models:/"),
    ModelCase("models:/translator@a b", None, "expected models:/"),
    ModelCase("models:/translator/1?x=1", None, "no query"),
]


@pytest.mark.parametrize("case", MODELS, ids=[c.uri for c in MODELS])
def test_model_uris(case: ModelCase) -> None:
    if case.want is None:
        with pytest.raises(UriError, match=case.says):
            parse_model_uri(case.uri)
    else:
        assert parse_model_uri(case.uri) == case.want


def test_selector_to_spec_names_one_pointer() -> None:
    assert ModelSelector("m", alias="champion").to_spec() == {"name": "m", "alias": "champion"}
    assert ModelSelector("m", version="3").to_spec() == {"name": "m", "version": "3"}
