from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
from regserve_operator.driver import Driver
from regserve_operator.reconcile import Deps
from regserve_operator.registry import Registry
from regserve_operator.schedule import Scheduler

from .fakes import World, signature
from .helpers import DEFAULTS, OWNER, make_spec


class Clock:
    now = 0.0

    def __call__(self) -> float:
        return self.now


def test_due_after_delay_wake_and_generation() -> None:
    clock = Clock()
    sched = Scheduler(clock=clock)
    key = ("ns", "a")
    assert sched.due(key, 1)
    sched.done(key, delay=30, model="m", failed=False, generation=1, status=lambda: {"revision": 1})
    assert not sched.due(key, 1)
    clock.now = 31
    assert sched.due(key, 1)
    sched.done(key, delay=30, model="m", failed=False, generation=1, status=lambda: {"revision": 2})
    assert sched.due(key, 2)  # spec changed
    assert not sched.due(key, 1)
    sched.wake(key)
    assert sched.due(key, 1)


def test_wake_model_only_wakes_its_resources() -> None:
    clock = Clock()
    sched = Scheduler(clock=clock)
    for name, model in (("a", "m1"), ("b", "m2"), ("c", "m1")):
        sched.done(("ns", name), delay=60, model=model, failed=False, generation=1, status=lambda: {})
    assert sorted(sched.wake_model("m1")) == [("ns", "a"), ("ns", "c")]
    assert sched.due(("ns", "a"), 1) and not sched.due(("ns", "b"), 1)


def test_failures_count_and_reset() -> None:
    sched = Scheduler(clock=Clock())
    key = ("ns", "a")
    assert sched.done(key, delay=1, model="m", failed=True, generation=1, status=lambda: {}) == 1
    assert sched.done(key, delay=1, model="m", failed=True, generation=1, status=lambda: {}) == 2
    assert sched.done(key, delay=1, model="m", failed=False, generation=1, status=lambda: {}) == 0


def test_newer_memo_wins_over_stale_body() -> None:
    sched = Scheduler(clock=Clock())
    key = ("ns", "a")
    sched.done(
        key, delay=1, model="m", failed=False, generation=1, status=lambda: {"revision": 5, "x": "memo"}
    )
    assert sched.latest_status(key, {"revision": 4, "x": "body"})["x"] == "memo"
    assert sched.latest_status(key, {"revision": 5, "x": "body"})["x"] == "body"
    assert sched.latest_status(("ns", "other"), {"x": "body"})["x"] == "body"


def test_memo_dropped_once_the_body_caught_up() -> None:
    sched = Scheduler(clock=Clock())
    key = ("ns", "a")
    sched.done(
        key, delay=1, model="m", failed=False, generation=1, status=lambda: {"revision": 5, "x": "memo"}
    )
    assert sched.latest_status(key, {"revision": 5, "x": "body"})["x"] == "body"
    # A body older than what was written, delivered after the caught-up one, no longer meets the memo.
    assert sched.latest_status(key, {"revision": 4, "x": "older body"})["x"] == "older body"


def test_a_pass_that_changed_nothing_keeps_no_memo() -> None:
    sched = Scheduler(clock=Clock())
    key = ("ns", "a")
    sched.done(
        key, delay=1, model="m", failed=False, generation=1, status=lambda: {"revision": 5, "x": "memo"}
    )
    assert sched.latest_status(key, {"revision": 5, "x": "body"})["x"] == "body"
    # The next pass started from revision 5 and decided the same status: the body already has it.
    sched.done(
        key, delay=1, model="m", failed=False, generation=1, status=lambda: {"revision": 5, "x": "same"}
    )
    assert sched._entries[key].memo is None
    sched.done(
        key, delay=1, model="m", failed=False, generation=1, status=lambda: {"revision": 6, "x": "new"}
    )
    assert sched.latest_status(key, {"revision": 5, "x": "body"}) == {"revision": 6, "x": "new"}


