"""The Open Inference Protocol end to end: Triton's own HTTP client against deployed apps on a real Ray
and a real MLflow: the seed's phrasebook (columns, versions, 409/422) and the sklearn pipeline
(tensors, batching, bearer auth)."""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterator
from typing import Any

import httpx
import numpy as np
import pytest
import tritonclient.http as triton
from regserve_operator.sandbox.mlflow_server import MlflowServer
from regserve_operator.sandbox.models import log_phrasebook, log_sklearn_classifier
from tritonclient.utils import InferenceServerException

from tests.serving.conftest import app_config
from tests.serving_ray.test_features import TOKEN, Classifier
from tests.serving_ray.test_seed_scenario import Translator
from tests.support.ray_cluster import LocalRay, deployed_app

pytestmark = pytest.mark.ray

TRANSLATOR = "oip_translation_model"
CLASSIFIER = "oip_classifier"


def oip_client(url: str) -> triton.InferenceServerClient:
    return triton.InferenceServerClient(url.removeprefix("http://"), network_timeout=120)


@pytest.fixture(scope="module")
def translator(mlflow_server: MlflowServer, local_ray: LocalRay) -> Iterator[Translator]:
    v1 = log_phrasebook(mlflow_server.url, TRANSLATOR, lang_to="de")
    v2 = log_phrasebook(mlflow_server.url, TRANSLATOR, lang_to="fr")
    v3 = log_phrasebook(mlflow_server.url, TRANSLATOR, lang_to="de", input_label="text_to_translate")
    broken = log_phrasebook(mlflow_server.url, TRANSLATOR, lang_to="de", fail_on_load=True)
    config = app_config(
        "oip_translator", model_name=TRANSLATOR, tracking_uri=mlflow_server.url, default_version=v1
    )
    with deployed_app(local_ray, config) as url:
        yield Translator(url, v1, v2, v3, broken)


@pytest.fixture(scope="module")
def classifier(mlflow_server: MlflowServer, local_ray: LocalRay) -> Iterator[Classifier]:
    version, samples, expected = log_sklearn_classifier(mlflow_server.url, CLASSIFIER)
    config = app_config(
        "oip_classifier",
        model_name=CLASSIFIER,
        tracking_uri=mlflow_server.url,
        default_version=version,
        max_batch_size=8,
        batch_wait_timeout_s=0.01,
        auth_token_env="REGSERVE_SERVING_TOKEN",
    )
    config["runtime_env"] = {"env_vars": {"REGSERVE_SERVING_TOKEN": TOKEN}}
    with deployed_app(local_ray, config) as url:
        yield Classifier(url, version, samples, expected)


def prompts(*texts: str, binary: bool = True) -> list[triton.InferInput]:
    prompt = triton.InferInput("prompt", [len(texts)], "BYTES")
    prompt.set_data_from_numpy(np.array(texts, dtype=object), binary_data=binary)
    return [prompt]


def texts(result: triton.InferResult, name: str = "translation_text") -> list[str]:
    return [value.decode() if isinstance(value, bytes) else value for value in result.as_numpy(name).tolist()]


def refused(call: Any) -> InferenceServerException:
    with pytest.raises(InferenceServerException) as error:
        call()
    return error.value


# ----------------------------------------------------------------------------------------- phrasebook


def test_server_health_and_metadata(translator: Translator) -> None:
    client = oip_client(translator.url)
    assert client.is_server_live()
    assert client.is_server_ready()
    metadata = client.get_server_metadata()
    assert metadata["name"] == "regserve"
    assert "binary_tensor_data" in metadata["extensions"]


def test_model_metadata_from_the_signature(translator: Translator) -> None:
    client = oip_client(translator.url)
    metadata = client.get_model_metadata(TRANSLATOR)
    assert metadata["name"] == TRANSLATOR
    assert metadata["inputs"] == [{"name": "prompt", "datatype": "BYTES", "shape": [-1]}]
    assert metadata["outputs"] == [{"name": "translation_text", "datatype": "BYTES", "shape": [-1]}]
    assert translator.v1 in metadata["versions"]
    assert client.is_model_ready(TRANSLATOR)
    pinned = client.get_model_metadata(TRANSLATOR, model_version=translator.v2)
    assert pinned["versions"] == [translator.v2]
    assert client.is_model_ready(TRANSLATOR, model_version=translator.v2)
    assert not client.is_model_ready(TRANSLATOR, model_version=translator.v3)  # 409: not compatible


