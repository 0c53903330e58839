"""A real `mlflow server` (sqlite, webhooks on) for operator tests, and helpers to register tiny models.

Stand-in until the shared `mlflow_server` fixture lands in tests/conftest.py; same interface
(`.url`, `.env`, `.stop()`).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

MODELS = Path(__file__).parent / "models"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class MlflowServer:
    url: str
    process: subprocess.Popen[bytes]
    env: dict[str, str] = field(default_factory=dict)
    log_path: Path | None = None

    def stop(self) -> None:
        if self.process.poll() is None:
            # mlflow starts helper processes (huey consumers): stop the whole group.
            with _suppress():
                os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                with _suppress():
                    os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=10)
        with _suppress():
            os.killpg(self.process.pid, signal.SIGKILL)  # stragglers left in the group


class _suppress:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: Any) -> bool:
        return exc[0] is not None and issubclass(exc[0], ProcessLookupError | PermissionError)


def start_mlflow(tmp: Path, deadline_s: float = 120.0) -> MlflowServer:
    from cryptography.fernet import Fernet

    port = free_port()
    env = {
        "MLFLOW_WEBHOOK_SECRET_ENCRYPTION_KEY": Fernet.generate_key().decode(),
        "MLFLOW_WEBHOOK_CACHE_TTL": "0",
        "MLFLOW_WEBHOOK_ALLOWED_SCHEMES": "http,https",
        "MLFLOW_WEBHOOK_ALLOW_PRIVATE_IPS": "true",
    }
    log_path = tmp / "mlflow.log"
    mlflow_bin = Path(sys.executable).parent / "mlflow"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [
                str(mlflow_bin),
                "server",
                "--backend-store-uri",
                f"sqlite:///{tmp}/mlflow.db",
                "--default-artifact-root",
                str(tmp / "artifacts"),
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--workers",
                "1",
            ],
            env={**os.environ, **env},
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    server = MlflowServer(url=f"http://127.0.0.1:{port}", process=process, env=env, log_path=log_path)
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"mlflow server exited: {log_path.read_text()[-2000:]}")
        try:
            if httpx.get(f"{server.url}/health", timeout=1).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        time.sleep(0.2)  # polling interval while waiting for startup, not synchronisation
    server.stop()
    raise RuntimeError(f"mlflow server not healthy in {deadline_s}s: {log_path.read_text()[-2000:]}")


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
