"""Waiting for an event with a deadline, without losing a cancellation."""

from __future__ import annotations

import asyncio
import contextlib


async def wait_set(event: asyncio.Event, seconds: float) -> bool:
    """Wait until `event` is set or `seconds` have passed; True when it is set.

    Not `asyncio.wait_for(event.wait(), seconds)`: on Python 3.11, a cancellation that
    arrives once the event is set but before the waiting task has run again is dropped, and
    wait_for returns as if nothing had happened. A worker stopping on SIGTERM sets its stop
    event and then cancels its tasks at once; a task pausing on that event carried on into
    its next wait and kept the worker from exiting (tests/test_waiting.py).
    """
    if not event.is_set():
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await event.wait()
    return event.is_set()
