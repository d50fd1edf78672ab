"""router.waiting: a deadline wait that never drops a cancellation."""

from __future__ import annotations

import asyncio

import pytest

from router.waiting import wait_set


async def test_wait_set_says_whether_the_event_came_in_time() -> None:
    event = asyncio.Event()
    assert await wait_set(event, 0.01) is False
    asyncio.get_running_loop().call_soon(event.set)
    assert await wait_set(event, 30) is True
    assert await wait_set(event, 0) is True  # set already: no wait at all


async def test_a_task_waiting_when_stop_is_set_and_it_is_cancelled_ends_cancelled() -> None:
    """The stop a worker uses: the event is set, the stopper wakes with the waiters and
    cancels them at once. asyncio.wait_for dropped that cancellation on Python 3.11 and the
    task went on into its next wait, forever (a worker that did not exit on SIGTERM)."""
    stop = asyncio.Event()
    waiting = asyncio.Event()

    async def pool_loop() -> None:
        while True:
            waiting.set()
            await wait_set(stop, 30)
            await asyncio.Event().wait()  # the next thing a loop waits for

    task = asyncio.create_task(pool_loop())
    await waiting.wait()

    async def stopper() -> None:
        await stop.wait()
        task.cancel()

    stopping = asyncio.create_task(stopper())
    await asyncio.sleep(0)  # the stopper waits on the event too
    stop.set()
    done, _ = await asyncio.wait([task], timeout=5)
    assert done == {task}, "the cancellation was lost: the task is still running"
    with pytest.raises(asyncio.CancelledError):
        await task
    await stopping
