"""Shared builders for operator unit tests."""

from __future__ import annotations

from typing import Any

from regserve_operator.builders import BuildDefaults, Owner
from regserve_operator.spec import RegisteredModelServingSpec, parse_spec

OWNER = Owner(name="translator", namespace="ml", uid="uid-1")
DEFAULTS = BuildDefaults(image="regserve/ray:test", ray_version="2.60.0")


def make_spec(**overrides: Any) -> RegisteredModelServingSpec:
    body: dict[str, Any] = {
        "model": {"name": "translation_model", "alias": "champion"},
        "registry": {"trackingUri": "http://mlflow:5000", "credentialsSecretRef": {"name": "mlflow-auth"}},
    }
    for key, value in overrides.items():
        body[key] = value
    return parse_spec(body)
