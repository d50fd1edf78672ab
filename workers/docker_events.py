"""The docker runtime's exit follower: Docker's event stream of dying sandboxes, as `Exit`s."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import AsyncGenerator
from typing import Any

from workers.docker_engine import ENGINE_ERRORS, close_stream, explain
from workers.runtime import LABEL_SCOPE, Exit

log = logging.getLogger("sessionpool.docker")

EVENT_RETRY_MAX_S = 2.0


class ExitFollower:
    """Owns every open event stream and follower thread so that `close()` ends them all."""

    def __init__(self) -> None:
        self._streams: set[Any] = set()  # open event streams, closed by close()
        self._stops: set[threading.Event] = set()  # one per follow() iterator
        self._closed = False

    async def follow(self, client: Any, scope: str) -> AsyncGenerator[Exit, None]:
        """Containers of this scope that die, as they die; ends when the follower closes.

        A thread follows Docker's event stream and hands events to the loop. When the stream
        breaks (engine restart) it reconnects with `since` the last event, so none is lost in
        between (one may come twice: consumers are idempotent).
        """
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Exit | None] = asyncio.Queue()
        stop = threading.Event()
        self._stops.add(stop)
        if self._closed:
            stop.set()
        opened = threading.Event()
        current: list[Any] = []  # the follower's open stream, for closing it from outside
        filters = {"type": "container", "event": "die", "label": f"{LABEL_SCOPE}={scope}"}

        def deliver(item: Exit | None) -> None:
            with contextlib.suppress(RuntimeError):  # the loop is already closed
                loop.call_soon_threadsafe(queue.put_nowait, item)

        def run() -> None:
            since: str | None = None
            delay_s = 0.1
            try:
                while not stop.is_set():
                    try:
                        stream = client.api.events(decode=True, filters=filters, since=since)
                    except ENGINE_ERRORS as exc:
                        log.warning("docker events (scope %s): %s", scope, explain(exc))
                        opened.set()
                        stop.wait(delay_s)
                        delay_s = min(EVENT_RETRY_MAX_S, delay_s * 2)
                        continue
                    if since is None:  # resume point should the stream break before an event
                        since = f"{time.time() - 1:.9f}"
                    # Register, then check: close() and the iterator's end either see the
                    # stream here or this thread sees their flag.
                    current.append(stream)
                    self._streams.add(stream)
                    opened.set()
                    try:
                        if stop.is_set():
                            break
                        for event in stream:
                            delay_s = 0.1
                            nanos = int(event.get("timeNano") or 0)
                            if nanos:
                                since = f"{nanos // 10**9}.{nanos % 10**9:09d}"
                            attrs = (event.get("Actor") or {}).get("Attributes") or {}
                            deliver(Exit.of(str(event.get("id", "")), attrs))
                    finally:
                        current.remove(stream)
                        self._streams.discard(stream)
                        close_stream(stream)
                    stop.wait(delay_s)
            finally:
                opened.set()
                deliver(None)

        thread = threading.Thread(target=run, name=f"docker-events-{scope}", daemon=True)
        thread.start()
        # Subscribed before the first item is awaited: a later exit is never missed.
        await asyncio.to_thread(opened.wait, 10.0)
        try:
            while (item := await queue.get()) is not None:
                yield item
        finally:
            stop.set()
            self._stops.discard(stop)
            for stream in list(current):
                close_stream(stream)
            await asyncio.to_thread(thread.join, 5.0)

    async def close(self) -> None:
        """End every `follow()` iterator."""
        self._closed = True
        for stop in list(self._stops):
            stop.set()
        for stream in list(self._streams):
            await asyncio.to_thread(close_stream, stream)
