"""`regserve dev`'s control API and session file, in process: the real aiohttp server on loopback, the
real client, a real DevSession and Driver whose target is never reached (nothing here is reconciled, so
no Ray is needed; tests/local/test_control_live.py runs the whole thing against real Ray and MLflow)."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from regserve_operator import local
from regserve_operator.builders import BuildDefaults
from regserve_operator.driver import Driver
from regserve_operator.local import DevSession, Reporter
from regserve_operator.local_client import (
    LocalControlClient,
    LocalControlError,
    LocalSession,
    LocalSessionNotFound,
    session_path,
)
from regserve_operator.local_control import (
    MAX_BODY_BYTES,
    Refusal,
    Verdict,
    authorized,
    control_server,
    live_session,
    manifest_spec,
    session_file,
    session_verdict,
)
from regserve_operator.local_ray import LocalCluster
from regserve_operator.plan import Plan
from regserve_operator.reconcile import Deps
from regserve_operator.registry import Registry
from regserve_operator.spec import manifest as rms_manifest
from regserve_operator.targets.local import LocalRayTarget, ServeDashboard

from tests.operator.fakes import World, signature
from tests.operator.helpers import OWNER, make_spec

# A port nothing listens on: the target is never asked (nothing is reconciled in these tests).
UNUSED_DASHBOARD = "http://127.0.0.1:9"


def manifest(name: str = "m1", namespace: str | None = "default", **spec: Any) -> dict[str, Any]:
    base = {
        "model": {"name": "model", "alias": "champion"},
        "registry": {"trackingUri": "http://127.0.0.1:5000"},
    }
    return rms_manifest(name, base | spec, namespace=namespace)


# ------------------------------------------------------------------------------------- decisions


@dataclass(frozen=True)
class ManifestCase:
    name: str
    body: Any
    path: tuple[str, str]
    status: int | None  # None: accepted
    needle: str = ""


MANIFEST_CASES = [
    ManifestCase("accepted", manifest(), ("default", "m1"), None),
    ManifestCase("namespace taken from the path", manifest(namespace=None), ("team", "m1"), None),
    ManifestCase("not an object", [1, 2], ("default", "m1"), 400, "JSON object"),
    ManifestCase("other kind", manifest() | {"kind": "Pod"}, ("default", "m1"), 400, "'Pod'"),
    ManifestCase("other group", manifest() | {"apiVersion": "x.io/v1"}, ("default", "m1"), 400, "x.io"),
    ManifestCase("name differs", manifest(name="other"), ("default", "m1"), 400, "metadata.name ('other')"),
    ManifestCase("namespace differs", manifest(), ("team", "m1"), 400, "metadata.namespace ('default')"),
    ManifestCase("no metadata", manifest() | {"metadata": None}, ("default", "m1"), 400, "metadata"),
    ManifestCase("bad name in path", manifest(name="M_1"), ("default", "M_1"), 400, "RFC 1123"),
    ManifestCase("no spec", manifest() | {"spec": None}, ("default", "m1"), 422, "spec"),
    ManifestCase(
        "invalid spec", manifest(serving={"cpusPerReplica": -1}), ("default", "m1"), 422, "is invalid"
    ),
]


@pytest.mark.parametrize("case", MANIFEST_CASES, ids=[c.name for c in MANIFEST_CASES])
def test_manifest_spec(case: ManifestCase) -> None:
    if case.status is None:
        spec = manifest_spec(case.body, *case.path)
        assert spec.model.name == "model"
        return
    with pytest.raises(Refusal) as refused:
        manifest_spec(case.body, *case.path)
    assert refused.value.status == case.status
    assert case.needle in refused.value.message or any(
        case.needle in field["path"] for field in refused.value.fields
    )


def test_invalid_spec_names_each_field() -> None:
    with pytest.raises(Refusal) as refused:
        manifest_spec(manifest(serving={"cpusPerReplica": -1, "bogus": 1}), "default", "m1")
    fields = {field["path"]: field["type"] for field in refused.value.fields}
    assert fields == {
        "spec.serving.cpusPerReplica": "greater_than_equal",
        "spec.serving.bogus": "extra_forbidden",
    }


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (None, False),
        ("", False),
        ("Bearer", False),
        ("Bearer wrong", False),
        ("Basic s3cret", False),
        ("Bearer s3cret", True),
        ("bearer s3cret", True),
        ("Bearer s3cret-and-more", False),
    ],
)
def test_authorized(header: str | None, expected: bool) -> None:
    assert authorized(header, "s3cret") is expected


SESSION = LocalSession("http://127.0.0.1:1", "t", "http://127.0.0.1:8000", 1)


@pytest.mark.parametrize(
    ("found", "alive", "answers", "verdict"),
    [
        (None, False, False, Verdict.START),
        (SESSION, False, False, Verdict.START),  # the process is gone
        (SESSION, True, False, Verdict.START),  # the pid was reused, or the API is gone
        (SESSION, True, True, Verdict.REFUSE),
    ],
)
def test_session_verdict(found: LocalSession | None, alive: bool, answers: bool, verdict: Verdict) -> None:
    assert session_verdict(found, process_alive=alive, answers=answers) is verdict


# ---------------------------------------------------------------------------------------- server


def offline_session(lines: list[str]) -> DevSession:
    target = LocalRayTarget(ServeDashboard(UNUSED_DASHBOARD))
    deps = Deps(registry=Registry(), target=target, defaults=BuildDefaults(image="ray", ray_version="2"))
    reporter = Reporter(out=lines.append)
    driver = Driver(deps, on_event=reporter.event)
    return DevSession([], driver, target, LocalCluster(UNUSED_DASHBOARD), reporter)


@dataclass
class Running:
    session: DevSession
    url: str
    token: str
    lines: list[str]

    def client(self, token: str | None = None) -> LocalControlClient:
        return LocalControlClient(
            LocalSession(self.url, token or self.token, "http://127.0.0.1:8000", os.getpid())
        )


@pytest.fixture
def running() -> Iterator[Running]:
    lines: list[str] = []
    session = offline_session(lines)
    with control_server(session, "the-token") as url:
        yield Running(session, url, "the-token", lines)


def test_requests_without_the_token_are_refused(running: Running) -> None:
    for headers in ({}, {"Authorization": "Bearer not-the-token"}):
        answer = httpx.get(f"{running.url}/resources", headers=headers, timeout=10)
        assert answer.status_code == 401
        assert answer.headers["WWW-Authenticate"] == "Bearer"
    answer = httpx.put(f"{running.url}/resources/default/m1", json=manifest(), timeout=10)
    assert answer.status_code == 401
    with pytest.raises(LocalControlError) as refused:
        running.client(token="not-the-token").apply(manifest())
    assert refused.value.status == 401
    assert running.session.snapshot() == []


def test_apply_get_list_delete(running: Running) -> None:
    client = running.client()
    created = client.apply(manifest("m1"))
    assert created["kind"] == "RegisteredModelServing"
    assert created["metadata"]["name"] == "m1" and created["metadata"]["namespace"] == "default"
    assert created["metadata"]["generation"] == 1
    assert created["spec"] == manifest("m1")["spec"]  # as applied, defaults not filled in
    assert created["status"] == {}  # nothing reconciled yet: the operator writes nothing either
    client.apply(manifest("m2", namespace="team"))

    assert [o["metadata"]["name"] for o in client.list()] == ["m1", "m2"]
    assert [o["metadata"]["name"] for o in client.list("team")] == ["m2"]
    assert client.list("nobody") == []
    assert client.get("default", "m2") is None
    assert client.get("team", "m2") is not None

    # A new spec: the generation moves, the uid stays, the driver has the new spec.
    changed = client.apply(manifest("m1", serving={"cpusPerReplica": 0.5}))
    assert changed["metadata"]["generation"] == 2
    assert changed["metadata"]["uid"] == created["metadata"]["uid"]
    (resource,) = [r for r in running.session.snapshot() if r.owner.name == "m1"]
    assert resource.spec.serving.cpus_per_replica == 0.5
    # The same spec again changes nothing.
    assert client.apply(manifest("m1", serving={"cpusPerReplica": 0.5}))["metadata"]["generation"] == 2

    assert client.delete("default", "m1") is True
    assert client.delete("default", "m1") is False
    assert client.get("default", "m1") is None
    assert [o["metadata"]["name"] for o in client.list()] == ["m2"]
    assert [r.owner.name for r in running.session.snapshot()] == ["m2"]
    with pytest.raises(KeyError):
        running.session.driver.status(resource.owner)
    assert any("m1: deleted" in line for line in running.lines)


def test_invalid_manifests_are_refused_and_nothing_changes(running: Running) -> None:
    client = running.client()
    client.apply(manifest("m1"))

    with pytest.raises(LocalControlError) as refused:
        client.apply(manifest("m1", serving={"cpusPerReplica": -1}))
    assert refused.value.status == 422
    assert "spec.serving.cpusPerReplica" in refused.value.message

    answer = httpx.put(
        f"{running.url}/resources/default/m1",
        json=manifest("m1", rollout={"strategy": "Sometimes"}),
        headers={"Authorization": f"Bearer {running.token}"},
        timeout=10,
    )
    assert answer.status_code == 422
    assert [f["path"] for f in answer.json()["fields"]] == ["spec.rollout.strategy"]

    # The path and metadata disagree.
    answer = httpx.put(
        f"{running.url}/resources/default/m2",
        json=manifest("m1"),
        headers={"Authorization": f"Bearer {running.token}"},
        timeout=10,
    )
    assert answer.status_code == 400
    assert "does not match the name in the URL" in answer.json()["message"]

    # Larger than the bound: refused before it is read.
    big = manifest("m1") | {"padding": "x" * MAX_BODY_BYTES}
    answer = httpx.put(
        f"{running.url}/resources/default/m1",
        content=json.dumps(big),
        headers={"Authorization": f"Bearer {running.token}", "Content-Type": "application/json"},
        timeout=10,
    )
    assert answer.status_code == 413

    (kept,) = client.list()
    assert kept["spec"] == manifest("m1")["spec"] and kept["metadata"]["generation"] == 1


# ----------------------------------------------------------------------------------- session file


def test_session_file_is_private_and_removed(running: Running, tmp_path: Path) -> None:
    path = tmp_path / "state" / "dev-session.json"
    mine = LocalSession(running.url, running.token, "http://127.0.0.1:8000", os.getpid())
    with session_file(path, mine):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
        assert json.loads(path.read_text()) == {
            "controlUrl": running.url,
            "token": running.token,
            "serveUrl": "http://127.0.0.1:8000",
            "pid": os.getpid(),
        }
        client = LocalControlClient.discover(path)
        assert client.serve_url == "http://127.0.0.1:8000"
        assert client.list() == []
        # A second session on the same file is refused while this one answers.
        assert live_session(path) == mine
        with pytest.raises(SystemExit, match="already runs"), session_file(path, mine):
            pass
        assert path.exists()
    assert not path.exists()


def test_a_stale_session_file_is_replaced(running: Running, tmp_path: Path) -> None:
    path = tmp_path / "dev-session.json"
    ended = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True)
    dead_pid = int(ended.stdout)
    stale = [
        LocalSession(running.url, running.token, "http://127.0.0.1:8000", dead_pid),  # the process ended
        LocalSession(running.url, "another-token", "http://127.0.0.1:8000", os.getpid()),  # not its API
    ]
    for found in stale:
        path.write_text(json.dumps(found.to_json()))
        assert live_session(path) is None
        mine = LocalSession(running.url, running.token, "http://127.0.0.1:8000", os.getpid())
        with session_file(path, mine):
            assert LocalControlClient.discover(path).session == mine
        assert not path.exists()


@pytest.mark.parametrize(
    ("content", "needle"),
    [
        (None, "start one with `regserve dev`"),
        ("not json", "not a regserve dev session file"),
        ('{"controlUrl": "http://10.0.0.1:80", "token": "t", "serveUrl": "s", "pid": 1}', "this machine"),
        ('{"controlUrl": "http://127.0.0.1:80", "token": "t", "serveUrl": "s", "pid": "1"}', "pid"),
    ],
)
def test_discover_refuses_what_is_not_a_session(tmp_path: Path, content: str | None, needle: str) -> None:
    path = tmp_path / "dev-session.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(LocalSessionNotFound, match=needle):
        LocalControlClient.discover(path)


def test_discover_refuses_an_ended_session(tmp_path: Path) -> None:
    ended = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True)
    path = tmp_path / "dev-session.json"
    path.write_text(json.dumps(LocalSession("http://127.0.0.1:1", "t", "s", int(ended.stdout)).to_json()))
    with pytest.raises(LocalSessionNotFound, match="has ended"):
        LocalControlClient.discover(path)


def test_a_session_that_does_not_answer_is_not_found() -> None:
    client = LocalControlClient(LocalSession("http://127.0.0.1:9", "t", "s", os.getpid()))
    with pytest.raises(LocalSessionNotFound, match="regserve dev"):
        client.list()


def test_session_path(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("REGSERVE_DEV_SESSION", str(tmp_path / "s.json"))
    assert session_path() == tmp_path / "s.json"
    monkeypatch.delenv("REGSERVE_DEV_SESSION")
    assert session_path() == Path.home() / ".regserve" / "dev-session.json"


def test_the_client_imports_without_ray() -> None:
    code = (
        "import sys, regserve_operator.local_client; "
        "sys.exit(1 if any(m == 'ray' or m.startswith('ray.') for m in sys.modules) else 0)"
    )
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


# ----------------------------------------------------------------------------------- Driver.remove


def test_a_removed_resource_is_not_reconciled_again() -> None:
    world = World(make_spec())
    world.server.add("1", signature(prompt="string"))
    world.server.aliases["champion"] = "1"
    driver = Driver(world.deps, clock=lambda: world.clock, now=lambda: world.now)
    driver.apply(OWNER, world.spec)
    driver.run_once()
    assert len(world.target.applied) == 1

    last = driver.remove(OWNER)
    assert last is not None and last.resolved_version == "1"
    assert driver.generation(OWNER) is None
    world.advance(3600)  # would be due by its poll interval
    assert driver.run_once() == []
    assert len(world.target.applied) == 1
    assert driver.remove(OWNER) is None


def test_remove_waits_for_a_reconcile_in_flight() -> None:
    """The caller deletes what was applied once `remove` returns: no pass may apply after that."""
    world = World(make_spec())
    world.server.add("1", signature(prompt="string"))
    world.server.aliases["champion"] = "1"
    entered, release = threading.Event(), threading.Event()
    order: list[str] = []
    get, apply = world.target.get, world.target.apply

    def held_get(namespace: str, name: str) -> dict[str, Any] | None:
        entered.set()
        release.wait(30)
        return get(namespace, name)

    def recorded_apply(plan: Plan) -> None:
        apply(plan)
        order.append("applied")

    world.target.get = held_get  # type: ignore[method-assign]
    world.target.apply = recorded_apply  # type: ignore[method-assign]
    driver = Driver(world.deps, clock=lambda: world.clock, now=lambda: world.now, pass_deadline_s=0.05)
    driver.apply(OWNER, world.spec)
    driver.run_once()  # returns at its deadline, the reconcile still held in the target
    assert entered.wait(30)

    remover = threading.Thread(target=lambda: (driver.remove(OWNER), order.append("removed")))
    remover.start()
    release.set()
    remover.join(30)
    assert order == ["applied", "removed"]
    world.advance(3600)
    driver.run_once()
    assert order == ["applied", "removed"]
    stop = threading.Event()
    stop.set()
    driver.run_forever(stop)  # shuts its pool down


# ----------------------------------------------------------------------------------- regserve dev


class _Started(Exception):
    pass


def test_dev_starts_without_files_and_not_beside_a_live_session(
    running: Running, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    started: list[list[str]] = []

    def make_session(resources: list[Any], **_: Any) -> None:
        started.append([r.owner.name for r in resources])
        raise _Started

    monkeypatch.setattr(local, "make_session", make_session)
    monkeypatch.setenv("REGSERVE_DEV_SESSION", str(tmp_path / "default.json"))
    with pytest.raises(_Started):
        local.main([])
    assert started == [[]]

    live = tmp_path / "live.json"
    live.write_text(json.dumps(LocalSession(running.url, running.token, "s", os.getpid()).to_json()))
    with pytest.raises(SystemExit, match=f"already runs .*{live}"):
        local.main(["--session-file", str(live)])
    monkeypatch.setenv("REGSERVE_DEV_SESSION", str(live))
    with pytest.raises(SystemExit, match="already runs"):
        local.main([])
    assert started == [[]]  # no Ray cluster was started for the refused ones
