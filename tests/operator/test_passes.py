"""The operator's loop without a cluster: what the watch keeps, which resources a pass takes and in what
order, and status writes the API server refused."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import pytest
from regserve_operator.passes import InFlight, Seen, StatusWrites, Watched, WriteGone, run_pass
from regserve_operator.schedule import Key, Scheduler
from regserve_operator.spec import manifest


def body(name: str, generation: int = 1, uid: str = "u1", **status: Any) -> dict[str, Any]:
    """A resource as the watch delivers it: with what the API server adds, status included."""
    resource = manifest(name, {"model": {"name": "m"}}, namespace="ml")
    resource["metadata"] |= {
        "uid": uid,
        "generation": generation,
        "resourceVersion": "7",
        "managedFields": [{"manager": "kubectl"}],
    }
    return resource | {"status": status}


def test_saw_reports_what_is_worth_a_pass_now() -> None:
    tests = [
        ("new resource", [], body("a"), True),
        ("status only changed", [body("a")], body("a", servingVersion="1"), False),
        ("spec changed", [body("a")], body("a", generation=2), True),
        ("deleted and created again", [body("a")], body("a", uid="u2"), True),
    ]
    for name, before, seen, worth in tests:
        watched = Watched()
        for earlier in before:
            watched.saw(earlier)
        assert watched.saw(seen) is worth, name


def test_the_copy_keeps_what_a_pass_and_an_event_need_and_nothing_else() -> None:
    watched = Watched()
    watched.saw(body("a", servingVersion="3"))
    kept = watched.get(("ml", "a"))
    assert kept is not None and (kept.uid, kept.generation) == ("u1", 1)
    assert kept.body() == {
        "apiVersion": "regserve.io/v1alpha1",
        "kind": "RegisteredModelServing",
        "metadata": {"name": "a", "namespace": "ml", "uid": "u1", "generation": 1},
        "spec": {"model": {"name": "m"}},
        "status": {"servingVersion": "3"},
    }
    watched.gone(("ml", "a"))
    assert watched.get(("ml", "a")) is None and len(watched) == 0


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _done(scheduler: Scheduler, key: Key, delay: float, generation: int = 1) -> None:
    scheduler.done(key, delay=delay, model="m", failed=False, generation=generation, status=dict)


def test_due_takes_woken_resources_before_those_whose_poll_fell_due() -> None:
    clock = Clock()
    scheduler = Scheduler(clock=clock)
    watched = Watched()
    for name in ("polled", "waiting", "promoted"):
        watched.saw(body(name))
        _done(scheduler, ("ml", name), delay=30)
    _done(scheduler, ("ml", "waiting"), delay=300)
    watched.saw(body("new"))
    clock.now += 31
    scheduler.wake(("ml", "promoted"))
    order = [key[1] for key, _ in watched.due(scheduler)]
    assert order[:2] in (["new", "promoted"], ["promoted", "new"]) and order[2:] == ["polled"]


@dataclass
class FlakyApi:
    """Refuses the first `refusals` writes; records what it accepted."""

    refusals: int = 0
    gone: set[Key] = field(default_factory=set)
    accepted: list[tuple[Key, dict[str, Any]]] = field(default_factory=list)

    def write(self, key: Key, patch: dict[str, Any]) -> None:
        if key in self.gone:
            raise WriteGone(key[1])
        if self.refusals:
            self.refusals -= 1
            raise ConnectionError("apiserver restarting")
        self.accepted.append((key, patch))


def test_a_refused_status_write_is_merged_into_the_next_one() -> None:
    api = FlakyApi(refusals=1)
    writes = StatusWrites(api.write)
    key = ("ml", "a")
    assert writes.send(key, {"servingVersion": "2", "rolloutVersion": "2"}) is False
    assert writes.pending() == 1 and api.accepted == []
    assert writes.send(key, {"rolloutVersion": None, "revision": 4}) is True
    assert api.accepted == [(key, {"servingVersion": "2", "rolloutVersion": None, "revision": 4})]
    assert writes.pending() == 0


def test_a_write_for_a_deleted_resource_is_dropped() -> None:
    api = FlakyApi(gone={("ml", "a")})
    writes = StatusWrites(api.write)
    assert writes.send(("ml", "a"), {"revision": 1}) is True and writes.pending() == 0


def test_an_empty_patch_sends_nothing() -> None:
    api = FlakyApi()
    assert StatusWrites(api.write).send(("ml", "a"), {}) is True and api.accepted == []


@pytest.fixture
def pool() -> Any:
    with ThreadPoolExecutor(2) as executor:
        yield executor


def test_run_pass_reconciles_due_resources_and_writes_their_patches(pool: ThreadPoolExecutor) -> None:
    clock = Clock()
    scheduler = Scheduler(clock=clock)
    watched = Watched()
    api = FlakyApi()
    for name in ("a", "b"):
        watched.saw(body(name))
    _done(scheduler, ("ml", "b"), delay=30)

    def reconcile(key: Key, seen: Seen) -> dict[str, Any]:
        _done(scheduler, key, delay=30)
        return {"servingVersion": "1"} if seen.body()["metadata"]["name"] == "a" else {}

    assert run_pass(watched, scheduler, reconcile, StatusWrites(api.write), pool) == [("ml", "a")]
    assert api.accepted == [(("ml", "a"), {"servingVersion": "1"})]
    assert run_pass(watched, scheduler, reconcile, StatusWrites(api.write), pool) == []


def test_a_resource_with_an_unwritten_status_waits_for_the_write(pool: ThreadPoolExecutor) -> None:
    scheduler = Scheduler(clock=Clock())
    watched = Watched()
    watched.saw(body("a"))
    api = FlakyApi(refusals=2)
    writes = StatusWrites(api.write)
    calls: list[Key] = []

    def reconcile(key: Key, seen: Seen) -> dict[str, Any]:
        calls.append(key)
        return {"revision": len(calls)}

    run_pass(watched, scheduler, reconcile, writes, pool)  # decided, write refused
    run_pass(watched, scheduler, reconcile, writes, pool)  # the retry refused too: no second decision
    assert calls == [("ml", "a")] and writes.pending() == 1
    run_pass(watched, scheduler, reconcile, writes, pool)
    assert calls == [("ml", "a")] * 2
    assert api.accepted == [(("ml", "a"), {"revision": 1}), (("ml", "a"), {"revision": 2})]


def test_a_pass_that_raises_is_postponed_and_the_others_still_run(pool: ThreadPoolExecutor) -> None:
    clock = Clock()
    scheduler = Scheduler(clock=clock)
    watched = Watched()
    for name in ("broken", "fine"):
        watched.saw(body(name))

    def reconcile(key: Key, seen: Seen) -> dict[str, Any]:
        if key[1] == "broken":
            raise KeyError("spec")
        _done(scheduler, key, delay=30)
        return {}

    assert run_pass(watched, scheduler, reconcile, StatusWrites(FlakyApi().write), pool) == [("ml", "fine")]
    assert not scheduler.due(("ml", "broken"), 1)
    clock.now += 31
    assert scheduler.due(("ml", "broken"), 1)


class Hangs:
    """A reconcile that blocks for the resources named in `slow` until released."""

    def __init__(self, scheduler: Scheduler, *slow: str) -> None:
        self.scheduler = scheduler
        self.slow = set(slow)
        self.release = threading.Event()
        self.calls: list[str] = []

    def __call__(self, key: Key, seen: Seen) -> dict[str, Any]:
        self.calls.append(key[1])
        if key[1] in self.slow:
            assert self.release.wait(30)
        _done(self.scheduler, key, delay=0)  # due again at once: only in-flight tracking holds it back
        return {"servingVersion": key[1]}


def test_a_pass_does_not_wait_for_a_straggler_and_its_status_is_still_written() -> None:
    scheduler = Scheduler(clock=Clock())
    watched = Watched()
    for name in ("slow", "a", "b"):
        watched.saw(body(name))
    api = FlakyApi()
    writes = StatusWrites(api.write)
    reconcile = Hangs(scheduler, "slow")
    in_flight = InFlight()
    with ThreadPoolExecutor(2) as pool:
        try:
            started = time.monotonic()
            done = run_pass(watched, scheduler, reconcile, writes, pool, in_flight=in_flight, deadline_s=0.3)
            assert time.monotonic() - started < 2.0
            assert done == [("ml", "a"), ("ml", "b")] and ("ml", "slow") in in_flight
            # Due again, but still running: not handed out a second time; the others go on.
            done = run_pass(watched, scheduler, reconcile, writes, pool, in_flight=in_flight, deadline_s=0.3)
            assert done == [("ml", "a"), ("ml", "b")] and reconcile.calls.count("slow") == 1
        finally:
            reconcile.release.set()
        deadline = time.monotonic() + 10
        while ("ml", "slow") in in_flight and time.monotonic() < deadline:
            time.sleep(0.01)
    assert (("ml", "slow"), {"servingVersion": "slow"}) in api.accepted and len(in_flight) == 0


def test_a_resource_not_started_by_the_deadline_is_left_for_the_next_pass() -> None:
    scheduler = Scheduler(clock=Clock())
    watched = Watched()
    for name in ("slow", "queued"):
        watched.saw(body(name))
    reconcile = Hangs(scheduler, "slow")
    in_flight = InFlight()
    with ThreadPoolExecutor(1) as pool:
        try:
            api = FlakyApi()
            done = run_pass(
                watched,
                scheduler,
                reconcile,
                StatusWrites(api.write),
                pool,
                in_flight=in_flight,
                deadline_s=0.2,
            )
            assert done == [] and reconcile.calls == ["slow"]
            assert ("ml", "queued") not in in_flight and scheduler.due(("ml", "queued"), 1)
        finally:
            reconcile.release.set()


def test_a_pass_waiting_on_a_straggler_ends_when_another_resource_falls_due() -> None:
    """A promotion woken while a pass waits for a resource stuck on a slow registry is not held
    until that pass's deadline: the pass ends once nothing of it is queued, and the next one starts."""
    clock = Clock()
    scheduler = Scheduler(clock=clock)
    watched = Watched()
    for name in ("slow", "promoted"):
        watched.saw(body(name))
    _done(scheduler, ("ml", "promoted"), delay=300)
    reconcile = Hangs(scheduler, "slow")
    in_flight = InFlight()
    writes = StatusWrites(FlakyApi().write)
    with ThreadPoolExecutor(2) as pool:
        try:
            waker = threading.Timer(0.2, scheduler.wake, args=[("ml", "promoted")])
            waker.start()
            started = time.monotonic()
            assert (
                run_pass(watched, scheduler, reconcile, writes, pool, in_flight=in_flight, deadline_s=10)
                == []
            )
            assert 0.15 < time.monotonic() - started < 2.0
            assert run_pass(
                watched, scheduler, reconcile, writes, pool, in_flight=in_flight, deadline_s=10
            ) == [("ml", "promoted")]
        finally:
            reconcile.release.set()
            waker.cancel()