def test_statuses_not_kept_when_the_caller_keeps_them() -> None:
    built: list[dict[str, int]] = []

    def wire() -> dict[str, int]:
        built.append({"revision": 5})
        return built[-1]

    sched = Scheduler(clock=Clock(), keeps_statuses=False)
    key = ("ns", "a")
    sched.done(key, delay=1, model="m", failed=False, generation=1, status=wire)
    assert built == []  # not even built
    assert sched.latest_status(key, {"revision": 1, "x": "body"})["x"] == "body"


def test_woken_only_when_something_happened() -> None:
    clock = Clock()
    sched = Scheduler(clock=clock)
    key = ("ns", "a")
    assert sched.woken(key)  # never reconciled
    sched.done(key, delay=30, model="m", failed=False, generation=1, status=lambda: {})
    clock.now = 31
    assert sched.due(key, 1) and not sched.woken(key)  # due by its poll interval only
    sched.wake_model("m")
    assert sched.woken(key)


@dataclass(frozen=True)
class WakeCase:
    name: str
    steps: tuple[str, ...]  # "start", "wake", "wake_model", "done", "postpone", in order
    due_after: bool  # right after the steps, long before the poll interval ends


WAKE_CASES = [
    WakeCase("plain reconcile waits its poll interval", ("start", "done"), False),
    WakeCase("wake during the reconcile stays due", ("start", "wake", "done"), True),
    WakeCase("webhook during the reconcile stays due", ("start", "wake_model", "done"), True),
    WakeCase("wake before the reconcile started is seen by it", ("wake", "start", "done"), False),
    WakeCase("wake after the reconcile ended", ("start", "done", "wake"), True),
    WakeCase("failed pass woken meanwhile stays due", ("start", "wake", "postpone"), True),
    WakeCase("the next reconcile clears the mark", ("start", "wake", "done", "start", "done"), False),
    WakeCase("done without start keeps the old behaviour", ("wake", "done"), False),
]


@pytest.mark.parametrize("case", WAKE_CASES, ids=lambda case: case.name)
def test_a_wake_during_a_reconcile_is_not_lost(case: WakeCase) -> None:
    clock = Clock()
    sched = Scheduler(clock=clock)
    key = ("ns", "a")
    for step in case.steps:
        if step == "start":
            sched.started(key, "m")
        elif step == "wake":
            sched.wake(key)
        elif step == "wake_model":
            assert sched.wake_model("m") == [key]
        elif step == "done":
            sched.done(key, delay=60, model="m", failed=False, generation=1, status=lambda: {})
        elif step == "postpone":
            sched.postpone(key, 60, 1)
    clock.now = 1.0
    assert sched.due(key, 1) is case.due_after


class WebhookDuringResolve(Registry):
    """The real Registry; right after its first answer the alias moves and a webhook says so, while
    the reconcile that asked is still running."""

    def __init__(self, on_first_resolve: Callable[[], None], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.on_first_resolve: Callable[[], None] | None = on_first_resolve

    def resolve(self, *args: Any) -> str:
        version = super().resolve(*args)
        if self.on_first_resolve is not None:
            hook, self.on_first_resolve = self.on_first_resolve, None
            hook()
        return version


def test_a_webhook_during_a_reconcile_makes_the_next_pass_reconcile_again() -> None:
    world = World(make_spec())
    world.server.add("1", signature(prompt="string"))
    world.server.add("2", signature(prompt="string"))
    world.server.aliases["champion"] = "1"
    drivers: list[Driver] = []

    def promote_and_deliver() -> None:
        world.server.aliases["champion"] = "2"
        drivers[0].model_changed("translation_model")

    registry = WebhookDuringResolve(
        promote_and_deliver,
        transport=world.server.transport(),
        fetch_facts=world.server.fetch_facts,
        clock=lambda: world.clock,
        sleep=world.advance,
    )
    deps = Deps(registry=registry, target=world.target, defaults=DEFAULTS, settle_seconds=5)
    driver = Driver(deps, clock=lambda: world.clock, now=lambda: world.now)
    drivers.append(driver)
    driver.apply(OWNER, world.spec)
    assert len(driver.run_once()) == 1  # read v1; the webhook came in meanwhile
    assert registry.on_first_resolve is None
    assert len(driver.run_once()) == 1, "the wake was lost: due only at the next poll"
