from __future__ import annotations

import threading
import time
from typing import Any

from regserve_operator.builders import Owner, serving_version_of
from regserve_operator.decide import Event
from regserve_operator.driver import Driver
from regserve_operator.reconcile import Deps
from regserve_operator.registry import Registry
from regserve_operator.spec import parse_status

from .fakes import World, signature
from .helpers import DEFAULTS, OWNER, make_spec


def test_driver_reconciles_when_due_and_follows_the_alias() -> None:
    world = World(make_spec())
    world.server.add("1", signature(prompt="string"))
    world.server.add("2", signature(prompt="string"))
    world.server.aliases["champion"] = "1"
    events: list[str] = []

    def on_event(owner: object, event: Event) -> None:
        events.append(event.reason)

    driver = Driver(world.deps, on_event=on_event, clock=lambda: world.clock, now=lambda: world.now)
    driver.apply(OWNER, world.spec)
    assert len(driver.run_once()) == 1
    assert driver.run_once() == []  # not due yet
    world.target.set_app_status("RUNNING")
    world.advance(6)
    driver.run_once()  # rollout being judged: looked at on the next tick
    assert driver.status(OWNER).last_good_version == "1"
    world.server.aliases["champion"] = "2"
    driver.model_changed("translation_model")  # as a webhook would
    driver.run_once()
    assert serving_version_of(world.rayservice()) == "2"
    # No app probe here: the default smoke test is skipped with a warning rather than never judged.
    assert events == ["RolloutStarted", "Created", "RolloutSucceeded", "RolloutUnjudged", "RolloutStarted"]
    driver.apply(OWNER, make_spec(paused=True))  # spec change: due at once
    assert len(driver.run_once()) == 1


def test_a_woken_resource_goes_before_those_due_by_their_poll_interval() -> None:
    world = World(make_spec())
    world.server.add("1", signature(prompt="string"))
    world.server.aliases["champion"] = "1"
    driver = Driver(world.deps, clock=lambda: world.clock, now=lambda: world.now)
    owners = [Owner(name=f"r{i}", namespace="ml", uid=f"uid-r{i}") for i in range(3)]
    for owner in owners:
        driver.apply(owner, world.spec)
    driver.run_once()
    world.advance(3600)  # every resource is due by its poll interval
    driver.apply(owners[2], make_spec(paused=True))  # and the last one is woken by a spec change
    looked_at: list[str] = []
    get = world.target.get

    def recording_get(namespace: str, name: str) -> dict[str, Any] | None:
        looked_at.append(name)
        return get(namespace, name)

    world.target.get = recording_get  # type: ignore[method-assign]
    assert len(driver.run_once()) == 3
    assert looked_at == ["r2", "r0", "r1"]


def test_a_steady_pass_leaves_the_status_as_it_was() -> None:
    """Nothing changed → nothing to write: the revision (which orders our status writes) stays."""
    world = World(make_spec())
    world.server.add("1", signature(prompt="string"))
    world.server.aliases["champion"] = "1"
    driver = Driver(world.deps, clock=lambda: world.clock, now=lambda: world.now)
    driver.apply(OWNER, world.spec)
    driver.run_once()
    world.target.set_app_status("RUNNING")
    for _ in range(3):
        world.advance(60)
        driver.run_once()
    settled = driver.status(OWNER)
    assert settled.last_good_version == "1"
    world.advance(60)  # due by its poll interval, nothing new anywhere
    assert len(driver.run_once()) == 1
    assert driver.status(OWNER).revision == settled.revision
    world.server.aliases["champion"] = "2"
    world.server.add("2", signature(prompt="string"))
    driver.model_changed("translation_model")
    driver.run_once()
    assert (driver.status(OWNER).revision or 0) > (settled.revision or 0)


def test_the_loop_gives_back_the_status_it_was_seeded_with() -> None:
    """Between passes the loop holds spec and status as JSON: what comes back is what went in, the
    fields kopf keeps in status included."""
    world = World(make_spec())
    world.server.add("1", signature(prompt="string"))
    world.server.aliases["champion"] = "1"
    seeded = parse_status(
        {
            "servingVersion": "1",
            "lastGoodVersion": "1",
            "history": [{"version": "1", "outcome": "Serving", "at": "2026-12-01T00:00:00Z"}],
            "conditions": [{"type": "Ready", "status": "True", "reason": "Serving", "message": "v1"}],
            "kopf": {"progress": {"reconcile": {"retries": 1}}},
            "revision": 7,
        }
    )
    driver = Driver(world.deps, clock=lambda: world.clock, now=lambda: world.now)
    driver.apply(OWNER, world.spec, seeded)
    assert driver.status(OWNER) == seeded
    assert driver.status(OWNER) is not driver.status(OWNER)  # a copy each time: callers cannot alter it
    assert [done.action for done in driver.run_once()] == ["create"]
    assert driver.status(OWNER).model_extra == {"kopf": {"progress": {"reconcile": {"retries": 1}}}}


class SlowFor(Registry):
    """The real Registry, whose resolve for one tracking server hangs until released."""

    def __init__(self, slow_uri: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.slow_uri = slow_uri
        self.release = threading.Event()

    def resolve(self, tracking_uri: str, *args: Any) -> str:
        if tracking_uri == self.slow_uri:
            assert self.release.wait(30)
        return super().resolve(tracking_uri, *args)


def test_with_a_pass_deadline_one_slow_registry_does_not_hold_up_the_others() -> None:
    world = World(make_spec())
    world.server.add("1", signature(prompt="string"))
    world.server.aliases["champion"] = "1"
    registry = SlowFor(
        "http://slow:5000", transport=world.server.transport(), fetch_facts=world.server.fetch_facts
    )
    deps = Deps(registry=registry, target=world.target, defaults=DEFAULTS, settle_seconds=5)
    driver = Driver(deps, pass_deadline_s=0.3, workers=2)
    slow, fast = Owner("slow", "ml", "u1"), Owner("fast", "ml", "u2")
    driver.apply(slow, make_spec(registry={"trackingUri": "http://slow:5000"}))
    driver.apply(fast, make_spec(registry={"trackingUri": "http://mlflow:5000"}))
    try:
        started = time.monotonic()
        assert [r.key for r in driver.run_once()] == [("ml", "fast")]
        assert time.monotonic() - started < 2.0
        assert driver.run_once() == []  # the slow one is still running: not started twice
    finally:
        registry.release.set()
    deadline = time.monotonic() + 10
    while driver.status(slow).serving_version is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert driver.status(slow).serving_version == "1"  # kept when it ended, after its pass
    assert serving_version_of(world.target.get("ml", "slow") or {}) == "1"
