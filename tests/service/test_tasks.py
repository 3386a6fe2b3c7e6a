"""Background loops stop when asked even where a library loses the ``CancelledError``, and a
shutdown waits for its loops within a bound."""

from __future__ import annotations

import asyncio

import pytest

from service.tasks import raise_if_cancelled, stop_tasks

pytestmark = pytest.mark.anyio


async def swallowing_call() -> None:
    """A library call that loses a cancel landing inside it, as redis-py's pipeline can."""
    try:
        await asyncio.sleep(0.01)
    except asyncio.CancelledError:
        pass


async def loop(checks: bool, running: list[bool]) -> None:
    while running:
        if checks:
            raise_if_cancelled()
        await swallowing_call()


async def test_a_loop_that_checks_stops_though_the_call_lost_the_cancel():
    running = [True]
    checking = asyncio.create_task(loop(True, running), name="checks")
    plain = asyncio.create_task(loop(False, running), name="plain")
    await asyncio.sleep(0.005)  # both inside the call that swallows the cancel
    try:
        assert await stop_tasks([checking, plain], timeout_s=0.3) == ["plain"]
        assert checking.cancelled() and not plain.done()
    finally:
        running.clear()  # the plain loop ends only by its own condition
        await asyncio.wait([plain], timeout=1.0)


async def test_stop_tasks_cancels_and_waits_for_every_task():
    tasks = [asyncio.create_task(asyncio.sleep(60), name=f"t{i}") for i in range(3)]
    done = asyncio.create_task(asyncio.sleep(0))
    await done
    assert await stop_tasks([*tasks, done]) == []
    assert all(t.cancelled() for t in tasks) and not done.cancelled()


async def test_raise_if_cancelled_does_nothing_before_a_cancel():
    raise_if_cancelled()  # the test's own task, not cancelled
