"""The model service's own state, without Ray: bounded whatever clients send, one facts fetch per
version at a time, and what `/healthz`, `/metadata` and `/ping` report."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import pytest
from mlflow.models.signature import ModelSignature
from mlflow.types import ColSpec, Schema

from serving_app import http
from serving_app.config import AppArgs
from serving_app.errors import TooManyColdLoads, UnknownVersion, VersionLoadFailed, VersionNotAllowed
from serving_app.metrics import ServingMetrics
from serving_app.pinning import PinPolicy
from serving_app.registry import LoadedVersion, VersionFacts
from serving_app.service import ModelService

SIGNATURE = ModelSignature(inputs=Schema([ColSpec("string", "prompt")]), outputs=Schema([ColSpec("string")]))


class Sink:
    def inc(self, value: float = 1.0, tags: dict[str, str] | None = None) -> None:
        pass

    def observe(self, value: float, tags: dict[str, str] | None = None) -> None:
        pass


class NoPrefetches:
    """Records the downloads a service starts and drops (none is ever made)."""

    def __init__(self) -> None:
        self.started: list[str] = []
        self.discarded: list[str] = []
        self.held: set[str] = set()

    def start(self, version: str) -> None:
        self.started.append(version)

    def discard(self, version: str) -> None:
        self.discarded.append(version)
        self.held.discard(version)

    def versions(self) -> list[str]:
        return sorted(self.held)


class FakeRegistry:
    """Versions 1 and 2 exist (2 fails to load); every other number is unknown."""

    def __init__(self) -> None:
        self.prefetches = NoPrefetches()
        self.facts_fetches: list[str] = []
        self.release = threading.Event()
        self.release.set()

    def fetch_facts(self, version: str) -> VersionFacts:
        self.facts_fetches.append(version)
        self.release.wait(10)
        if version not in {"1", "2"}:
            raise UnknownVersion(f"no version {version}")
        return VersionFacts(version, SIGNATURE, ("python_function",))

    def load(self, version: str) -> LoadedVersion:
        if version != "1":
            raise VersionLoadFailed(f"version {version} failed to load: broken on purpose")
        return LoadedVersion(version=version, model=object(), signature=SIGNATURE, load_seconds=0.0)


def service(registry: FakeRegistry, args: AppArgs | None = None) -> ModelService:
    sink: Any = Sink()
    metrics = ServingMetrics(sink, sink, sink, sink, sink, sink, sink)

    async def load_pinned(version: str) -> LoadedVersion:
        return registry.load(version)

    # A made-up version costs the registry a read too, so it takes a cold-load token: room for them here.
    args = args or AppArgs(model_name="m", pinned_cold_loads=1000)
    return ModelService(args, registry, load_pinned, metrics)  # type: ignore[arg-type]


def test_made_up_versions_leave_nothing_behind() -> None:
    async def scenario() -> ModelService:
        model = service(FakeRegistry())
        await model.set_default("1")
        for number in range(100, 400):
            with pytest.raises(UnknownVersion):
                await model.resolve(str(number))
        return model

    model = asyncio.run(scenario())
    assert not model._facts_pending
    assert len(model._facts) == 1 and len(model._verdicts) == 0  # the default's facts only


def test_concurrent_requests_for_a_version_share_one_fetch() -> None:
    registry = FakeRegistry()

    async def scenario() -> list[Any]:
        model = service(registry)
        await model.set_default("1")
        registry.release.clear()
        asking = [asyncio.create_task(model.differences("2")) for _ in range(20)]
        await asyncio.sleep(0.05)
        registry.release.set()
        return await asyncio.gather(*asking)

    assert asyncio.run(scenario()) == [[]] * 20
    assert registry.facts_fetches == ["2"]


def test_health_and_metadata_report_the_default_and_a_failed_switch() -> None:
    async def scenario() -> ModelService:
        model = service(FakeRegistry())
        await model.set_default("1")
        await model.set_default("2")  # fails: "1" keeps answering
        return model

    model = asyncio.run(scenario())
    health = model.health()
    failure = health.pop("last_default_switch_failure")
    assert health == {"status": "ok", "default_version": "1"}
    assert failure.keys() == {"version", "code", "at"}  # open route: no message
    assert (failure["version"], failure["code"]) == ("2", "version_load_failed")
    metadata = model.metadata([])
    assert metadata["default_version"] == "1"
    assert metadata["last_default_switch_failure"]["error"].endswith("broken on purpose")
    assert metadata["last_default_switch_failure"]["code"] == "version_load_failed"
    # The signature as JSON objects, not JSON text inside JSON.
    assert metadata["signature"]["inputs"] == [{"type": "string", "name": "prompt", "required": True}]
    assert metadata["signature"]["outputs"] == [{"type": "string", "required": True}]


def test_a_refused_pin_asks_the_registry_nothing_and_drops_queued_downloads() -> None:
    registry = FakeRegistry()

    async def scenario() -> ModelService:
        model = service(registry)
        await model.set_default("1")
        registry.prefetches.held = {"2", "7"}  # downloads queued by requests in flight
        model.set_pin_policy(PinPolicy("Promoted", allowed=frozenset({"7"}), refused=frozenset({"2"})))
        for version in ("2", "5"):
            with pytest.raises(VersionNotAllowed):
                await model.resolve(version)
        return model

    asyncio.run(scenario())
    assert registry.facts_fetches == [] and registry.prefetches.started == []
    assert registry.prefetches.discarded == ["2"]  # the allowed version's download stays


def test_cold_loads_past_the_bucket_are_refused_before_the_registry() -> None:
    registry = FakeRegistry()

    async def scenario() -> TooManyColdLoads:
        model = service(registry, AppArgs(model_name="m", pinned_cold_loads=2, pinned_cold_load_window_s=60))
        await model.set_default("1")
        for version in ("8", "9"):
            with pytest.raises(UnknownVersion):
                await model.resolve(version)
        with pytest.raises(TooManyColdLoads) as refused:
            await model.resolve("10")
        assert await model.resolve("1") is model.default.loaded  # the default is no cold load
        return refused.value

    refused = asyncio.run(scenario())
    assert registry.facts_fetches == ["8", "9"]
    assert 1 <= int(refused.headers["Retry-After"]) <= 30


class SlowRegistry(FakeRegistry):
    """Loads wait for `release`; `loading` is set once a load has begun."""

    def __init__(self) -> None:
        super().__init__()
        self.loading = threading.Event()
        self.release.clear()

    def load(self, version: str) -> LoadedVersion:
        self.loading.set()
        if not self.release.wait(10):
            raise AssertionError("the test never released the load")
        return super().load(version)


def test_ping_is_not_ready_until_the_default_answers_and_stays_ready_after_a_failed_switch() -> None:
    registry = SlowRegistry()

    async def scenario() -> list[int]:
        model = service(registry)
        seen = [http.scoring_ping(model.ready).status_code]  # nothing asked to load yet
        switching = asyncio.create_task(model.set_default("1"))
        assert await asyncio.to_thread(registry.loading.wait, 10)
        seen.append(http.scoring_ping(model.ready).status_code)  # the default is loading
        registry.release.set()
        await switching
        seen.append(http.scoring_ping(model.ready).status_code)
        await model.set_default("2")  # fails: "1" keeps answering
        seen.append(http.scoring_ping(model.ready).status_code)
        return seen

    assert asyncio.run(scenario()) == [404, 404, 200, 200]
