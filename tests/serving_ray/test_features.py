"""An sklearn pipeline (tensor in, tensor out) with batching, bearer auth and the schema hidden in errors."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import httpx
import mlflow
import numpy as np
import pytest
from regserve_operator.sandbox.mlflow_server import MlflowServer
from regserve_operator.sandbox.models import log_sklearn_classifier
from regserve_operator.sandbox.processes import wait_for

from tests.serving.conftest import app_config
from tests.support.ray_cluster import LocalRay, deployed_app

pytestmark = pytest.mark.ray

MODEL = "iris_like"
TOKEN = "s3cret-token"


@dataclass
class Classifier:
    url: str
    version: str
    samples: Any
    expected: Any

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def classifier(mlflow_server: MlflowServer, local_ray: LocalRay) -> Iterator[Classifier]:
    version, samples, expected = log_sklearn_classifier(mlflow_server.url, MODEL)
    config = app_config(
        "classifier",
        model_name=MODEL,
        tracking_uri=mlflow_server.url,
        default_version=version,
        max_batch_size=16,
        batch_wait_timeout_s=0.02,
        auth_token_env="REGSERVE_SERVING_TOKEN",
        expose_schema_in_errors=False,
    )
    config["runtime_env"] = {"env_vars": {"REGSERVE_SERVING_TOKEN": TOKEN}}
    with deployed_app(local_ray, config) as url:
        yield Classifier(url, version, samples, expected)


def test_requests_need_the_bearer_token(classifier: Classifier) -> None:
    row = classifier.samples[0].tolist()
    missing = httpx.post(f"{classifier.url}/serve", json=row)
    assert missing.status_code == 401
    assert missing.headers["www-authenticate"] == "Bearer"
    wrong = httpx.post(f"{classifier.url}/serve", json=row, headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401
    assert httpx.get(f"{classifier.url}/metadata").status_code == 401
    assert httpx.get(f"{classifier.url}/healthz").status_code == 200  # probes carry no token
    # MLflow's scoring-server probes stay open too; the software version is for token holders.
    assert httpx.get(f"{classifier.url}/ping").status_code == 200
    assert httpx.get(f"{classifier.url}/health").status_code == 200
    assert httpx.get(f"{classifier.url}/version").status_code == 401
    version = httpx.get(f"{classifier.url}/version", headers=classifier.auth)
    assert (version.status_code, version.text) == (200, mlflow.__version__)


def test_tensor_rows_match_the_pipeline(classifier: Classifier) -> None:
    one = httpx.post(f"{classifier.url}/serve", json=classifier.samples[0].tolist(), headers=classifier.auth)
    assert one.status_code == 200, one.text
    assert one.json() == [int(classifier.expected[0])]
    many = httpx.post(f"{classifier.url}/serve", json=classifier.samples.tolist(), headers=classifier.auth)
    assert many.json() == classifier.expected.tolist()
    scoring = httpx.post(
        f"{classifier.url}/invocations", json={"inputs": classifier.samples.tolist()}, headers=classifier.auth
    )
    assert scoring.json() == {"predictions": classifier.expected.tolist()}


def test_concurrent_requests_are_batched_with_identical_answers(classifier: Classifier) -> None:
    def predict(index: int) -> int:
        response = httpx.post(
            f"{classifier.url}/serve",
            json=classifier.samples[index].tolist(),
            headers=classifier.auth,
            timeout=60,
        )
        assert response.status_code == 200, response.text
        return int(response.json()[0])

    with ThreadPoolExecutor(max_workers=16) as pool:
        for _ in range(3):
            answers = list(pool.map(predict, range(len(classifier.samples))))
            assert answers == classifier.expected.tolist()
    batching = httpx.get(f"{classifier.url}/metadata", headers=classifier.auth).json()["batching"]
    assert batching["largest_batch"] > 1
    assert batching["model_calls"] < 3 * len(classifier.samples) + 3


def test_errors_hide_the_schema_when_configured(classifier: Classifier) -> None:
    short_row = httpx.post(f"{classifier.url}/serve", json=[1.0, 2.0], headers=classifier.auth)
    assert short_row.status_code == 422
    body = short_row.json()
    assert body["error"] == "invalid_input"
    assert "detail" not in body


def test_metrics_reach_the_prometheus_endpoint(classifier: Classifier, local_ray: LocalRay) -> None:
    httpx.post(f"{classifier.url}/serve", json=classifier.samples[0].tolist(), headers=classifier.auth)

    def exported() -> str | None:
        text = httpx.get(local_ray.metrics_url, timeout=10).text
        return text if "regserve_requests" in text and "regserve_batch_size" in text else None

    text = wait_for(exported, timeout=90, interval=1, message="regserve metrics on Ray's exporter")
    assert f'version="{classifier.version}"' in text
    assert np.any([line.startswith("ray_regserve_request_latency_ms") for line in text.splitlines()])
