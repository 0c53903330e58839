"""Memory stays bounded over 30 version switches with LRU eviction (the replica's RSS slope is measured).

Four compatible phrasebook versions; `max_models_per_replica=2` leaves one pinned slot beside the
default (which is never evicted). Pinned requests cycle over the three non-default versions, so every
request loads a version from MLflow and evicts the previous one. After each switch the replica's RSS
(`VmRSS` of its worker process, pid from Serve's instance details) is sampled; a least-squares slope
over the last 20 samples (the first 10 warm up imports, MLflow's client caches and the allocator) must stay
below 1 MiB per switch.

Why 1 MiB: a phrasebook version's pyfunc (model object, its code module, MLmodel metadata) holds well
under 1 MiB, so a leak of anything per load that matters (a retained model, a downloaded artifact
read into memory, a per-version module or pandas frame) shows as a steady slope of that size or
more, while allocator noise on a ~300 MiB process is a few hundred KiB up and down, with no trend.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from regserve_operator.sandbox.mlflow_server import MlflowServer
from regserve_operator.sandbox.models import log_phrasebook
from regserve_operator.sandbox.processes import wait_for

from tests.serving.conftest import app_config
from tests.support.ray_cluster import LocalRay, deployed_app

pytestmark = pytest.mark.ray

MODEL = "reliability_memory"
APP = "reliability_memory"
SWITCHES = 30
WINDOW = 20
MAX_SLOPE_BYTES = 1024 * 1024
ANSWERS = {"de": "Hallo", "fr": "Bonjour"}


@dataclass
class MemoryApp:
    url: str
    default: str
    pinned: list[tuple[str, str]]  # (version, language)


@pytest.fixture(scope="module")
def memory_app(mlflow_server: MlflowServer, local_ray: LocalRay) -> Iterator[MemoryApp]:
    default = log_phrasebook(mlflow_server.url, MODEL, lang_to="de")
    pinned = [(log_phrasebook(mlflow_server.url, MODEL, lang_to=lang), lang) for lang in ("fr", "de", "fr")]
    config = app_config(
        APP,
        model_name=MODEL,
        tracking_uri=mlflow_server.url,
        default_version=default,
        max_models_per_replica=2,
        # Every switch here is a cold load on purpose: the replica's cold-load limit would answer 429.
        pinned_cold_loads=1000,
    )
    with deployed_app(local_ray, config) as url:
        yield MemoryApp(url, default, pinned)


def replica_pid(local_ray: LocalRay) -> int:
    """The running replica's pid from Serve's details (the GET /api/serve/applications/ KubeRay polls).

    Ray's state API (`ray.util.state.list_actors`) would do too, but on a machine where other sessions
    run Ray clusters it refuses to guess which one to ask; the dashboard URL is unambiguous."""

    def running_replica() -> int | None:
        deployment = local_ray.applications()[APP]["deployments"]["ModelServer"]
        pids = [replica["pid"] for replica in deployment["replicas"] if replica["state"] == "RUNNING"]
        assert len(pids) <= 1, f"expected one replica, found {pids}"
        return pids[0] if pids and pids[0] else None

    return int(
        wait_for(running_replica, timeout=60, interval=0.5, message="the replica's pid in Serve details")
    )


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for pid {pid}")


def slope(samples: list[int]) -> float:
    """Least-squares slope of samples against their index (bytes per switch)."""
    n = len(samples)
    mean_x, mean_y = (n - 1) / 2, sum(samples) / n
    covariance = sum((x - mean_x) * (y - mean_y) for x, y in enumerate(samples))
    variance = sum((x - mean_x) ** 2 for x in range(n))
    return covariance / variance


def test_rss_slope_over_thirty_switches_is_bounded(memory_app: MemoryApp, local_ray: LocalRay) -> None:
    pid = replica_pid(local_ray)
    samples: list[int] = []
    with httpx.Client(timeout=120) as client:
        for switch in range(SWITCHES):
            version, lang = memory_app.pinned[switch % len(memory_app.pinned)]
            response = client.post(
                f"{memory_app.url}/serve",
                json={"prompt": "Hello"},
                headers={"serve-multiplexed-model-id": version},
            )
            assert response.status_code == 200, response.text
            assert response.json() == [{"translation_text": ANSWERS[lang]}]
            assert response.headers["x-model-version"] == version
            loaded = client.get(f"{memory_app.url}/metadata").json()["loaded_versions"]
            # One pinned slot: the version just used evicted the previous one; the default stays.
            assert loaded == sorted({memory_app.default, version}, key=int), (switch, loaded)
            samples.append(rss_bytes(pid))
    assert replica_pid(local_ray) == pid, "the replica restarted during the switches"
    measured = slope(samples[-WINDOW:])
    mib = [round(sample / 2**20, 1) for sample in samples]
    print(f"RSS MiB per switch: {mib}")
    print(f"RSS slope over the last {WINDOW} switches: {measured / 1024:.1f} KiB/switch")
    assert measured < MAX_SLOPE_BYTES, f"RSS grows {measured / 2**20:.2f} MiB per switch: {mib}"
    # The default was never evicted and still answers.
    default = httpx.post(f"{memory_app.url}/serve", json={"prompt": "Hello"}, timeout=60)
    assert default.json() == [{"translation_text": "Hallo"}]
    assert default.headers["x-model-version"] == memory_app.default
