"""Fixtures for serving tests: a real local Ray (with Serve and its dashboard) and deployed models."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from tests.support.ray_cluster import LocalRay, start_local_ray, stop_local_ray


@pytest.fixture(scope="session")
def local_ray() -> Iterator[LocalRay]:
    cluster = start_local_ray()
    try:
        yield cluster
    finally:
        stop_local_ray()


def app_config(
    name: str, *, model_name: str, tracking_uri: str, default_version: str, **args: Any
) -> dict[str, Any]:
    """A Serve application config as the operator writes it: args fixed, the version in user_config."""
    return {
        "name": name,
        "route_prefix": f"/{name}",
        "import_path": "serving_app.app:build_app",
        "args": {"model_name": model_name, "tracking_uri": tracking_uri, **args},
        "deployments": [{"name": "ModelServer", "user_config": {"default_version": default_version}}],
    }
