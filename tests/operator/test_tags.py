"""Deployment state tags in the registry: the pure rules (tags.py), the REST writes against a real
`mlflow server`, a registry refusing them (condition and one warning, never a stuck rollout), and our
own tag deliveries not waking the operator."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from regserve_operator import conditions as c
from regserve_operator.ports import Credentials, RegistryRefused, RegistryUnreachable
from regserve_operator.registry import Registry
from regserve_operator.sandbox.mlflow_server import MlflowServer
from regserve_operator.spec import HistoryEntry, RegisteredModelServingStatus, VersionRecord
from regserve_operator.tags import TagWrite, desired_tags, is_own_tag_event, tag_key, tag_writes
from regserve_operator.webhook import ReplayGuard, sign, verify

from .fakes import World, signature
from .helpers import make_spec
from .mlflow_fixture import log_version

URL = "http://127.0.0.1:8000/translator"
AT = "2026-01-01T00:00:00Z"


@dataclass
class TagCase:
    name: str
    status: RegisteredModelServingStatus
    want: dict[str, str]


TAGS = [
    TagCase("nothing served yet", RegisteredModelServingStatus(), {}),
    TagCase(
        "the default version", RegisteredModelServingStatus(last_good_version="1"), {"1": f"serving {URL}"}
    ),
    TagCase(
        "canary: the candidate's weight",
        RegisteredModelServingStatus(
            last_good_version="1", rollout_version="2", rollout_phase="Canary", rollout_weight=10
        ),
        {"1": f"serving {URL}", "2": f"canary 10% {URL}"},
    ),
    TagCase(
        "shadow",
        RegisteredModelServingStatus(
            last_good_version="1", rollout_version="2", rollout_phase="Shadow", rollout_weight=100
        ),
        {"1": f"serving {URL}", "2": f"shadow 100% {URL}"},
    ),
    TagCase(
        "smoke test and switch: the candidate is not tagged yet",
        RegisteredModelServingStatus(last_good_version="1", rollout_version="2", rollout_phase="SmokeTest"),
        {"1": f"serving {URL}"},
    ),
    TagCase(
        "held by its smoke test, with the error",
        RegisteredModelServingStatus(
            last_good_version="1",
            rejected=VersionRecord(version="2", reason="SmokeTestFailed", message="boom", at=AT),
        ),
        {"1": f"serving {URL}", "2": "held SmokeTestFailed: boom"},
    ),
    TagCase(
        "rolled back, with the cause and the figures",
        RegisteredModelServingStatus(
            last_good_version="1",
            rejected=VersionRecord(
                version="2", reason="RolledBack", cause="CanaryFailed", message="error rate 9%", at=AT
            ),
        ),
        {"1": f"serving {URL}", "2": "rolled-back CanaryFailed: error rate 9%"},
    ),
    TagCase(
        "promoted: the replaced version is superseded",
        RegisteredModelServingStatus(
            last_good_version="2",
            history=[
                HistoryEntry(version="2", outcome="Serving", at=AT),
                HistoryEntry(version="1", outcome="Superseded", at=AT, message="replaced by 2"),
            ],
        ),
        {"2": f"serving {URL}", "1": "superseded by 2"},
    ),
    TagCase(
        "only the last promotion's superseded version keeps its tag",
        RegisteredModelServingStatus(
            last_good_version="3",
            history=[
                HistoryEntry(version="1", outcome="Superseded", at=AT, message="replaced by 2"),
                HistoryEntry(version="2", outcome="Superseded", at=AT, message="replaced by 3"),
            ],
        ),
        {"3": f"serving {URL}", "2": "superseded by 3"},
    ),
]


@pytest.mark.parametrize("case", TAGS, ids=[t.name for t in TAGS])
def test_desired_tags(case: TagCase) -> None:
    status = case.status.model_copy(update={"url": URL})
    assert desired_tags(status, status.url) == case.want


def test_tag_writes_set_what_differs_and_delete_what_no_longer_applies() -> None:
    written = {"1": "serving u", "2": "canary 10% u", "5": "held Incompatible"}
    desired = {"1": "serving u", "2": "canary 50% u", "3": "superseded by 2"}
    assert tag_writes(written, desired) == [
        TagWrite("2", "canary 50% u"),
        TagWrite("3", "superseded by 2"),
        TagWrite("5", None),
    ]
    assert tag_writes(desired, desired) == []


@pytest.mark.parametrize(
    ("event", "key", "own"),
    [
        ("model_version_tag.set", "regserve.io/ml/translator", True),
        ("model_version_tag.deleted", "regserve.io/other/x", True),
        ("model_version_tag.set", "team", False),
        ("model_version_alias.created", "regserve.io/ml/translator", False),
        (None, None, False),
    ],
)
def test_is_own_tag_event(event: str | None, key: str | None, own: bool) -> None:
    assert is_own_tag_event(event, key) is own


def _delivery(data: dict[str, Any], entity: str, action: str) -> tuple[dict[str, str], bytes]:
    body = json.dumps({"entity": entity, "action": action, "data": data}).encode()
    headers = {
        "X-MLflow-Delivery-Id": f"d-{action}-{data.get('key')}",
        "X-MLflow-Timestamp": "1800000000",
        "X-MLflow-Signature": sign("s", f"d-{action}-{data.get('key')}", "1800000000", body),
    }
    return headers, body


def test_our_own_tag_deliveries_wake_nothing() -> None:
    guard = ReplayGuard()
    own = {"name": "m", "version": "2", "key": tag_key("ml", "translator"), "value": "serving"}
    headers, body = _delivery(own, "model_version_tag", "set")
    verdict = verify("s", headers, body, now=1_800_000_000, replay=guard)
    assert verdict.ok and verdict.model_name is None and verdict.event == "model_version_tag.set"
    theirs = {"name": "m", "version": "2", "key": "team", "value": "nlp"}
    headers, body = _delivery(theirs, "model_version_tag", "set")
    verdict = verify("s", headers, body, now=1_800_000_000, replay=guard)
    assert verdict.ok and verdict.model_name == "m"


# ----------------------------------------------------------------------------------- real mlflow server


def _tags(url: str, name: str, version: str) -> dict[str, str]:
    body = httpx.get(
        f"{url}/api/2.0/mlflow/model-versions/get", params={"name": name, "version": version}
    ).json()
    return {t["key"]: t["value"] for t in body["model_version"].get("tags", [])}


def test_tags_written_over_rest_to_mlflow(mlflow_server: MlflowServer) -> None:
    version = log_version(mlflow_server.url, "tagged_model", {"x": "double"})
    registry, creds, key = Registry(), Credentials(), tag_key("ml", "translator")
    registry.set_version_tag(mlflow_server.url, creds, "tagged_model", version, key, "canary 10% http://x")
    assert _tags(mlflow_server.url, "tagged_model", version)[key] == "canary 10% http://x"
    registry.set_version_tag(mlflow_server.url, creds, "tagged_model", version, key, "serving http://x")
    assert _tags(mlflow_server.url, "tagged_model", version)[key] == "serving http://x"
    registry.set_version_tag(mlflow_server.url, creds, "tagged_model", version, key, None)
    assert key not in _tags(mlflow_server.url, "tagged_model", version)
    # A tag already gone, or a version deleted from the registry: nothing left to do, no error.
    registry.set_version_tag(mlflow_server.url, creds, "tagged_model", version, key, None)
    registry.set_version_tag(mlflow_server.url, creds, "tagged_model", "999", key, None)


def test_refused_and_unreachable_writes_are_typed() -> None:
    refusing = Registry(transport=httpx.MockTransport(lambda request: httpx.Response(403)))
    with pytest.raises(RegistryRefused):
        refusing.set_version_tag("http://mlflow:5000", Credentials(), "m", "1", "regserve.io/a/b", "serving")
    failing = Registry(transport=httpx.MockTransport(lambda request: httpx.Response(503)))
    with pytest.raises(RegistryUnreachable):
        failing.set_version_tag("http://mlflow:5000", Credentials(), "m", "1", "regserve.io/a/b", None)


class _TagRefusingServer:
    """The fake registry answering searches, refusing tag writes with 403 (read-only credentials)."""

    def __init__(self, world: World) -> None:
        self.search = world.server.transport()
        self.refuse = True
        self.writes: list[dict[str, Any]] = []

    def handler(self, request: httpx.Request) -> httpx.Response:
        if "tag" in request.url.path:
            self.writes.append(json.loads(request.content))
            return httpx.Response(403 if self.refuse else 200, json={})
        return self.search.handle_request(request)


def test_a_registry_refusing_tag_writes_gets_a_condition_and_one_warning_never_a_stuck_rollout() -> None:
    world = World(make_spec(rollout={"smokeTest": False}))
    server = _TagRefusingServer(world)
    world.registry._transport = httpx.MockTransport(server.handler)
    world.server.add("1", signature(prompt="string"))
    world.server.add("2", signature(prompt="string"))
    world.server.aliases["champion"] = "1"
    world.step()
    world.target.set_app_status("RUNNING")
    world.step(6)
    assert world.status.last_good_version == "1"
    world.server.aliases["champion"] = "2"
    world.step()
    world.step(6)
    assert world.status.last_good_version == "2", "the rollout completed although no tag was written"
    refused = c.get_condition(world.status.conditions, c.REGISTRY_TAGS_WRITTEN)
    assert refused is not None and refused.status == "False" and "403" in refused.message
    assert [e for e in world.events if e[1] == "RegistryTagsNotWritten"] == [
        ("Warning", "RegistryTagsNotWritten")
    ]
    assert world.status.registry_tags is None, "nothing recorded as written"
    # Write access granted: the next pass writes the state and the condition clears.
    server.refuse = False
    server.writes.clear()
    world.step()
    assert world.status.registry_tags == {"2": f"serving {world.status.url}", "1": "superseded by 2"}
    assert sorted((w["version"], w["value"]) for w in server.writes) == [
        ("1", "superseded by 2"),
        ("2", f"serving {world.status.url}"),
    ]
    written = c.get_condition(world.status.conditions, c.REGISTRY_TAGS_WRITTEN)
    assert written is not None and written.status == "True"
    server.writes.clear()
    world.step()
    assert server.writes == [], "tags already written are not written again"
