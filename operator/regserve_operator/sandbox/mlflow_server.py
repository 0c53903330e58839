"""A real `mlflow server` (sqlite backend, proxied artifacts, webhooks enabled) for the demo and tests."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from subprocess import Popen

import httpx
from cryptography.fernet import Fernet

from regserve_operator.sandbox.processes import free_port, start_and_wait, stop


@dataclass
class MlflowServer:
    root: Path
    port: int = field(default_factory=free_port)
    process: Popen[bytes] | None = None
    encryption_key: str = field(default_factory=lambda: Fernet.generate_key().decode())
    host: str = "127.0.0.1"

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def log(self) -> Path:
        return self.root / "mlflow-server.log"

    @property
    def env(self) -> dict[str, str]:
        return {
            # One key for every worker, or each encrypts webhook secrets with its own and deliveries fail.
            "MLFLOW_WEBHOOK_SECRET_ENCRYPTION_KEY": self.encryption_key,
            "MLFLOW_WEBHOOK_CACHE_TTL": "0",
            "MLFLOW_WEBHOOK_ALLOWED_SCHEMES": "http,https",
            "MLFLOW_WEBHOOK_ALLOW_PRIVATE_IPS": "true",
        }

    def start(self) -> MlflowServer:
        self.root.mkdir(parents=True, exist_ok=True)
        artifacts = self.root / "artifacts"
        args = [
            sys.executable, "-m", "mlflow", "server",
            "--backend-store-uri", f"sqlite:///{self.root / 'mlflow.db'}",
            "--artifacts-destination", str(artifacts),
            "--host", self.host, "--port", str(self.port),
            "--workers", "1",
        ]  # fmt: skip
        self.process = start_and_wait(
            args,
            log=self.log,
            ready=self._healthy,
            what=f"mlflow server on {self.url} (log {self.log})",
            timeout=240,
            env=self.env,
            cwd=self.root,
        )
        return self

    def _healthy(self) -> bool:
        return httpx.get(f"{self.url}/health", timeout=2).status_code == 200

    def stop(self) -> None:
        if self.process is not None:
            stop(self.process)
            self.process = None

    def restart(self) -> None:
        self.stop()
        self.start()
