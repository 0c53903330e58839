from __future__ import annotations

from regserve_operator.schedule import Scheduler


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
