"""The registry goes away while serving: loaded versions keep answering; new loads get 503 + Retry-After."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from regserve_operator.sandbox.mlflow_server import MlflowServer
from regserve_operator.sandbox.models import log_phrasebook

from tests.serving.conftest import app_config
from tests.support.ray_cluster import LocalRay, deployed_app

pytestmark = pytest.mark.ray

MODEL = "fragile_registry"


@pytest.fixture(scope="module")
def private_mlflow(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowServer]:
    server = MlflowServer(root=Path(tmp_path_factory.mktemp("mlflow-faults")))
    server.start()
    try:
        yield server
    finally:
        server.stop()


def test_registry_down_then_back(private_mlflow: MlflowServer, local_ray: LocalRay) -> None:
    v1 = log_phrasebook(private_mlflow.url, MODEL, lang_to="de")
    v2 = log_phrasebook(private_mlflow.url, MODEL, lang_to="fr")
    config = app_config("fragile", model_name=MODEL, tracking_uri=private_mlflow.url, default_version=v1)
    with deployed_app(local_ray, config) as app:
        url = f"{app}/serve"
        private_mlflow.stop()
        default = httpx.post(url, json={"prompt": "Hello"}, timeout=60)
        assert default.json() == [{"translation_text": "Hallo"}]
        pinned = httpx.post(
            url, json={"prompt": "Hello"}, headers={"serve-multiplexed-model-id": v2}, timeout=60
        )
        assert pinned.status_code == 503, pinned.text
        assert pinned.json()["error"] == "registry_unavailable"
        assert int(pinned.headers["retry-after"]) > 0
        private_mlflow.start()
        recovered = httpx.post(
            url, json={"prompt": "Hello"}, headers={"serve-multiplexed-model-id": v2}, timeout=60
        )
        assert recovered.json() == [{"translation_text": "Bonjour"}]
