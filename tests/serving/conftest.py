"""Helpers for serving tests (the `local_ray` fixture lives in tests/conftest.py)."""

from __future__ import annotations

from typing import Any

from regserve_operator.builders import replica_process_options


def app_config(
    name: str, *, model_name: str, tracking_uri: str, default_version: str, **args: Any
) -> dict[str, Any]:
    """A Serve application config as the operator writes it: args fixed, the version in user_config,
    the replica's env and the access log as the operator sets them."""
    return {
        "name": name,
        "route_prefix": f"/{name}",
        "import_path": "serving_app.app:build_app",
        "args": {"model_name": model_name, "tracking_uri": tracking_uri, **args},
        "deployments": [
            {
                "name": "ModelServer",
                "user_config": {"default_version": default_version},
                **replica_process_options({"num_cpus": 0.5}, access_log=False),
            }
        ],
    }
