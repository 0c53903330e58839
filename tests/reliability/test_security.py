"""Bearer-token auth and schema hiding on the serving endpoint, beyond tests/serving_ray/test_features.py.

That module already shows: 401 (with `WWW-Authenticate: Bearer`) without or with a wrong token on /serve
and /metadata, /healthz open for probes, and a 422 without `detail` on /serve when
`expose_schema_in_errors=False`. Here: what a caller without the token can still learn or cause.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import pytest
from regserve_operator.sandbox.mlflow_server import MlflowServer
from regserve_operator.sandbox.models import log_phrasebook

from tests.serving.conftest import app_config
from tests.support.ray_cluster import LocalRay, deployed_app

pytestmark = pytest.mark.ray

MODEL = "reliability_secure"
APP = "reliability_secure"
TOKEN = "reliability-t0ken"
# Words that would reveal the model's signature to a caller.
SCHEMA_WORDS = ("prompt", "translation_text", "text_to_translate", "string")


@dataclass
class Secured:
    url: str
    default: str
    compatible: str
    incompatible: str

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def secured(mlflow_server: MlflowServer, local_ray: LocalRay) -> Iterator[Secured]:
    default = log_phrasebook(mlflow_server.url, MODEL, lang_to="de")
    compatible = log_phrasebook(mlflow_server.url, MODEL, lang_to="fr")
    incompatible = log_phrasebook(mlflow_server.url, MODEL, lang_to="de", input_label="text_to_translate")
    config = app_config(
        APP,
        model_name=MODEL,
        tracking_uri=mlflow_server.url,
        default_version=default,
        auth_token_env="REGSERVE_RELIABILITY_TOKEN",
        expose_schema_in_errors=False,
    )
    config["runtime_env"] = {"env_vars": {"REGSERVE_RELIABILITY_TOKEN": TOKEN}}
    with deployed_app(local_ray, config) as url:
        yield Secured(url, default, compatible, incompatible)


def assert_leaks_nothing(response: httpx.Response) -> None:
    assert "detail" not in response.json(), response.text
    lowered = response.text.lower()
    assert not [word for word in SCHEMA_WORDS if word in lowered], response.text


BAD_CREDENTIALS = {
    "none": {},
    "wrong token": {"Authorization": "Bearer wrong"},
    "token prefix": {"Authorization": f"Bearer {TOKEN[:-1]}"},
    "basic scheme": {"Authorization": f"Basic {TOKEN}"},
    "bare token": {"Authorization": TOKEN},
    "lowercase scheme, wrong token": {"Authorization": "bearer wrong"},
}


@pytest.mark.parametrize("credentials", BAD_CREDENTIALS.values(), ids=BAD_CREDENTIALS.keys())
def test_401_comes_first_and_leaks_no_schema(secured: Secured, credentials: dict[str, str]) -> None:
    """Without the token every route answers 401 before it parses, validates or resolves anything:
    an off-signature body, an unknown version or a bad media type do not turn into 422/404/415 that
    would let an outsider probe the schema or the registry."""
    probes = [
        ("serve", {"prompt": "Hello"}, {}),
        ("serve", {"promt": "Hello"}, {}),
        ("serve", {"prompt": "Hello"}, {"serve-multiplexed-model-id": "999"}),
        ("invocations", {"dataframe_records": [{"wrong": 1}]}, {}),
    ]
    for route, body, extra in probes:
        response = httpx.post(
            f"{secured.url}/{route}", json=body, headers={**credentials, **extra}, timeout=60
        )
        assert response.status_code == 401, (route, body, response.text)
        assert response.json()["error"] == "unauthorized"
        assert_leaks_nothing(response)
    text = httpx.post(
        f"{secured.url}/serve",
        content=b"x",
        headers={**credentials, "content-type": "text/plain"},
        timeout=60,
    )
    assert text.status_code == 401
    metadata = httpx.get(f"{secured.url}/metadata", headers=credentials, timeout=30)
    assert metadata.status_code == 401
    assert_leaks_nothing(metadata)


def test_unauthenticated_pinned_request_loads_nothing(secured: Secured) -> None:
    """An outsider cannot make the replica download and load versions (a cheap way to exhaust it)."""
    response = httpx.post(
        f"{secured.url}/serve",
        json={"prompt": "Hello"},
        headers={"serve-multiplexed-model-id": secured.compatible},
        timeout=60,
    )
    assert response.status_code == 401
    metadata = httpx.get(f"{secured.url}/metadata", headers=secured.auth, timeout=30).json()
    assert metadata["loaded_versions"] == [secured.default]
    pinned = httpx.post(
        f"{secured.url}/serve",
        json={"prompt": "Hello"},
        headers={**secured.auth, "serve-multiplexed-model-id": secured.compatible},
        timeout=60,
    )
    assert pinned.json() == [{"translation_text": "Bonjour"}]


def test_invocations_422_hides_the_schema(secured: Secured) -> None:
    """The /invocations twin of test_features' /serve check. Found here: this was a 500 whose message was
    MLflow's schema error naming the columns, despite expose_schema_in_errors=False."""
    response = httpx.post(
        f"{secured.url}/invocations",
        json={"dataframe_records": [{"wrong": "Hello"}]},
        headers=secured.auth,
        timeout=60,
    )
    assert_leaks_nothing(response)
    assert (response.status_code, response.json()["error"]) == (422, "invalid_input")
    serve = httpx.post(f"{secured.url}/serve", json={"promt": "Hello"}, headers=secured.auth, timeout=60)
    assert (serve.status_code, serve.json()["error"]) == (422, "invalid_input")
    assert_leaks_nothing(serve)


def test_openapi_with_the_token_shows_the_schema(secured: Secured) -> None:
    document = httpx.get(f"{secured.url}/openapi.json", headers=secured.auth, timeout=30)
    assert document.status_code == 200
    assert "prompt" in document.text


def test_healthz_is_open_and_says_only_status_and_version(secured: Secured) -> None:
    health = httpx.get(f"{secured.url}/healthz", timeout=30)
    assert health.status_code == 200
    assert health.json() == {"status": "ok", "default_version": secured.default}


def test_openapi_and_docs_need_the_token_when_auth_is_on(secured: Secured) -> None:
    """Found here: both routes skipped the token check, so the document leaked the whole signature."""
    document = httpx.get(f"{secured.url}/openapi.json", timeout=30)
    assert document.status_code == 401
    assert_leaks_nothing(document)
    docs = httpx.get(f"{secured.url}/docs", timeout=30)
    assert docs.status_code == 401


def test_409_hides_the_fields_when_schema_is_hidden(secured: Secured) -> None:
    """Found here: the 409 detail listed both signatures' differing fields whatever the flag said."""
    response = httpx.post(
        f"{secured.url}/serve",
        json={"prompt": "Hello"},
        headers={**secured.auth, "serve-multiplexed-model-id": secured.incompatible},
        timeout=60,
    )
    assert (response.status_code, response.json()["error"]) == (409, "incompatible_signature")
    assert_leaks_nothing(response)
