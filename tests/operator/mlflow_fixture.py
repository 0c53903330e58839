"""Helpers to register tiny models in the shared `mlflow_server` (tests/conftest.py)."""

from __future__ import annotations

import socket
from pathlib import Path

MODELS = Path(__file__).parent / "models"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def log_version(
    tracking_uri: str, model_name: str, columns: dict[str, str], *, alias: str | None = None
) -> str:
    """Register a tiny echo pyfunc with input columns `columns` (name -> mlflow type); returns its version."""
    import mlflow
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ColSpec, Schema

    mlflow.set_tracking_uri(tracking_uri)
    signature = ModelSignature(
        inputs=Schema([ColSpec(type_, name) for name, type_ in columns.items()]),
        outputs=Schema([ColSpec("string", "echo")]),
    )
    with mlflow.start_run():
        info = mlflow.pyfunc.log_model(
            name="model",
            python_model=str(MODELS / "echo_model.py"),
            signature=signature,
            pip_requirements=["mlflow==3.17.2", "pandas"],
            registered_model_name=model_name,
        )
    version = str(info.registered_model_version)
    if alias:
        mlflow.MlflowClient(tracking_uri).set_registered_model_alias(model_name, alias, version)
    return version
