"""Registry port: pure parts with a mock transport, then against a real `mlflow server`."""

from __future__ import annotations

import itertools
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
import tracemalloc
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import certifi
import httpx
import pytest
import yaml
from regserve_operator import registry as registry_module
from regserve_operator.ports import Credentials, ModelFacts, NotFound, RegistryError, RegistryUnreachable
from regserve_operator.registry import (
    MIN_REFETCH_S,
    POLLER_IDLE_S,
    SEARCH_PAGE_MAX_BYTES,
    SEARCH_PASS_MAX_BYTES,
    MalformedAnswer,
    Poller,
    Registry,
    Snapshot,
    fetch_facts_over_rest,
    fetch_facts_with_mlflow,
    parse_search_page,
    resolve_in,
)
from regserve_operator.requirements import check_requirements
from regserve_operator.sandbox.mlflow_server import MlflowServer
from regserve_operator.spec import ModelSelector

from serving_app.mlmodel import ARTIFACTS_PATH, DOWNLOAD_URI_PATH, Unreadable
from tests.reliability.hostile_mlflow import LARGE_PAGE_BYTES, HostileMlflow

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
    assert creds.registry_auth.client("http://mlflow").headers["Authorization"] == "Bearer s3cr3t"
    basic = Credentials.from_mapping({"MLFLOW_TRACKING_USERNAME": "u", "MLFLOW_TRACKING_PASSWORD": "p"})
    basic_client = basic.registry_auth.client("http://mlflow")
    assert basic_client.auth is not None and "Authorization" not in basic_client.headers
    assert creds.fingerprint != basic.fingerprint


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


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
    poller = Poller("http://mlflow", creds, transport=_transport(pages, seen), clock=clock, sleep=clock.sleep)
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


# ------------------------------------------------------------------------------- facts over REST (mock)

MLMODEL = {
    "flavors": {"python_function": {"loader_module": "mlflow.pyfunc.model"}, "sklearn": {}},
    "model_size_bytes": 1234,
    "signature": {
        "inputs": '[{"type": "string", "name": "prompt", "required": true}]',
        "outputs": '[{"type": "tensor", "tensor-spec": {"dtype": "int64", "shape": [-1]}}]',
        "params": None,
    },
}
LOCATION = "mlflow-artifacts:/0/models/m-abc/artifacts"
SECRET = "s3cr3t-token"


class FakeMlflow:
    """The REST surface the facts fetch uses; records every request."""

    def __init__(self, location: str = LOCATION, mlmodel: str | None = None) -> None:
        self.location = location
        self.mlmodel = yaml.safe_dump(MLMODEL) if mlmodel is None else mlmodel
        self.requests: list[httpx.Request] = []
        self.answers: dict[str, httpx.Response] = {}

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        path = request.url.path.removeprefix("/prefix")
        if path in self.answers:
            return self.answers[path]
        if path == DOWNLOAD_URI_PATH:
            if request.url.params["version"] == "9":
                return httpx.Response(
                    404,
                    json={
                        "error_code": "RESOURCE_DOES_NOT_EXIST",
                        "message": f"Model Version (name=m, version=9) not found {SECRET}",
                    },
                )
            return httpx.Response(200, json={"artifact_uri": self.location})
        if path == f"{ARTIFACTS_PATH}/0/models/m-abc/artifacts/MLmodel":
            return httpx.Response(200, text=self.mlmodel)
        if path == f"{ARTIFACTS_PATH}/0/models/m-abc/artifacts/requirements.txt":
            return httpx.Response(200, text="# pinned\nmlflow==3.17.2\n\n-r extra.txt\nscikit-learn==1.9.1\n")
        return httpx.Response(
            404, json={"error_code": "RESOURCE_DOES_NOT_EXIST", "message": "No such artifact"}
        )


def _rest(
    server: FakeMlflow, creds: Credentials = Credentials(), version: str = "1", uri: str = "http://mlflow"
) -> ModelFacts:
    return fetch_facts_over_rest(uri, creds, "m", version, transport=httpx.MockTransport(server))


