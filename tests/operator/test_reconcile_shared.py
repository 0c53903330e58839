"""Two resources sharing one cluster through `reconcile`, with in-memory ports: each one's rollouts
stay its own, and a member the cluster refuses is told why."""

from __future__ import annotations

from typing import Any

from regserve_operator import conditions as c
from regserve_operator.builders import Owner, serving_version_of
from regserve_operator.reconcile import reconcile
from regserve_operator.spec import RegisteredModelServingStatus, status_to_wire

from .fakes import World, signature
from .helpers import OWNER, make_spec

SIG = signature(prompt="string")
POOL = "pool"
OTHER = Owner("summarizer", OWNER.namespace, "uid-summarizer")


class Members:
    """`World` runs OWNER; this runs OTHER beside it on the same target and registry, and keeps the
    target's member list as the API server would list both."""

    def __init__(self, other_spec: dict[str, Any] | None = None) -> None:
        placement = {"cluster": POOL}
        self.world = World(make_spec(placement=placement))
        self.other_spec = make_spec(placement=placement, **(other_spec or {}))
        self.other_status = RegisteredModelServingStatus()
        for version in ("1", "2"):
            self.world.server.add(version, SIG)
        self.world.server.aliases["champion"] = "1"
        self.list()

    def list(self) -> None:
        def listed(
            owner: Owner, created: str, spec: Any, status: RegisteredModelServingStatus
        ) -> dict[str, Any]:
            meta = {
                "name": owner.name,
                "namespace": owner.namespace,
                "uid": owner.uid,
                "creationTimestamp": created,
            }
            return {
                "metadata": meta,
                "spec": spec.model_dump(by_alias=True, exclude_none=True),
                "status": status_to_wire(status),
            }

        self.world.target.peers[(OWNER.namespace, POOL)] = [
            listed(OWNER, "2026-01-01T00:00:00Z", self.world.spec, self.world.status),
            listed(OTHER, "2026-01-02T00:00:00Z", self.other_spec, self.other_status),
        ]

    def step_owner(self) -> Any:
        outcome = self.world.step()
        self.list()
        return outcome

    def step_other(self) -> Any:
        w = self.world
        outcome = reconcile(OTHER, 1, self.other_spec, self.other_status, w.deps, w.now)
        self.other_status = outcome.status
        self.list()
        return outcome

    def rayservice(self) -> dict[str, Any]:
        obj = self.world.target.get(OWNER.namespace, POOL)
        assert obj is not None
        return obj


def test_members_share_one_rayservice_and_each_first_version_is_judged() -> None:
    m = Members()
    assert m.step_owner().plan.action == "create"
    joined = m.step_other()
    assert joined.plan.action == "patch_serve_config" and "owners" in joined.plan.changes
    assert m.other_status.rollout_version == "1"  # joining starts the first version's rollout
    assert ("Normal", "Created") in [(e.type, e.reason) for e in joined.events]
    rs = m.rayservice()
    assert serving_version_of(rs, OWNER.name) == "1" and serving_version_of(rs, OTHER.name) == "1"
    assert [r["name"] for r in rs["metadata"]["ownerReferences"]] == [OWNER.name, OTHER.name]
    assert m.world.status.ray_service_name == POOL and m.other_status.ray_service_name == POOL
    assert m.world.target.get(OWNER.namespace, OWNER.name) is None


def test_a_member_with_other_cluster_settings_is_refused_and_writes_nothing() -> None:
    m = Members(other_spec={"serving": {"ingressMode": "proxy"}})
    m.step_owner()
    m.world.target.applied.clear()
    refused = m.step_other()
    assert refused.plan is None and m.world.target.applied == []
    ready = c.get_condition(m.other_status.conditions, c.READY)
    assert ready is not None and ready.status == "False" and ready.reason == "ClusterConflict"
    assert "serving.ingressMode" in ready.message
    assert ("Warning", "ClusterConflict") in [(e.type, e.reason) for e in refused.events]
    assert serving_version_of(m.rayservice(), OTHER.name) is None


class WritesBetween:
    """A target that lets another writer in between a member's read and its write, once."""

    def __init__(self, pair: Members) -> None:
        self.pair = pair
        self.inner = pair.world.target
        self.raced = False

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def apply(self, plan: Any) -> None:
        if not self.raced:
            self.raced = True
            self.pair.step_other()  # the other member writes after this one read
        self.inner.apply(plan)


def test_concurrent_writers_lose_nothing() -> None:
    m = Members()
    m.step_owner()
    m.step_other()
    m.world.server.aliases["champion"] = "2"  # both members follow the alias: both want to write
    m.world.deps.registry.model_changed("translation_model")
    m.world.deps.target = WritesBetween(m)  # type: ignore[assignment]
    lost = m.step_owner()  # its write conflicts: nothing written, decided again at the next tick
    assert lost.in_flight and lost.plan is None  # act discarded the decision
    assert serving_version_of(m.rayservice(), OTHER.name) == "2"  # the other's write stands
    assert serving_version_of(m.rayservice(), OWNER.name) == "1"
    m.world.deps.target = m.world.target
    m.step_owner()
    rs = m.rayservice()
    assert serving_version_of(rs, OWNER.name) == "2" and serving_version_of(rs, OTHER.name) == "2"
