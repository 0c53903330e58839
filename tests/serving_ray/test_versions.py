"""Version management on a real replica: LRU eviction with the default pinned, in-place default switch."""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import pytest
from regserve_operator.probe import probe_app
from regserve_operator.sandbox.mlflow_server import MlflowServer
from regserve_operator.sandbox.models import log_phrasebook
from regserve_operator.sandbox.processes import wait_for

from serving_app.timing import parse_header
from tests.serving.conftest import app_config
from tests.support.ray_cluster import LocalRay, deployed_app

pytestmark = pytest.mark.ray

MODEL = "lru_model"


@dataclass
class Versions:
    url: str
    de: str
    fr: str
    de_again: str


@pytest.fixture(scope="module")
def versions(mlflow_server: MlflowServer, local_ray: LocalRay) -> Iterator[Versions]:
    de = log_phrasebook(mlflow_server.url, MODEL, lang_to="de")
    fr = log_phrasebook(mlflow_server.url, MODEL, lang_to="fr")
    de_again = log_phrasebook(mlflow_server.url, MODEL, lang_to="de")
    config = app_config(
        "versions",
        model_name=MODEL,
        tracking_uri=mlflow_server.url,
        default_version=de,
        max_models_per_replica=2,
    )
    with deployed_app(local_ray, config) as url:
        yield Versions(url, de, fr, de_again)


def ask(url: str, version: str | None = None) -> httpx.Response:
    headers = {"serve-multiplexed-model-id": version} if version else {}
    return httpx.post(f"{url}/serve", json={"prompt": "Hello"}, headers=headers, timeout=60)


def loaded(url: str) -> list[str]:
    return list(httpx.get(f"{url}/metadata").json()["loaded_versions"])


def test_lru_evicts_pinned_versions_but_never_the_default(versions: Versions) -> None:
    assert ask(versions.url, versions.fr).json() == [{"translation_text": "Bonjour"}]
    assert loaded(versions.url) == sorted([versions.de, versions.fr], key=int)
    assert ask(versions.url, versions.de_again).json() == [{"translation_text": "Hallo"}]
    # max 2 per replica: the default stays, the least recently used pinned version goes.
    assert loaded(versions.url) == sorted([versions.de, versions.de_again], key=int)
    assert ask(versions.url).json() == [{"translation_text": "Hallo"}]
    assert ask(versions.url, versions.fr).json() == [{"translation_text": "Bonjour"}]
    assert loaded(versions.url) == sorted([versions.de, versions.fr], key=int)


def timing_steps(response: httpx.Response) -> list[str]:
    return list(parse_header(response.headers.get("server-timing", "")))


def test_a_request_that_loads_a_version_says_where_its_time_went(versions: Versions) -> None:
    """`Server-Timing` on pinned requests: a cold one shows the gate, the download and the load inside
    the multiplexer's step, the prediction and the total; a hit no download or load; the default none."""
    assert loaded(versions.url) == sorted([versions.de, versions.fr], key=int)
    cold = ask(versions.url, versions.de_again)
    assert cold.status_code == 200, cold.text
    cold_steps = sorted(timing_steps(cold))
    assert cold_steps == ["download", "gate", "load", "pinned", "predict", "total"], cold.headers
    hit = ask(versions.url, versions.de_again)
    assert sorted(timing_steps(hit)) == ["gate", "pinned", "predict", "total"], hit.headers
    assert "server-timing" not in ask(versions.url).headers


def test_default_switch_under_concurrent_load(
    versions: Versions, local_ray: LocalRay, mlflow_server: MlflowServer
) -> None:
    answers: Counter[str] = Counter()
    failures: list[str] = []
    stop = threading.Event()

    def client() -> None:
        with httpx.Client(timeout=60) as http:
            while not stop.is_set():
                response = http.post(f"{versions.url}/serve", json={"prompt": "Hello"})
                if response.status_code != 200:
                    failures.append(f"{response.status_code} {response.text}")
                else:
                    answers[response.json()[0]["translation_text"]] += 1

    workers = [threading.Thread(target=client) for _ in range(4)]
    for worker in workers:
        worker.start()
    try:
        wait_for(lambda: answers["Hallo"] >= 20, timeout=60, message="answers from the old default")
        config = app_config(
            "versions", model_name=MODEL, tracking_uri=mlflow_server.url, default_version=versions.fr,
            max_models_per_replica=2,
        )  # fmt: skip
        local_ray.deploy(config)
        wait_for(lambda: answers["Bonjour"] >= 20, timeout=120, message="answers from the new default")
    finally:
        stop.set()
        for worker in workers:
            worker.join(timeout=60)
    assert failures == []
    assert set(answers) == {"Hallo", "Bonjour"}
    metadata = httpx.get(f"{versions.url}/metadata").json()
    assert metadata["default_version"] == versions.fr
    schema = httpx.get(f"{versions.url}/openapi.json").json()
    assert schema["info"]["version"] == versions.fr


def test_switch_to_a_broken_default_keeps_the_old_one_and_reports(
    versions: Versions, local_ray: LocalRay, mlflow_server: MlflowServer
) -> None:
    broken = log_phrasebook(mlflow_server.url, MODEL, fail_on_load=True)
    before = httpx.get(f"{versions.url}/metadata").json()["default_version"]
    config = app_config(
        "versions",
        model_name=MODEL,
        tracking_uri=mlflow_server.url,
        default_version=broken,
        max_models_per_replica=2,
    )
    local_ray.deploy(config)

    def failure_reported() -> dict[str, object] | None:
        failure = httpx.get(f"{versions.url}/metadata").json()["last_default_switch_failure"]
        return failure if failure and failure["version"] == broken else None

    failure = wait_for(failure_reported, timeout=120, message="the failed switch in /metadata")
    assert "broken on purpose" in str(failure["error"])
    assert failure["code"] == "version_load_failed"  # not a registry outage: the operator won't retry
    assert httpx.get(f"{versions.url}/metadata").json()["default_version"] == before
    assert ask(versions.url).status_code == 200
    # What Kubernetes sees: Serve says RUNNING (KubeRay mirrors that), so only the app can tell the
    # operator that the old default still answers.
    assert local_ray.status("versions") == "RUNNING"
    report = probe_app(versions.url)
    assert report is not None and report.default_version == before != broken
