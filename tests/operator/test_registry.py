"""Registry port: pure parts with a mock transport, then against a real `mlflow server`."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from regserve_operator.registry import (
    Credentials,
    ModelFacts,
    NotFound,
    Poller,
    Registry,
    RegistryUnreachable,
    Snapshot,
    check_requirements,
    parse_search_page,
    resolve_in,
)
from regserve_operator.spec import ModelSelector

from tests.support.mlflow_server import MlflowServer

from .counting_proxy import CountingProxy
from .mlflow_fixture import log_version

PAGE = {
    "registered_models": [
        {
            "name": "m",
            "aliases": [{"alias": "champion", "version": "2"}, {"alias": "old", "version": 1}],
            "latest_versions": [
                {"version": "3", "current_stage": "Staging"},
                {"version": "2", "current_stage": "Production"},
                {"version": "4", "current_stage": "None"},
            ],
        },
        {"name": "bare"},
    ]
}
SNAP = Snapshot(models=parse_search_page(PAGE), fetched_at=0.0, requests=1)


@pytest.mark.parametrize(
    ("selector", "expected"),
    [
        ({"alias": "champion"}, "2"),
        ({"alias": "old"}, "1"),  # int from some stores: normalised to text
        ({"stage": "Production"}, "2"),
        ({"stage": "Staging"}, "3"),
        ({"version": "9"}, "9"),
        ({"alias": "nope"}, NotFound),
        ({"stage": "Archived"}, NotFound),
    ],
)
def test_resolve_in(selector: dict[str, str], expected: Any) -> None:
    sel = ModelSelector(name="m", **selector)
    if isinstance(expected, str):
        assert resolve_in(SNAP, sel) == expected
    else:
        with pytest.raises(expected):
            resolve_in(SNAP, sel)


def test_unknown_model_is_not_found() -> None:
    with pytest.raises(NotFound, match="'other' not found"):
        resolve_in(SNAP, ModelSelector(name="other", alias="a"))


def test_credentials_never_show_values() -> None:
    creds = Credentials.from_mapping({"MLFLOW_TRACKING_TOKEN": "s3cr3t", "AWS_SECRET_ACCESS_KEY": "k3y"})
    assert "s3cr3t" not in repr(creds) and "k3y" not in str(creds) and "s3cr3t" not in f"{creds}"
    assert creds.headers() == {"Authorization": "Bearer s3cr3t"}
    basic = Credentials.from_mapping({"MLFLOW_TRACKING_USERNAME": "u", "MLFLOW_TRACKING_PASSWORD": "p"})
    assert basic.auth() is not None and basic.headers() == {}
    assert creds.fingerprint != basic.fingerprint


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _transport(
    pages: list[dict[str, Any]], seen: list[httpx.Request], fail: list[bool] | None = None
) -> httpx.MockTransport:
    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        if fail and fail[0]:
            return httpx.Response(503)
        token = request.url.params.get("page_token")
        index = int(token) if token else 0
        body = dict(pages[index])
        if index + 1 < len(pages):
            body["next_page_token"] = str(index + 1)
        return httpx.Response(200, json=body)

    return httpx.MockTransport(handler)


def test_poller_fetches_once_per_interval_and_pages() -> None:
    seen: list[httpx.Request] = []
    clock = Clock()
    pages = [{"registered_models": [{"name": "a"}]}, {"registered_models": [{"name": "b"}]}]
    creds = Credentials.from_mapping({"MLFLOW_TRACKING_TOKEN": "t"})
    poller = Poller("http://mlflow", creds, transport=_transport(pages, seen), clock=clock)
    first = poller.snapshot(30)
    assert set(first.models) == {"a", "b"} and first.requests == 2
    assert seen[0].headers["Authorization"] == "Bearer t"
    for _ in range(10):
        poller.snapshot(30)
    assert len(seen) == 2
    clock.now += 31
    poller.snapshot(30)
    assert len(seen) == 4
    poller.invalidate()
    poller.snapshot(30)
    assert len(seen) == 6


def test_poller_backs_off_after_errors() -> None:
    seen: list[httpx.Request] = []
    clock = Clock()
    fail = [True]
    poller = Poller("http://mlflow", Credentials(), transport=_transport([{}], seen, fail), clock=clock)
    with pytest.raises(RegistryUnreachable, match="HTTP 503"):
        poller.snapshot(30)
    with pytest.raises(RegistryUnreachable):
        poller.snapshot(30)  # within backoff: no request
    assert len(seen) == 1
    clock.now += 2.5
    with pytest.raises(RegistryUnreachable):
        poller.snapshot(30)
    assert len(seen) == 2
    clock.now += 3  # second backoff is 4 s
    with pytest.raises(RegistryUnreachable):
        poller.snapshot(30)
    assert len(seen) == 2
    fail[0] = False
    clock.now += 2
    assert poller.snapshot(30).requests == 1


def test_unreachable_server() -> None:
    poller = Poller("http://127.0.0.1:9", Credentials())
    with pytest.raises(RegistryUnreachable):
        poller.snapshot(30)


def test_registry_shares_pollers_and_caches_facts() -> None:
    seen: list[httpx.Request] = []
    fetched: list[tuple[str, str]] = []

    def facts(uri: str, creds: Credentials, name: str, version: str) -> ModelFacts:
        fetched.append((name, version))
        return ModelFacts(name, version, None, ("python_function",), 1)

    registry = Registry(transport=_transport([PAGE], seen), fetch_facts=facts)
    creds = Credentials()
    for _ in range(5):
        assert registry.resolve("http://mlflow/", creds, ModelSelector(name="m", alias="champion"), 30) == "2"
        assert registry.resolve("http://mlflow", creds, ModelSelector(name="m", stage="Staging"), 30) == "3"
        registry.facts("http://mlflow", creds, "m", "2")
    assert len(seen) == 1 and fetched == [("m", "2")]
    registry.resolve(
        "http://mlflow",
        Credentials.from_mapping({"MLFLOW_TRACKING_TOKEN": "x"}),
        ModelSelector(name="m", alias="champion"),
        30,
    )
    assert len(seen) == 2  # other credentials, other view of the server


@pytest.mark.parametrize(
    ("requirements", "pins", "mismatches"),
    [
        (("mlflow==3.17.2", "pandas"), {"mlflow": "3.17.2"}, []),
        (("mlflow==3.16.0",), {"mlflow": "3.17.2"}, ["mlflow==3.16.0 (image has 3.17.2)"]),
        (
            ("scikit_learn==1.5.0 ; python_version>'3'",),
            {"scikit-learn": "1.6.1"},
            ["scikit-learn==1.5.0 (image has 1.6.1)"],
        ),
        (("torch==2.4",), {}, []),
    ],
)
def test_check_requirements(
    requirements: tuple[str, ...], pins: dict[str, str], mismatches: list[str]
) -> None:
    assert check_requirements(requirements, pins).mismatches == mismatches


# ----------------------------------------------------------------------------------- real mlflow server


@pytest.fixture(scope="module")
def registered(mlflow_server: MlflowServer) -> dict[str, str]:
    v1 = log_version(mlflow_server.url, "reg_model", {"x": "double"}, alias="champion")
    v2 = log_version(mlflow_server.url, "reg_model", {"x": "double", "y": "string"})
    import mlflow

    mlflow.MlflowClient(mlflow_server.url).transition_model_version_stage("reg_model", v2, "Staging")
    return {"v1": v1, "v2": v2}


def test_resolve_and_facts_against_mlflow(mlflow_server: MlflowServer, registered: dict[str, str]) -> None:
    registry = Registry()
    creds = Credentials()
    assert (
        registry.resolve(mlflow_server.url, creds, ModelSelector(name="reg_model", alias="champion"), 30)
        == registered["v1"]
    )
    assert (
        registry.resolve(mlflow_server.url, creds, ModelSelector(name="reg_model", stage="Staging"), 30)
        == registered["v2"]
    )
    facts = registry.facts(mlflow_server.url, creds, "reg_model", registered["v2"])
    assert [c.name for c in facts.signature.inputs.inputs] == ["x", "y"]
    assert "python_function" in facts.flavors
    assert facts.model_size_bytes and facts.model_size_bytes > 0
    assert "mlflow==3.17.2" in facts.requirements
    with pytest.raises(NotFound):
        registry.facts(mlflow_server.url, creds, "reg_model", "99")
    with pytest.raises(NotFound):
        registry.resolve(mlflow_server.url, creds, ModelSelector(name="no_such_model", alias="a"), 0)


@pytest.mark.parametrize("resources", [1, 50])
def test_poll_cost_does_not_grow_with_resources(
    mlflow_server: MlflowServer, registered: dict[str, str], resources: int, poll_counts: dict[int, int]
) -> None:
    """Full reconciles of 1 or 50 resources on one server, ticking 5 times per poll interval for 3
    intervals: the MLflow requests counted at the HTTP layer are the same."""
    from datetime import UTC, datetime, timedelta

    from regserve_operator.builders import Owner
    from regserve_operator.reconcile import Deps, reconcile
    from regserve_operator.spec import RegisteredModelServingStatus, parse_spec

    from .fakes import FakeTarget
    from .helpers import DEFAULTS

    clock = Clock()
    now = datetime(2026, 1, 1, tzinfo=UTC)
    with CountingProxy(mlflow_server.url) as proxy:
        deps = Deps(registry=Registry(clock=clock), target=FakeTarget(), defaults=DEFAULTS)
        spec = parse_spec(
            {"model": {"name": "reg_model", "alias": "champion"}, "registry": {"trackingUri": proxy.url}}
        )
        owners = [Owner(f"r{i}", "ml", f"uid-{i}") for i in range(resources)]
        statuses = {o.name: RegisteredModelServingStatus() for o in owners}
        for _tick in range(15):
            for owner in owners:
                statuses[owner.name] = reconcile(owner, 1, spec, statuses[owner.name], deps, now).status
            clock.now += 6.5
            now += timedelta(seconds=6.5)
        poll_counts[resources] = proxy.total()
        searches = proxy.counts["/api/2.0/mlflow/registered-models/search"]
    assert searches == 3
    assert all(s.serving_version == registered["v1"] for s in statuses.values())
    if len(poll_counts) == 2:
        assert poll_counts[1] == poll_counts[50]


@pytest.fixture(scope="module")
def poll_counts() -> dict[int, int]:
    return {}
