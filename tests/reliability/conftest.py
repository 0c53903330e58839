"""One phrasebook application shared by the bad-input and schemathesis modules (deployed once per package)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import pytest
from regserve_operator.sandbox.mlflow_server import MlflowServer
from regserve_operator.sandbox.models import log_phrasebook

from tests.serving.conftest import app_config
from tests.support.ray_cluster import LocalRay, deployed_app

MODEL = "reliability_phrasebook"
APP = "reliability"


@dataclass
class Phrasebook:
    url: str
    default: str
    broken: str

    def healthy(self) -> bool:
        """The replica still answers a good request exactly, and its health probe says ok."""
        answer = httpx.post(f"{self.url}/serve", json={"prompt": "Hello"}, timeout=60)
        health = httpx.get(f"{self.url}/healthz", timeout=30)
        return (
            answer.status_code == 200
            and answer.json() == [{"translation_text": "Hallo"}]
            and health.json() == {"status": "ok", "default_version": self.default}
        )


@pytest.fixture(scope="package")
def phrasebook(mlflow_server: MlflowServer, local_ray: LocalRay) -> Iterator[Phrasebook]:
    default = log_phrasebook(mlflow_server.url, MODEL, lang_to="de")
    broken = log_phrasebook(mlflow_server.url, MODEL, lang_to="de", fail_on_load=True)
    config = app_config(APP, model_name=MODEL, tracking_uri=mlflow_server.url, default_version=default)
    with deployed_app(local_ray, config) as url:
        yield Phrasebook(url, default, broken)
