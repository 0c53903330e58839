"""A real `mlflow server` (sqlite backend, proxied artifacts, webhooks enabled) for the demo and tests."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from subprocess import Popen

import httpx
from cryptography.fernet import Fernet

from regserve_operator.sandbox.processes import free_port, start, stop, wait_for


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
        self.process = start(args, log=self.log, env=self.env, cwd=self.root)
        try:
            wait_for(
                self._healthy,
                timeout=240,
                interval=0.25,
                message=f"mlflow server on {self.url} (log {self.log})",
            )
        except BaseException:
            self.stop()  # callers never reach their own stop() when start() fails
            raise
        return self

    def _healthy(self) -> bool:
        if self.process is not None and self.process.poll() is not None:
            raise RuntimeError(f"mlflow server exited: {self.log.read_text()[-2000:]}")
        return httpx.get(f"{self.url}/health", timeout=2).status_code == 200

    def stop(self) -> None:
        if self.process is not None:
            stop(self.process)
            self.process = None

    def restart(self) -> None:
        self.stop()
        self.start()
