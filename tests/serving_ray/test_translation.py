"""The seed's translation path for real: transformers + a tiny local T5, through MLflow and Ray Serve."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
from regserve_operator.sandbox.mlflow_server import MlflowServer
from regserve_operator.sandbox.models import log_tiny_translator

from serving_app.examples.tiny_t5 import build_tiny_t5
from tests.serving.conftest import app_config
from tests.support.ray_cluster import LocalRay, deployed_app

pytestmark = pytest.mark.ray


def test_tiny_t5_translates_through_the_endpoint(
    mlflow_server: MlflowServer, local_ray: LocalRay, tmp_path: Path
) -> None:
    model_dir = build_tiny_t5(tmp_path / "tiny")
    de = log_tiny_translator(mlflow_server.url, "t5_translation", model_dir, lang_to="de")
    fr = log_tiny_translator(mlflow_server.url, "t5_translation", model_dir, lang_to="fr")
    config = app_config("t5", model_name="t5_translation", tracking_uri=mlflow_server.url, default_version=de)
    with deployed_app(local_ray, config) as app:
        url = f"{app}/serve"
        prompts = [{"prompt": "The weather is lovely today"}, {"prompt": "Hello my name is Jonathan"}]
        for version in (de, fr):
            response = httpx.post(
                url, json=prompts, headers={"serve-multiplexed-model-id": version}, timeout=120
            )
            assert response.status_code == 200, response.text
            answers = response.json()
            assert len(answers) == 2
            assert all(set(answer) == {"translation_text"} for answer in answers)
            assert all(isinstance(answer["translation_text"], str) for answer in answers)
            assert response.headers["x-model-version"] == version
