"""The `Server-Timing` steps of a request that loads a version (no Ray: the timer itself)."""

from __future__ import annotations

import asyncio

import pytest

from serving_app.timing import StepTimer, parse_header, request_timer, start_timing, step


@pytest.mark.parametrize(
    ("steps", "header"),
    [
        ([], ""),
        ([("gate", 18.24)], "gate;dur=18.2"),
        (
            [("gate", 1.0), ("download", 30.06), ("load", 52.75)],
            "gate;dur=1.0, download;dur=30.1, load;dur=52.8",
        ),
    ],
)
def test_header_names_each_step_with_its_milliseconds(steps: list[tuple[str, float]], header: str) -> None:
    assert StepTimer(steps).header() == header
    assert parse_header(header) == {name: round(ms, 1) for name, ms in steps}


def test_steps_of_an_untimed_request_record_nothing() -> None:
    async def request() -> StepTimer | None:
        with step("gate"):
            pass
        return request_timer.get()

    assert asyncio.run(request()) is None


def test_steps_in_threads_and_tasks_the_request_starts_land_on_its_timer() -> None:
    def in_thread() -> None:
        with step("load"):
            pass

    async def in_task() -> None:
        with step("facts"):
            await asyncio.sleep(0)

    async def request() -> list[str]:
        timer = start_timing()
        assert start_timing() is timer  # one timer per request
        with step("gate"):
            await asyncio.ensure_future(in_task())
        await asyncio.to_thread(in_thread)
        return [name for name, _ in timer.steps]

    assert asyncio.run(request()) == ["facts", "gate", "load"]


def test_a_timer_does_not_leak_into_another_requests_task() -> None:
    async def timed() -> None:
        start_timing()

    async def other() -> StepTimer | None:
        return request_timer.get()

    async def two_requests() -> StepTimer | None:
        await asyncio.ensure_future(timed())
        return await asyncio.ensure_future(other())

    assert asyncio.run(two_requests()) is None
