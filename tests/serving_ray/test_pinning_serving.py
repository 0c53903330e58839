"""Version pinning under the owner's control, on a real replica and a real MLflow: the policy in
`user_config.pinning` (applied in place) refuses pins with 403 before anything is fetched, and a replica's
cold loads of pinned versions are rate-limited (429 + Retry-After) while loaded versions keep answering.

The registry is reached through a counting proxy: "nothing downloaded" is "no request reached MLflow"."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from regserve_operator.sandbox.mlflow_server import MlflowServer
from regserve_operator.sandbox.models import log_phrasebook
from regserve_operator.sandbox.processes import wait_for

from tests.operator.counting_proxy import CountingProxy
from tests.serving.conftest import app_config
from tests.support.ray_cluster import LocalRay, deployed_app

pytestmark = pytest.mark.ray

MODEL = "pinning_model"
HELLO = {"prompt": "Hello"}
TOKEN = "pinning-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
OIP_HELLO = {"inputs": [{"name": "prompt", "datatype": "BYTES", "shape": [1], "data": ["Hello"]}]}


@dataclass
class Pinned:
    url: str
    config: dict[str, Any]
    registry: CountingProxy
    local_ray: LocalRay
    default: str
    fr: str  # compatible versions, never held
    held: str
    promoted: str
    unpromoted: str

    def apply(self, pinning: dict[str, Any]) -> None:
        """Deploy `pinning` in place (user_config) and wait until the replica has it."""
        config = copy.deepcopy(self.config)
        config["deployments"][0]["user_config"]["pinning"] = pinning
        self.local_ray.deploy(config)
        wanted = {
            "mode": pinning["mode"],
            **{k: sorted(pinning.get(k, []), key=int) for k in ("allowed", "refused")},
        }
        wait_for(
            lambda: metadata(self.url)["pinning"] == wanted, timeout=60, message=f"pinning {wanted} applied"
        )


def metadata(url: str, headers: dict[str, str] | None = None) -> dict[str, Any]:
    return dict(httpx.get(f"{url}/metadata", headers=headers, timeout=30).json())


def ask(url: str, version: str | None = None, headers: dict[str, str] | None = None) -> httpx.Response:
    pin = {"serve-multiplexed-model-id": version} if version else {}
    return httpx.post(f"{url}/serve", json=HELLO, headers={**pin, **(headers or {})}, timeout=120)


def ask_v2(url: str, version: str, headers: dict[str, str] | None = None) -> httpx.Response:
    return httpx.post(
        f"{url}/v2/models/{MODEL}/versions/{version}/infer", json=OIP_HELLO, headers=headers, timeout=120
    )


@pytest.fixture(scope="module")
def pinned(mlflow_server: MlflowServer, local_ray: LocalRay) -> Iterator[Pinned]:
    default = log_phrasebook(mlflow_server.url, MODEL, lang_to="de")
    fr = log_phrasebook(mlflow_server.url, MODEL, lang_to="fr")
    held = log_phrasebook(mlflow_server.url, MODEL, lang_to="fr")
    promoted = log_phrasebook(mlflow_server.url, MODEL, lang_to="fr")
    unpromoted = log_phrasebook(mlflow_server.url, MODEL, lang_to="fr")
    with CountingProxy(mlflow_server.url) as registry:
        config = app_config(
            "pinning",
            model_name=MODEL,
            tracking_uri=registry.url,
            default_version=default,
            max_models_per_replica=3,
            pinned_cold_loads=100,  # the bucket has a test of its own below
        )
        with deployed_app(local_ray, config) as url:
            yield Pinned(url, config, registry, local_ray, default, fr, held, promoted, unpromoted)


@dataclass(frozen=True)
class Ask:
    version: str  # a Pinned attribute name
    status: int


def test_each_mode_refuses_what_it_should_before_the_registry_is_asked(pinned: Pinned) -> None:
    def version(name: str) -> str:
        return str(getattr(pinned, name))

    modes: list[tuple[dict[str, Any], list[Ask]]] = [
        # Any: even the held version.
        ({"mode": "Any"}, [Ask("held", 200), Ask("fr", 200)]),
        # Compatible: the held version is refused, loaded or not; others pass the gate.
        (
            {"mode": "Compatible", "refused": [pinned.held]},
            [Ask("held", 403), Ask("fr", 200), Ask("unpromoted", 200), Ask("default", 200)],
        ),
        # Promoted: only what is promoted or served, less what is held.
        (
            {"mode": "Promoted", "allowed": [pinned.promoted, pinned.held], "refused": [pinned.held]},
            [
                Ask("promoted", 200),
                Ask("fr", 403),
                Ask("unpromoted", 403),
                Ask("held", 403),
                Ask("default", 200),
            ],
        ),
        # None: no pinned request at all, except the default's own number.
        ({"mode": "None"}, [Ask("promoted", 403), Ask("fr", 403), Ask("default", 200)]),
    ]
    for pinning, asks in modes:
        pinned.apply(pinning)
        for case in asks:
            before = pinned.registry.total()
            loads_before = metadata(pinned.url)["version_loads"].get(version(case.version), 0)
            answer = ask(pinned.url, version(case.version))
            assert answer.status_code == case.status, (pinning, case, answer.text)
            if case.status == 403:
                assert answer.json()["error"] == "version_not_allowed"
                assert "server-timing" not in answer.headers  # no gate step: nothing was fetched
                oip = ask_v2(pinned.url, version(case.version))
                assert oip.status_code == 403
                assert oip.json()["code"] == "version_not_allowed" and oip.json()["error"]
                assert pinned.registry.total() == before, "a refused pin reached the registry"
                assert metadata(pinned.url)["version_loads"].get(version(case.version), 0) == loads_before
    # The unpinned path is never subject to the policy.
    assert ask(pinned.url).json() == [{"translation_text": "Hallo"}]
    # Versions refused in every mode but Any were loaded only when a mode allowed them.
    loads = metadata(pinned.url)["version_loads"]
    assert loads.get(pinned.held) == 1 and loads.get(pinned.unpromoted) == 1
    pinned.apply({"mode": "Compatible"})


def test_cold_loads_are_rate_limited_per_replica(mlflow_server: MlflowServer, local_ray: LocalRay) -> None:
    """One cold load per 10 minutes: a client alternating two versions gets one load, then 429 with
    Retry-After for the other, while the loaded versions and the default keep answering. The candidate's
    smoke-test load takes no token. With auth on, /rollout gives the smoke test's code, not its text."""
    default = log_phrasebook(mlflow_server.url, MODEL, lang_to="de")
    first = log_phrasebook(mlflow_server.url, MODEL, lang_to="fr")
    second = log_phrasebook(mlflow_server.url, MODEL, lang_to="fr")
    boom = log_phrasebook(mlflow_server.url, MODEL, lang_to="fr", input_example="boom")
    with CountingProxy(mlflow_server.url) as registry:
        config = app_config(
            "coldloads",
            model_name=MODEL,
            tracking_uri=registry.url,
            default_version=default,
            max_models_per_replica=2,
            pinned_cold_loads=1,
            pinned_cold_load_window_s=600,
            auth_token_env="REGSERVE_SERVING_TOKEN",
        )
        config["runtime_env"] = {"env_vars": {"REGSERVE_SERVING_TOKEN": TOKEN}}
        candidate = {"version": boom, "mode": "smoke", "generation": 1}
        config["deployments"][0]["user_config"]["candidate"] = candidate
        with deployed_app(local_ray, config) as url:
            smoke = wait_for(
                lambda: failed_smoke(url), timeout=120, message="the candidate's smoke test failing"
            )
            assert smoke["code"] == "prediction_failed" and smoke["message"] is None, smoke
            assert "boom" not in httpx.get(f"{url}/rollout", timeout=30).text
            assert metadata(url, AUTH)["version_loads"].get(boom) == 1  # loaded beside the bucket

            assert ask(url, first, AUTH).status_code == 200  # the one token
            before = registry.total()
            for _ in range(3):
                limited = ask(url, second, AUTH)
                assert limited.status_code == 429, limited.text
                assert limited.json()["error"] == "too_many_cold_loads"
                assert 1 <= int(limited.headers["retry-after"]) <= 600
                oip = ask_v2(url, second, AUTH)
                assert oip.status_code == 429 and oip.json()["code"] == "too_many_cold_loads"
                assert "retry-after" in oip.headers
                assert ask(url, first, AUTH).json() == [{"translation_text": "Bonjour"}]  # loaded: answered
                assert ask(url, None, AUTH).json() == [{"translation_text": "Hallo"}]
            assert registry.total() == before, "a rate-limited load reached the registry"
            assert second not in metadata(url, AUTH)["version_loads"]


def failed_smoke(url: str) -> dict[str, Any] | None:
    smoke = httpx.get(f"{url}/rollout", timeout=30).json()["smoke"]
    return dict(smoke) if smoke["state"] == "failed" else None