def test_infer_default_version_binary_and_json(translator: Translator) -> None:
    client = oip_client(translator.url)
    result = client.infer(TRANSLATOR, prompts("Hello", "The weather is lovely today"), request_id="r-1")
    assert texts(result) == ["Hallo", "Das Wetter ist heute schön"]
    response = result.get_response()
    assert (response["model_name"], response["model_version"], response["id"]) == (
        TRANSLATOR,
        translator.v1,
        "r-1",
    )
    as_json = client.infer(
        TRANSLATOR,
        prompts("Hello", binary=False),
        outputs=[triton.InferRequestedOutput("translation_text", binary_data=False)],
    )
    assert as_json.get_output("translation_text")["data"] == ["Hallo"]


def test_versions_path_pins_a_version(translator: Translator) -> None:
    client = oip_client(translator.url)
    french = client.infer(TRANSLATOR, prompts("Hello"), model_version=translator.v2)
    assert texts(french) == ["Bonjour"]
    assert french.get_response()["model_version"] == translator.v2
    # The header pins too, as on every route; path and header must agree when both are set.
    header = client.infer(TRANSLATOR, prompts("Hello"), headers={"serve-multiplexed-model-id": translator.v2})
    assert texts(header) == ["Bonjour"]
    conflict = refused(
        lambda: client.infer(
            TRANSLATOR,
            prompts("Hello"),
            model_version=translator.v1,
            headers={"serve-multiplexed-model-id": "2"},
        )
    )
    assert conflict.status() == "400"


def test_incompatible_version_is_409(translator: Translator) -> None:
    error = refused(
        lambda: oip_client(translator.url).infer(TRANSLATOR, prompts("Hello"), model_version=translator.v3)
    )
    assert error.status() == "409"
    assert "not compatible" in error.message()
    body = httpx.post(
        f"{translator.url}/v2/models/{TRANSLATOR}/versions/{translator.v3}/infer",
        json={"inputs": [{"name": "prompt", "datatype": "BYTES", "shape": [1], "data": ["Hello"]}]},
    ).json()
    assert body["code"] == "incompatible_signature"
    assert {(item["field"], item["change"]) for item in body["detail"]} == {
        ("prompt", "missing"),
        ("text_to_translate", "added_required"),
    }


@pytest.mark.parametrize(
    ("version", "status"),
    [("999", "404"), ("latest", "400"), ("0", "400")],
)
def test_unknown_and_invalid_versions(translator: Translator, version: str, status: str) -> None:
    client = oip_client(translator.url)
    error = refused(lambda: client.infer(TRANSLATOR, prompts("Hello"), model_version=version))
    assert error.status() == status


def test_unknown_model_is_404(translator: Translator) -> None:
    client = oip_client(translator.url)
    assert refused(lambda: client.infer("other_model", prompts("Hello"))).status() == "404"
    assert refused(lambda: client.get_model_metadata("other_model")).status() == "404"


def test_off_signature_is_422_with_field_detail(translator: Translator) -> None:
    client = oip_client(translator.url)
    number = triton.InferInput("prompt", [1], "INT64")
    number.set_data_from_numpy(np.array([42], dtype=np.int64))
    error = refused(lambda: client.infer(TRANSLATOR, [number]))
    assert error.status() == "422"
    misspelt = triton.InferInput("promt", [1], "BYTES")
    misspelt.set_data_from_numpy(np.array(["Hello"], dtype=object))
    assert refused(lambda: client.infer(TRANSLATOR, [misspelt])).status() == "422"
    body = httpx.post(
        f"{translator.url}/v2/models/{TRANSLATOR}/infer",
        json={"inputs": [{"name": "prompt", "datatype": "INT64", "shape": [1], "data": [42]}]},
    ).json()
    assert body["code"] == "invalid_input"
    assert body["detail"][0]["loc"] == ["inputs", "prompt", "datatype"]


def prompt_body(shape: list[int], extra: dict[str, Any], **request: Any) -> bytes:
    return json.dumps(
        {"inputs": [{"name": "prompt", "datatype": "BYTES", "shape": shape, **extra}], **request}
    ).encode()


@pytest.mark.parametrize(
    "body",
    [
        b"not json",
        prompt_body([2], {"data": ["a"]}),
        prompt_body([1], {"parameters": {"binary_data_size": 9}}),
        prompt_body([1, 1, 1], {"data": ["a"]}),
        prompt_body([0], {"data": []}),
        prompt_body([1], {"data": ["a"]}, outputs=[{"name": "x"}]),
        b"[" * 50_000 + b"]" * 50_000,
    ],
)
def test_malformed_bodies_are_422_never_500(translator: Translator, body: bytes) -> None:
    response = httpx.post(f"{translator.url}/v2/models/{TRANSLATOR}/infer", content=body, timeout=60)
    assert response.status_code == 422, response.text
    assert isinstance(response.json()["error"], str)


