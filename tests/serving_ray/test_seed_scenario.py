"""The seed guide's scenario, exact answers: v1 en→de, v2 en→fr, v3 with an incompatible input."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import mlflow
import pandas as pd
import pytest
from mlflow.pyfunc.scoring_server.client import ScoringServerClient
from regserve_operator.sandbox.mlflow_server import MlflowServer
from regserve_operator.sandbox.models import log_phrasebook

from tests.serving.conftest import app_config
from tests.support.ray_cluster import LocalRay, deployed_app

pytestmark = pytest.mark.ray

MODEL = "translation_model"


@dataclass
class Translator:
    url: str
    v1: str
    v2: str
    v3: str
    broken: str


@pytest.fixture(scope="module")
def translator(mlflow_server: MlflowServer, local_ray: LocalRay) -> Iterator[Translator]:
    v1 = log_phrasebook(mlflow_server.url, MODEL, lang_to="de")
    v2 = log_phrasebook(mlflow_server.url, MODEL, lang_to="fr")
    v3 = log_phrasebook(mlflow_server.url, MODEL, lang_to="de", input_label="text_to_translate")
    broken = log_phrasebook(mlflow_server.url, MODEL, lang_to="de", fail_on_load=True)
    config = app_config("translator", model_name=MODEL, tracking_uri=mlflow_server.url, default_version=v1)
    with deployed_app(local_ray, config) as url:
        yield Translator(url, v1, v2, v3, broken)


def post(
    url: str, body: object, version: str | None = None, header: str = "serve-multiplexed-model-id"
) -> httpx.Response:
    headers = {header: version} if version else {}
    return httpx.post(url, json=body, headers=headers, timeout=60)


def test_default_version_answers(translator: Translator) -> None:
    response = post(f"{translator.url}/serve", {"prompt": "The weather is lovely today"})
    assert response.status_code == 200, response.text
    assert response.json() == [{"translation_text": "Das Wetter ist heute schön"}]
    assert response.headers["x-model-version"] == translator.v1


def test_header_selects_version_both_spellings(translator: Translator) -> None:
    french = post(f"{translator.url}/serve", {"prompt": "The weather is lovely today"}, translator.v2)
    assert french.json() == [{"translation_text": "Il fait beau aujourd'hui"}]
    underscored = post(
        f"{translator.url}/serve", {"prompt": "Hello"}, translator.v2, header="serve_multiplexed_model_id"
    )
    assert underscored.json() == [{"translation_text": "Bonjour"}]
    german = post(f"{translator.url}/serve", {"prompt": "The weather is lovely today"}, translator.v1)
    assert german.json() == [{"translation_text": "Das Wetter ist heute schön"}]


def test_list_of_records(translator: Translator) -> None:
    response = post(
        f"{translator.url}/serve", [{"prompt": "Hello"}, {"prompt": "The weather is lovely today"}]
    )
    assert response.json() == [
        {"translation_text": "Hallo"},
        {"translation_text": "Das Wetter ist heute schön"},
    ]


def test_incompatible_version_is_409_naming_the_fields(translator: Translator) -> None:
    response = post(f"{translator.url}/serve", {"prompt": "Hello"}, translator.v3)
    assert response.status_code == 409
    body = response.json()
    assert body["error"] == "incompatible_signature"
    changes = {(item["field"], item["change"]) for item in body["detail"]}
    assert changes == {("prompt", "missing"), ("text_to_translate", "added_required")}


def test_invocations_scoring_protocol(translator: Translator) -> None:
    records = post(f"{translator.url}/invocations", {"dataframe_records": [{"prompt": "Hello"}]})
    assert records.status_code == 200, records.text
    assert records.json() == {"predictions": [{"translation_text": "Hallo"}]}
    split = post(
        f"{translator.url}/invocations",
        {"dataframe_split": {"columns": ["prompt"], "data": [["Hello"]]}},
        translator.v2,
    )
    assert split.json() == {"predictions": [{"translation_text": "Bonjour"}]}
    inputs = post(f"{translator.url}/invocations", {"inputs": {"prompt": ["Hello"]}})
    assert inputs.json() == {"predictions": [{"translation_text": "Hallo"}]}


def test_unknown_version_is_404(translator: Translator) -> None:
    response = post(f"{translator.url}/serve", {"prompt": "Hello"}, "999")
    assert response.status_code == 404
    assert response.json()["error"] == "unknown_version"


def test_malformed_version_header_is_400(translator: Translator) -> None:
    response = post(f"{translator.url}/serve", {"prompt": "Hello"}, "latest")
    assert response.status_code == 400
    assert response.json()["error"] == "invalid_version"


def test_body_off_signature_is_422_with_field_detail(translator: Translator) -> None:
    response = post(f"{translator.url}/serve", {"promt": "Hello"})
    assert response.status_code == 422
    body = response.json()
    assert body["error"] == "invalid_input"
    assert any(item["loc"][-1] == "prompt" and item["type"] == "missing" for item in body["detail"])
    wrong_type = post(f"{translator.url}/serve", {"prompt": 42})
    assert wrong_type.status_code == 422


def test_oversized_body_is_413(translator: Translator) -> None:
    response = post(f"{translator.url}/serve", {"prompt": "x" * (9 * 1024 * 1024)})
    assert response.status_code == 413
    assert response.json()["error"] == "body_too_large"


def test_wrong_content_type_is_415(translator: Translator) -> None:
    response = httpx.post(
        f"{translator.url}/serve", content=b"prompt=Hello", headers={"content-type": "text/plain"}
    )
    assert response.status_code == 415


def test_model_that_raises_is_500_with_error_id_and_replica_stays_healthy(translator: Translator) -> None:
    response = post(f"{translator.url}/serve", {"prompt": "boom"})
    assert response.status_code == 500
    body = response.json()
    assert body["error"] == "prediction_failed"
    assert len(body["detail"]["error_id"]) == 16
    assert post(f"{translator.url}/serve", {"prompt": "Hello"}).status_code == 200


def test_version_whose_load_fails_is_500_and_default_unharmed(translator: Translator) -> None:
    response = post(f"{translator.url}/serve", {"prompt": "Hello"}, translator.broken)
    assert response.status_code == 500
    assert response.json()["error"] == "version_load_failed"
    assert post(f"{translator.url}/serve", {"prompt": "Hello"}).json() == [{"translation_text": "Hallo"}]


def test_metadata_and_health(translator: Translator) -> None:
    metadata = httpx.get(f"{translator.url}/metadata").json()
    assert metadata["model_name"] == MODEL
    assert metadata["default_version"] == translator.v1
    assert metadata["signature"]["inputs"]
    assert translator.v1 in metadata["loaded_versions"]
    health = httpx.get(f"{translator.url}/healthz")
    assert health.json() == {"status": "ok", "default_version": translator.v1}


def test_openapi_shows_signature_fields(translator: Translator) -> None:
    document = httpx.get(f"{translator.url}/openapi.json").json()
    request_schema = document["paths"]["/serve"]["post"]["requestBody"]["content"]["application/json"][
        "schema"
    ]
    text = str(request_schema) + str(document["components"]["schemas"])
    assert "prompt" in text
    assert "translation_text" in str(document)
    docs = httpx.get(f"{translator.url}/docs")
    assert docs.status_code == 200 and "/translator/openapi.json" in docs.text


def test_mlflows_scoring_client_pings_and_predicts_below_the_prefix(translator: Translator) -> None:
    client = ScoringServerClient("127.0.0.1", 0)
    client.url_prefix = translator.url  # the client knows host and port only; the app lives below a prefix
    client.wait_server_ready(timeout=30)
    assert client.get_version() == mlflow.__version__
    answer = client.invoke(pd.DataFrame({"prompt": ["Hello", "The weather is lovely today"]}))
    predictions = answer.get_predictions()
    assert predictions["translation_text"].tolist() == ["Hallo", "Das Wetter ist heute schön"]
    for path in ("/ping", "/health"):
        ping = httpx.get(f"{translator.url}{path}")
        assert (ping.status_code, ping.text, ping.headers["content-type"]) == (200, "\n", "application/json")
    document = httpx.get(f"{translator.url}/openapi.json").json()
    assert {"/ping", "/health", "/version"} <= set(document["paths"])
    operation_ids = [op["operationId"] for methods in document["paths"].values() for op in methods.values()]
    assert len(operation_ids) == len(set(operation_ids))
