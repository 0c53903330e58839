"""The registry-tags finalizer's decisions and patches (pure), and its time budget (a registry stand-in)."""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, cast

import jsonpatch
import pytest
from regserve_operator.finalizer import (
    FINALIZER,
    add_patch,
    finalizer_step,
    remove_patch,
    remove_tags,
)
from regserve_operator.policy import Policy
from regserve_operator.ports import Credentials, RegistryPort, RegistryUnreachable, Target

from .fakes import FakeTarget

TAGS = {"registryTags": {"3": "serving http://x", "2": "superseded by 3"}}
OTHER = "example.com/other"


def _body(
    *, finalizers: list[str] | None = None, deleting: bool = False, status: dict[str, Any] | None = None
) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": "translator", "namespace": "ml", "resourceVersion": "7"}
    if finalizers is not None:
        meta["finalizers"] = finalizers
    if deleting:
        meta["deletionTimestamp"] = "2026-12-07T13:00:00Z"
    return {
        "metadata": meta,
        "spec": {
            "model": {"name": "translation_model", "alias": "champion"},
            "registry": {"trackingUri": "http://mlflow:5000"},
        },
        "status": status or {},
    }


@dataclass(frozen=True)
class Case:
    name: str
    body: dict[str, Any]
    step: str


CASES = [
    Case("nothing written yet", _body(), "none"),
    Case("tags written: add", _body(status=TAGS), "add"),
    Case("tags written, another finalizer there: add", _body(finalizers=[OTHER], status=TAGS), "add"),
    Case("already ours", _body(finalizers=[FINALIZER], status=TAGS), "none"),
    Case("tags all removed, ours kept until deletion", _body(finalizers=[FINALIZER]), "none"),
    Case(
        "deleted with ours: finalize",
        _body(finalizers=[OTHER, FINALIZER], deleting=True, status=TAGS),
        "finalize",
    ),
    Case(
        "deleted without tags, with ours: finalize", _body(finalizers=[FINALIZER], deleting=True), "finalize"
    ),
    Case(
        "deleted before ours was added: nothing (none may be added)",
        _body(deleting=True, status=TAGS),
        "none",
    ),
]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_finalizer_step(case: Case) -> None:
    assert finalizer_step(case.body) == case.step


@pytest.mark.parametrize("before", [None, [], [OTHER], [OTHER, "x/y"]])
def test_add_then_remove_leaves_other_finalizers_as_they_were(before: list[str] | None) -> None:
    body = _body(finalizers=before, status=TAGS)
    added = jsonpatch.apply_patch(body, add_patch(body["metadata"]))
    assert added["metadata"]["finalizers"] == [*(before or []), FINALIZER]
    removed = jsonpatch.apply_patch(added, remove_patch(added["metadata"]))
    assert removed["metadata"]["finalizers"] == (before or [])


def test_patches_fail_on_an_object_that_changed_meanwhile() -> None:
    body = _body(finalizers=[OTHER], status=TAGS)
    changed = {**body, "metadata": {**body["metadata"], "resourceVersion": "8"}}
    with pytest.raises(jsonpatch.JsonPatchTestFailed):
        jsonpatch.apply_patch(changed, add_patch(body["metadata"]))
    ours = _body(finalizers=[OTHER, FINALIZER])
    reordered = _body(finalizers=[FINALIZER, OTHER])  # someone removed one in between: index moved
    with pytest.raises(jsonpatch.JsonPatchTestFailed):
        jsonpatch.apply_patch(reordered, remove_patch(ours["metadata"]))


class Tagger:
    """A registry stand-in for `set_version_tag` only: records deletions, or hangs, or refuses."""

    def __init__(self, *, hang_s: float = 0.0, refuse: bool = False) -> None:
        self.deleted: list[tuple[str, str, str]] = []
        self.hang_s = hang_s
        self.refuse = refuse
        self.released = threading.Event()

    def set_version_tag(
        self, uri: str, credentials: Credentials, name: str, version: str, key: str, value: str | None
    ) -> None:
        assert value is None
        if self.refuse:
            raise RegistryUnreachable(f"{uri}: ConnectError")
        self.released.wait(self.hang_s)
        self.deleted.append((name, version, key))


def _remove(tagger: Tagger, body: Mapping[str, Any], budget_s: float = 10.0) -> Any:
    return remove_tags(body, cast(RegistryPort, tagger), cast(Target, FakeTarget()), budget_s=budget_s)


def test_removes_every_tag_it_wrote() -> None:
    tagger = Tagger()
    removal = _remove(tagger, _body(finalizers=[FINALIZER], deleting=True, status=TAGS))
    assert removal.kept == () and removal.problem is None
    assert sorted(tagger.deleted) == [
        ("translation_model", "2", "regserve.io/ml/translator"),
        ("translation_model", "3", "regserve.io/ml/translator"),
    ]


def test_a_refusing_registry_is_reported_and_not_asked_again() -> None:
    tagger = Tagger(refuse=True)
    removal = _remove(tagger, _body(finalizers=[FINALIZER], deleting=True, status=TAGS))
    assert removal.removed == () and set(removal.kept) == {"2", "3"}
    assert removal.problem is not None and "ConnectError" in removal.problem


def test_a_hanging_registry_costs_the_budget_and_no_more() -> None:
    tagger = Tagger(hang_s=60)
    started = time.monotonic()
    try:
        removal = _remove(tagger, _body(finalizers=[FINALIZER], deleting=True, status=TAGS), budget_s=1.0)
    finally:
        tagger.released.set()
    took = time.monotonic() - started
    assert 0.9 <= took < 3, took
    assert set(removal.kept) == {"2", "3"} and "did not answer within 1 s" in (removal.problem or "")


def test_an_invalid_spec_keeps_the_tags_and_says_why() -> None:
    body = _body(finalizers=[FINALIZER], deleting=True, status=TAGS)
    body["spec"]["model"] = {"name": "m"}  # no selector: not a valid spec
    removal = _remove(Tagger(), body)
    assert set(removal.kept) == {"2", "3"} and "spec is not valid" in (removal.problem or "")


def test_a_registry_outside_the_policy_is_never_contacted() -> None:
    """A resource created before the policy (or where admission was absent): its tracking URI never gets
    the Secret, not even to remove tags."""
    tagger = Tagger()
    policy = Policy(tracking_uri_prefixes=("https://mlflow.platform.example",))
    body = _body(finalizers=[FINALIZER], deleting=True, status=TAGS)
    removal = remove_tags(body, cast(RegistryPort, tagger), cast(Target, FakeTarget()), policy=policy)
    assert tagger.deleted == []
    assert set(removal.kept) == {"2", "3"} and "policy" in (removal.problem or "")