@pytest.mark.parametrize(
    ("env", "header"),
    [
        ({"MLFLOW_TRACKING_TOKEN": SECRET}, f"Bearer {SECRET}"),
        (
            {"MLFLOW_TRACKING_USERNAME": "u", "MLFLOW_TRACKING_PASSWORD": SECRET},
            httpx.BasicAuth("u", SECRET)._auth_header,
        ),
    ],
)
def test_rest_facts_with_credentials_on_every_request(env: dict[str, str], header: str) -> None:
    server = FakeMlflow()
    facts = _rest(server, Credentials.from_mapping(env), uri="http://mlflow/prefix/")
    assert facts == ModelFacts(
        "m",
        "1",
        MLMODEL["signature"],
        ("python_function", "sklearn"),
        1234,
        ("mlflow==3.17.2", "scikit-learn==1.9.1"),
    )
    assert [r.url.path for r in server.requests] == [
        f"/prefix{DOWNLOAD_URI_PATH}",
        f"/prefix{ARTIFACTS_PATH}/0/models/m-abc/artifacts/MLmodel",
        f"/prefix{ARTIFACTS_PATH}/0/models/m-abc/artifacts/requirements.txt",
    ]
    assert all(r.headers["Authorization"] == header for r in server.requests)


def test_rest_facts_error_mapping_never_shows_credentials() -> None:
    creds = Credentials.from_mapping({"MLFLOW_TRACKING_TOKEN": SECRET})
    with pytest.raises(NotFound, match=r"models:/m/9: Model Version .* not found") as raised:
        _rest(FakeMlflow(), creds, version="9")
    assert SECRET not in str(raised.value)
    missing = FakeMlflow()
    missing.answers[f"{ARTIFACTS_PATH}/0/models/m-abc/artifacts/MLmodel"] = httpx.Response(
        404, json={"error_code": "RESOURCE_DOES_NOT_EXIST", "message": "No such artifact"}
    )
    # The version exists (its location resolved) but its files are gone: broken, not unknown.
    with pytest.raises(Unreadable, match="no MLmodel"):
        _rest(missing, creds)
    for status, body in [(503, {}), (401, {"echo": f"Bearer {SECRET}"}), (404, {"html": SECRET})]:
        server = FakeMlflow()
        server.answers[DOWNLOAD_URI_PATH] = httpx.Response(status, json=body)
        with pytest.raises(RegistryUnreachable, match=f"HTTP {status}") as unreachable:
            _rest(server, creds)
        assert SECRET not in str(unreachable.value)
    login_page = FakeMlflow()
    login_page.answers[DOWNLOAD_URI_PATH] = httpx.Response(200, text="<html>sign in</html>")
    with pytest.raises(RegistryUnreachable, match="no MLflow JSON"):
        _rest(login_page, creds)
    with pytest.raises(RegistryUnreachable):
        fetch_facts_over_rest("http://127.0.0.1:9", creds, "m", "1")


def test_rest_facts_without_requirements() -> None:
    server = FakeMlflow()
    server.answers[f"{ARTIFACTS_PATH}/0/models/m-abc/artifacts/requirements.txt"] = httpx.Response(500)
    assert _rest(server).requirements == ()


@pytest.mark.parametrize("text", ["flavors: {", "just a string", "signature: {inputs: '[{\"name\": 1}]'}"])
def test_unreadable_mlmodel_is_not_a_registry_error(text: str) -> None:
    # Reconcile holds such a version; a RegistryError would mark the registry unreachable instead.
    with pytest.raises((ValueError, yaml.YAMLError)) as raised:
        _rest(FakeMlflow(mlmodel=text))
    assert not isinstance(raised.value, RegistryError)


@pytest.mark.parametrize(
    "location",
    [
        "s3://bucket/0/models/m-abc/artifacts",
        "gs://bucket/models/m-abc",
        "runs:/0123/model",
        "/mnt/mlruns/0/models/m-abc/artifacts",
        "mlflow-artifacts://other-host:5000/0/models/m-abc/artifacts",
    ],
)
def test_other_artifact_stores_use_the_mlflow_client(location: str, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[str, str, str]] = []

    def with_mlflow(uri: str, creds: Credentials, name: str, version: str) -> ModelFacts:
        calls.append((uri, name, version))
        return ModelFacts(name, version, None, (), None)

    monkeypatch.setattr(registry_module, "fetch_facts_with_mlflow", with_mlflow)
    server = FakeMlflow(location=location)
    _rest(server)
    assert calls == [("http://mlflow", "m", "1")]
    assert [r.url.path for r in server.requests] == [DOWNLOAD_URI_PATH]


