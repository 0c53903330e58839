"""Registry port: pure parts with a mock transport, then against a real `mlflow server`."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import certifi
import httpx
import pytest
import yaml
from regserve_operator import registry as registry_module
from regserve_operator.ports import Credentials, ModelFacts, NotFound, RegistryError, RegistryUnreachable
from regserve_operator.registry import (
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