def test_model_that_raises_is_500_with_error_id(translator: Translator) -> None:
    error = refused(lambda: oip_client(translator.url).infer(TRANSLATOR, prompts("boom")))
    assert error.status() == "500"
    body = httpx.post(
        f"{translator.url}/v2/models/{TRANSLATOR}/infer",
        json={"inputs": [{"name": "prompt", "datatype": "BYTES", "shape": [1], "data": ["boom"]}]},
    ).json()
    assert body["code"] == "prediction_failed" and len(body["detail"]["error_id"]) == 16


def test_version_whose_load_fails_is_500_and_default_unharmed(translator: Translator) -> None:
    client = oip_client(translator.url)
    error = refused(lambda: client.infer(TRANSLATOR, prompts("Hello"), model_version=translator.broken))
    assert error.status() == "500"
    assert texts(client.infer(TRANSLATOR, prompts("Hello"))) == ["Hallo"]


def test_unknown_routes_and_methods(translator: Translator) -> None:
    assert httpx.get(f"{translator.url}/v2/models/{TRANSLATOR}/stats").status_code == 404
    wrong_method = httpx.get(f"{translator.url}/v2/models/{TRANSLATOR}/infer")
    assert wrong_method.status_code == 405 and wrong_method.headers["allow"] == "POST"


# ----------------------------------------------------------------------------------------- classifier


def features(samples: Any) -> list[triton.InferInput]:
    tensor = triton.InferInput("input-0", list(samples.shape), "FP64")
    tensor.set_data_from_numpy(samples)
    return [tensor]


def test_tensor_model_answers_as_the_pipeline_and_as_invocations(classifier: Classifier) -> None:
    client = oip_client(classifier.url)
    metadata = client.get_model_metadata(CLASSIFIER, headers=classifier.auth)
    assert metadata["inputs"] == [{"name": "input-0", "datatype": "FP64", "shape": [-1, 4]}]
    assert metadata["outputs"] == [{"name": "output-0", "datatype": "INT64", "shape": [-1]}]
    result = client.infer(CLASSIFIER, features(classifier.samples), headers=classifier.auth)
    labels = result.as_numpy("output-0")
    assert labels.dtype == np.int64
    assert labels.tolist() == classifier.expected.tolist()
    scoring = httpx.post(
        f"{classifier.url}/invocations", json={"inputs": classifier.samples.tolist()}, headers=classifier.auth
    )
    assert scoring.json() == {"predictions": labels.tolist()}


def test_compressed_requests_and_responses(classifier: Classifier) -> None:
    result = oip_client(classifier.url).infer(
        CLASSIFIER,
        features(classifier.samples[:4]),
        headers=classifier.auth,
        request_compression_algorithm="gzip",
    )
    assert result.as_numpy("output-0").tolist() == classifier.expected[:4].tolist()
    body = gzip.compress(
        json.dumps(
            {
                "inputs": [
                    {"name": "x", "datatype": "FP64", "shape": [1, 4], "data": classifier.samples[0].tolist()}
                ]
            }
        ).encode()
    )
    response = httpx.post(
        f"{classifier.url}/v2/models/{CLASSIFIER}/infer",
        content=body,
        headers={**classifier.auth, "content-encoding": "br"},
    )
    assert response.status_code == 415


def test_tensor_shape_and_datatype_off_the_signature_are_422(classifier: Classifier) -> None:
    client = oip_client(classifier.url)
    narrow = triton.InferInput("input-0", [1, 3], "FP64")
    narrow.set_data_from_numpy(np.zeros((1, 3)))
    assert refused(lambda: client.infer(CLASSIFIER, [narrow], headers=classifier.auth)).status() == "422"
    text = triton.InferInput("input-0", [1, 4], "BYTES")
    text.set_data_from_numpy(np.array([["a"] * 4], dtype=object))
    assert refused(lambda: client.infer(CLASSIFIER, [text], headers=classifier.auth)).status() == "422"


def test_auth_guards_models_but_not_health(classifier: Classifier) -> None:
    client = oip_client(classifier.url)
    assert client.is_server_ready()
    assert client.is_server_live()
    error = refused(lambda: client.infer(CLASSIFIER, features(classifier.samples[:1])))
    assert error.status() == "401"
    assert refused(lambda: client.get_model_metadata(CLASSIFIER)).status() == "401"