@pytest.mark.parametrize(
    "location",
    [
        "s3://bucket/0/models/m-abc/artifacts",
        "http://10.0.0.7:9000/internal/models/m-abc",
        "mlflow-artifacts://other-host:5000/0/models/m-abc/artifacts",
    ],
)
def test_the_policy_keeps_the_operator_to_the_artifact_proxy(
    location: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With reads outside the proxy off (the shared-cluster default), a location the registry names is
    never fetched by the operator: the version is unreadable, saying why."""

    def with_mlflow(uri: str, creds: Credentials, name: str, version: str) -> ModelFacts:
        raise AssertionError("the mlflow client was started")

    monkeypatch.setattr(registry_module, "fetch_facts_with_mlflow", with_mlflow)
    server = FakeMlflow(location=location)
    with pytest.raises(Unreadable, match="only through it"):
        fetch_facts_over_rest(
            "http://mlflow",
            Credentials(),
            "m",
            "1",
            transport=httpx.MockTransport(server),
            reads_outside_proxy=False,
        )
    assert [r.url.path for r in server.requests] == [DOWNLOAD_URI_PATH]


def test_same_host_proxy_uri_is_read_over_rest() -> None:
    server = FakeMlflow(location="mlflow-artifacts://MLFLOW/0/models/m-abc/artifacts")
    assert _rest(server).model_size_bytes == 1234


def test_mlflow_client_missing_is_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "mlflow", None)  # as in an installation without mlflow
    with pytest.raises(RegistryUnreachable, match="needs the mlflow package"):
        _rest(FakeMlflow(location="s3://bucket/m"))


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
    assert facts.signature is not None
    assert [c["name"] for c in json.loads(facts.signature["inputs"])] == ["x", "y"]
    assert "python_function" in facts.flavors
    assert facts.model_size_bytes and facts.model_size_bytes > 0
    assert "mlflow==3.17.2" in facts.requirements
    with pytest.raises(NotFound):
        registry.facts(mlflow_server.url, creds, "reg_model", "99")
    with pytest.raises(NotFound):
        registry.resolve(mlflow_server.url, creds, ModelSelector(name="no_such_model", alias="a"), 0)


def test_rest_facts_match_the_mlflow_client(mlflow_server: MlflowServer, registered: dict[str, str]) -> None:
    creds = Credentials()
    for version in registered.values():
        over_rest = fetch_facts_over_rest(mlflow_server.url, creds, "reg_model", version)
        with_mlflow = fetch_facts_with_mlflow(mlflow_server.url, creds, "reg_model", version)
        assert over_rest == with_mlflow


def test_rest_facts_do_not_import_mlflow(mlflow_server: MlflowServer, registered: dict[str, str]) -> None:
    code = (
        "import sys; from regserve_operator.ports import Credentials; "
        "from regserve_operator.registry import fetch_facts_over_rest as fetch; "
        f"f = fetch({mlflow_server.url!r}, Credentials(), 'reg_model', {registered['v1']!r}); "
        "print(f.flavors, f.model_size_bytes > 0, 'mlflow' in sys.modules)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    assert out.stdout.strip().endswith("True False"), out.stdout + out.stderr[-2000:]


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


def test_requests_share_a_transport_per_tls_setting_and_a_rotated_ca_bundle_gets_a_new_one(
    tmp_path: Path,
) -> None:
    bundle = tmp_path / "ca.pem"
    shutil.copy(certifi.where(), bundle)
    registry = Registry()
    plain = Credentials.from_mapping({"MLFLOW_TRACKING_TOKEN": "a"})
    other_token = Credentials.from_mapping({"MLFLOW_TRACKING_TOKEN": "b"})
    insecure = Credentials.from_mapping({"MLFLOW_TRACKING_INSECURE_TLS": "true"})
    pinned = Credentials.from_mapping({"MLFLOW_TRACKING_SERVER_CERT_PATH": str(bundle)})
    try:
        assert registry._transport_for(plain) is registry._transport_for(other_token)  # auth is per client
        assert registry._transport_for(insecure) is not registry._transport_for(plain)
        before = registry._transport_for(pinned)
        assert registry._transport_for(pinned) is before
        os.utime(bundle, ns=(0, bundle.stat().st_mtime_ns + 1_000_000_000))  # rotated in place
        assert registry._transport_for(pinned) is not before
    finally:
        registry.close()


class ClosesKeptAliveConnections:
    """A loopback HTTP server that answers the first request on each connection with keep-alive, then
    closes the connection when the next request arrives on it, as a server whose idle timeout ran out
    while the request was in flight does."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.connections = 0
        self.answered = 0
        self._thread = threading.Thread(target=self._serve, daemon=True)

    def __enter__(self) -> ClosesKeptAliveConnections:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        # close() alone does not wake a thread blocked in accept() on Linux; shutdown() does.
        self.listener.shutdown(socket.SHUT_RDWR)
        self.listener.close()
        self._thread.join(10)

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            self.connections += 1
            with conn:
                conn.recv(65536)
                body = json.dumps({"registered_models": []}).encode()
                head = f"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n"
                self.answered += 1  # before the answer leaves: the client may check as soon as it has it
                conn.sendall(head.encode() + b"\r\n" + body)
                conn.recv(65536)  # the next request on the kept-alive connection: closed unanswered


def test_a_pooled_connection_closed_under_a_request_is_retried_on_a_fresh_one() -> None:
    registry = Registry()
    credentials = Credentials.from_mapping({})
    with ClosesKeptAliveConnections() as server:
        try:
            poller = registry.poller(server.url, credentials)
            for _ in range(3):
                poller.invalidate()
                assert poller.snapshot(max_age=60).models == {}
            assert server.answered == 3 and server.connections == 3, (server.answered, server.connections)
        finally:
            registry.close()  # closes the pooled connection the server waits on, so it can stop


# ------------------------------------------------------------------------ bounded registry answers


@dataclass(frozen=True)
class PageCase:
    name: str
    body: Any
    problem: str | None  # None: parses


PAGE_CASES = [
    PageCase("a good page", PAGE, None),
    PageCase("no models", {}, None),
    PageCase("a list, not an object", [PAGE], "not a JSON object"),
    PageCase("models not a list", {"registered_models": "m"}, "registered_models is not a list"),
    PageCase("a model not an object", {"registered_models": ["m"]}, "registered_models is not a list"),
    PageCase("a name not a string", {"registered_models": [{"name": 7}]}, "registered_models[0].name"),
    PageCase("aliases not a list", {"registered_models": [{"name": "m", "aliases": {}}]}, ".aliases is not"),
    PageCase(
        "an alias not a string",
        {"registered_models": [{"name": "m", "aliases": [{"alias": 1, "version": "1"}]}]},
        "an alias is not a string",
    ),
    PageCase(
        "a version not a number",
        {"registered_models": [{"name": "m", "aliases": [{"alias": "a", "version": "1;x"}]}]},
        "a version is not a number",
    ),
    PageCase(
        "a version true",
        {"registered_models": [{"name": "m", "latest_versions": [{"version": True}]}]},
        "a version is not a number",
    ),
    PageCase(
        "a stage not a string",
        {"registered_models": [{"name": "m", "latest_versions": [{"version": "1", "current_stage": 3}]}]},
        "a stage is not a string",
    ),
]


@pytest.mark.parametrize("case", PAGE_CASES, ids=lambda case: case.name)
def test_a_search_page_of_another_shape_is_malformed(case: PageCase) -> None:
    if case.problem is None:
        assert isinstance(parse_search_page(case.body), dict)
        return
    with pytest.raises(MalformedAnswer, match=re.escape(case.problem)):
        parse_search_page(case.body)


def _lazy_body(total: int) -> Iterator[bytes]:
    sent = 0
    yield b'{"registered_models": ['
    while sent < total:
        sent += 1 << 16
        yield b" " * (1 << 16)


@dataclass(frozen=True)
class AnswerCase:
    name: str
    answer: Callable[[httpx.Request], httpx.Response]
    reason: str


ANSWER_CASES = [
    AnswerCase(
        "a login page", lambda r: httpx.Response(200, html="<html>Sign in</html>"), "answered no JSON"
    ),
    AnswerCase(
        "wrong types",
        lambda r: httpx.Response(200, json={"registered_models": [{"name": 7}]}),
        "no MLflow search page (registered_models[0].name is not a string)",
    ),
    AnswerCase(
        "a page token not a string",
        lambda r: httpx.Response(200, json={"registered_models": [], "next_page_token": 3}),
        "next_page_token is not a string",
    ),
    AnswerCase(
        "endless pages",
        lambda r: httpx.Response(200, json={"next_page_token": f"t{len(str(r.url))}"}),
        "more than 5 pages",
    ),
    AnswerCase(
        "a redirect to another host",
        lambda r: httpx.Response(302, headers={"Location": "http://elsewhere.example/api"}),
        "HTTP 302 (a redirect: not followed)",
    ),
    AnswerCase(
        "a declared 1 GiB body",
        lambda r: httpx.Response(200, headers={"Content-Length": str(1 << 30)}),
        f"answer of {1 << 30} bytes, more than {SEARCH_PAGE_MAX_BYTES}",
    ),
    AnswerCase(
        "a streamed 1 GiB body",
        lambda r: httpx.Response(200, content=_lazy_body(1 << 30)),
        f"answer longer than {SEARCH_PAGE_MAX_BYTES} bytes",
    ),
]


@pytest.mark.parametrize("case", ANSWER_CASES, ids=lambda case: case.name)
def test_a_bad_search_answer_is_unreachable_with_the_reason(case: AnswerCase) -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return case.answer(request)

    poller = Poller("http://mlflow", Credentials(), transport=httpx.MockTransport(handler), max_pages=5)
    with pytest.raises(RegistryUnreachable, match=re.escape(case.reason)):
        poller.snapshot(30)
    assert all(r.url.host == "mlflow" for r in seen)  # nothing sent elsewhere
    assert len(seen) <= 5


def test_facts_answers_are_bounded_too() -> None:
    too_big = FakeMlflow()
    too_big.answers[f"{ARTIFACTS_PATH}/0/models/m-abc/artifacts/MLmodel"] = httpx.Response(
        200, content=_lazy_body(1 << 30)
    )
    with pytest.raises(RegistryUnreachable, match="answer longer than"):
        _rest(too_big)
    not_a_string = FakeMlflow()
    not_a_string.answers[DOWNLOAD_URI_PATH] = httpx.Response(200, json={"artifact_uri": ["s3://x"]})
    with pytest.raises(RegistryUnreachable, match="artifact_uri is no string"):
        _rest(not_a_string)


@pytest.mark.parametrize("mode", ["trickle", "trickle-headers"])
def test_a_trickled_answer_ends_at_the_deadline(mode: str) -> None:
    """Each byte comes well within the 10 s per-read timeout; the whole answer never does."""
    with HostileMlflow(trickle_interval_s=0.2) as server:
        registry = Registry(deadline_s=1.5)
        try:
            started = time.monotonic()
            with pytest.raises(RegistryUnreachable, match=r"no complete answer within 1\.5 s"):
                registry.poller(server.url(mode), Credentials()).snapshot(30)
            assert time.monotonic() - started < 3.0
            started = time.monotonic()
            with pytest.raises(RegistryUnreachable, match=r"no complete answer within 1\.5 s"):
                registry.facts(server.url(mode), Credentials(), "m", "1")
            assert time.monotonic() - started < 3.0
        finally:
            registry.close()


class Gate:
    """A transport whose first search waits until released."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()
        self.searches = 0

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.searches += 1
        if self.searches == 1:
            self.entered.set()
            assert self.release.wait(30)
        return httpx.Response(200, json={"registered_models": [{"name": f"m{self.searches}"}]})


def test_invalidating_during_a_fetch_neither_waits_for_it_nor_is_lost() -> None:
    gate = Gate()
    poller = Poller("http://mlflow", Credentials(), transport=httpx.MockTransport(gate), wait_s=0.3)
    first: list[Snapshot] = []
    fetching = threading.Thread(target=lambda: first.append(poller.snapshot(3600)))
    fetching.start()
    try:
        assert gate.entered.wait(10)
        started = time.monotonic()
        poller.invalidate()
        assert time.monotonic() - started < 0.1
        # Another caller waits for the running search at most wait_s, then says so.
        with pytest.raises(RegistryUnreachable, match=r"no answer to the search within 0\.3 s"):
            poller.snapshot(3600)
    finally:
        gate.release.set()
        fetching.join(10)
    assert set(first[0].models) == {"m1"}
    # The invalidation came after that search began: the next caller fetches again.
    assert set(poller.snapshot(3600).models) == {"m2"} and gate.searches == 2
    assert set(poller.snapshot(3600).models) == {"m2"} and gate.searches == 2


def test_callers_during_a_fetch_share_it() -> None:
    gate = Gate()
    poller = Poller("http://mlflow", Credentials(), transport=httpx.MockTransport(gate))
    results: list[Snapshot] = []
    threads = [threading.Thread(target=lambda: results.append(poller.snapshot(3600))) for _ in range(4)]
    threads[0].start()
    assert gate.entered.wait(10)
    for thread in threads[1:]:
        thread.start()
    gate.release.set()
    for thread in threads:
        thread.join(10)
    assert len(results) == 4 and gate.searches == 1 and len({id(r) for r in results}) == 1


def test_a_pass_of_endless_large_pages_ends_at_its_byte_budget() -> None:
    """Each page is under the per-page cap and well-formed; only the pass's budget stops them, and
    the raw pages are dropped as they are parsed."""
    with HostileMlflow() as server:
        registry = Registry()
        tracemalloc.start()
        try:
            with pytest.raises(
                RegistryUnreachable, match=f"answers of one pass longer than {SEARCH_PASS_MAX_BYTES} bytes"
            ):
                registry.poller(server.url("endless-large"), Credentials()).snapshot(30)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
            registry.close()
        pages = server.requests["endless-large"]
    assert pages == SEARCH_PASS_MAX_BYTES // LARGE_PAGE_BYTES + 1, pages
    # One page being read, its copy and what parsing it takes; never the pages before it.
    assert peak < 4 * LARGE_PAGE_BYTES, f"peak {peak / 2**20:.1f} MiB"


def _one_model(clock: Clock, version: list[str], searches: list[float]) -> httpx.MockTransport:
    def handler(request: httpx.Request) -> httpx.Response:
        searches.append(clock.now)
        page = {"registered_models": [{"name": "m", "aliases": [{"alias": "a", "version": version[0]}]}]}
        return httpx.Response(200, json=page)

    return httpx.MockTransport(handler)


def test_a_flood_of_webhook_deliveries_is_one_search_per_interval_and_no_wake_is_lost() -> None:
    clock, version, searches = Clock(), ["1"], []
    registry = Registry(transport=_one_model(clock, version, searches), clock=clock, sleep=clock.sleep)
    creds, selector = Credentials(), ModelSelector(name="m", alias="a")
    assert registry.resolve("http://mlflow", creds, selector, 300) == "1"
    for burst in range(2, 30):
        clock.now += 0.1
        version[0] = str(burst)
        for _ in range(50):  # forged or not, each delivery invalidates every poller
            registry.model_changed("m")
        # The reconcile the delivery woke sees the change: the first delivery after a poll is fetched
        # at once, each later one once the snapshot fetched for the one before is MIN_REFETCH_S old.
        slept = len(clock.slept)
        assert registry.resolve("http://mlflow", creds, selector, 300) == str(burst)
        if burst == 2:
            assert len(clock.slept) == slept
        else:
            assert clock.slept[slept:] == [pytest.approx(MIN_REFETCH_S - 0.1)]
    gaps = [later - earlier for earlier, later in itertools.pairwise(searches)]
    assert len(searches) == 29 and min(gaps[1:]) >= MIN_REFETCH_S - 1e-9  # (float sums of 0.1)
    # A delivery for a snapshot older than MIN_REFETCH_S is fetched at once too.
    clock.now += 10
    slept = len(clock.slept)
    registry.model_changed("m")
    version[0] = "99"
    assert registry.resolve("http://mlflow", creds, selector, 300) == "99"
    assert len(clock.slept) == slept and len(searches) == 30


def test_pollers_not_asked_for_are_dropped_and_their_number_is_capped() -> None:
    clock, searches = Clock(), []
    registry = Registry(transport=_one_model(clock, ["1"], searches), clock=clock, max_pollers=3)
    fast = registry.poller("http://a", Credentials())
    fast.snapshot(30)
    slow = registry.poller("http://b", Credentials())
    slow.snapshot(1000)  # polled every 1000 s: kept 10 of its intervals
    clock.now += POLLER_IDLE_S - 1
    assert registry.poller("http://a", Credentials()) is fast  # asking keeps it
    clock.now += POLLER_IDLE_S - 1
    registry.poller("http://c", Credentials())  # any access sweeps (at most once a minute)
    assert registry.poller("http://a", Credentials()) is fast
    clock.now += 2
    registry.poller("http://c", Credentials())
    assert registry.poller("http://b", Credentials()) is slow  # 10 x 1000 s not yet passed
    clock.now += POLLER_IDLE_S + 1
    registry.poller("http://c", Credentials())
    assert registry.poller("http://a", Credentials()) is not fast  # idle for over an hour
    # A dropped poller is no longer invalidated.
    registry.model_changed("m")
    assert fast._generation == 0


def test_at_most_max_pollers_are_kept_least_recently_used_out_first() -> None:
    clock = Clock()
    registry = Registry(transport=_one_model(clock, ["1"], []), clock=clock, max_pollers=3)
    first, second, third = (registry.poller(f"http://{n}", Credentials()) for n in ("a", "b", "c"))
    assert registry.poller("http://a", Credentials()) is first  # now the most recently used
    registry.poller("http://d", Credentials())
    assert registry.poller("http://a", Credentials()) is first
    assert registry.poller("http://c", Credentials()) is third
    assert registry.poller("http://b", Credentials()) is not second


def test_a_transport_no_poller_holds_is_shut_down_once_idle(tmp_path: Path) -> None:
    bundle = tmp_path / "ca.pem"
    shutil.copy(certifi.where(), bundle)
    clock = Clock()
    registry = Registry(clock=clock)
    pinned = Credentials.from_mapping({"MLFLOW_TRACKING_SERVER_CERT_PATH": str(bundle)})
    try:
        old = registry.poller("http://a", pinned).transport
        os.utime(bundle, ns=(0, bundle.stat().st_mtime_ns + 1_000_000_000))  # rotated in place
        clock.now += 120
        registry.poller("http://b", pinned)  # a sweep: the old transport is held by a's poller
        assert any(transport is old for transport, _ in registry._shared.values())
        clock.now += POLLER_IDLE_S + 1
        registry.poller("http://b", pinned)  # a's poller idle for over an hour: it and its transport go
        assert not any(transport is old for transport, _ in registry._shared.values())
        assert len(registry._shared) == 1
    finally:
        registry.close()


def test_concurrent_callers_during_a_flood_still_search_at_most_once_per_interval() -> None:
    searches: list[float] = []
    version = ["1"]

    def handler(request: httpx.Request) -> httpx.Response:
        searches.append(time.monotonic())
        page = {"registered_models": [{"name": "m", "aliases": [{"alias": "a", "version": version[0]}]}]}
        return httpx.Response(200, json=page)

    registry = Registry(transport=httpx.MockTransport(handler), min_refetch_s=0.3)
    creds, selector = Credentials(), ModelSelector(name="m", alias="a")
    registry.resolve("http://mlflow", creds, selector, 300)  # the poll before the flood
    stop = threading.Event()

    def flood_and_resolve() -> None:
        while not stop.is_set():
            registry.model_changed("m")
            registry.resolve("http://mlflow", creds, selector, 300)

    workers = [threading.Thread(target=flood_and_resolve) for _ in range(8)]
    for worker in workers:
        worker.start()
    time.sleep(2.0)  # the flood's length, not a synchronisation
    stop.set()
    for worker in workers:
        worker.join(10)
    gaps = [later - earlier for earlier, later in itertools.pairwise(searches)]
    # After the poll, the first delivery's search at once; then one per 0.3 s at most.
    assert 3 <= len(searches) <= 2.0 / 0.3 + 3 and min(gaps[1:]) >= 0.3, gaps
    version[0] = "2"
    registry.model_changed("m")
    assert registry.resolve("http://mlflow", creds, selector, 300) == "2"  # the last wake is not lost
