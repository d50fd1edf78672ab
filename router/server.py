"""Serving the router: uvloop, the C parser checked, no access log, the open-files limit
raised, N processes on one port."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import multiprocessing
import os
import resource
import signal
import socket
import sys
from pathlib import Path

import aiohttp.http_parser
from aiohttp import web

from router.app import METRICS, create_app
from router.connections import (
    AcceptingSite,
    BoundedRunner,
    ConnectionBounds,
    run_requests_inline,
)
from router.settings import Settings
from router.tls import ReloadingTLS

log = logging.getLogger("sessionpool.router")
# The cyclic garbage collector's young generation is collected once this many more container
# objects were allocated than freed (CPython's default: 700). With hundreds of requests in
# flight, 700 came every few milliseconds: every in-flight request's objects were promoted to
# the old generations, whose collections then took a quarter of the router's CPU at
# c=1000. At 50,000 young collections are rare (one in a 6 s bench run at c=1000) and come
# after those objects are gone; the garbage they may hold is bounded by the same number.
GC_YOUNG_THRESHOLD = 50_000


NR_OPEN = Path("/proc/sys/fs/nr_open")  # Linux: no process may have a higher RLIMIT_NOFILE


def raise_open_files(target: int) -> tuple[int, int]:
    """Raise this process's RLIMIT_NOFILE before serving; returns the (soft, hard) in force.

    Every client connection is a descriptor, and a relayed one (a WebSocket, a request in
    flight) a second, to the sandbox: distributions start processes with a soft limit of 1024
    and a hard one the soft may always be raised to. The soft limit goes up to the hard one;
    the hard one (and the soft with it) up to `target` where the process may raise it (root,
    CAP_SYS_RESOURCE), never above the kernel's `nr_open`. Nothing is ever lowered.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    with contextlib.suppress(OSError, ValueError):
        target = min(target, int(NR_OPEN.read_text()))
    if hard == resource.RLIM_INFINITY:
        new = max(soft, target)
        resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
        return new, hard
    if target > hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, target))
            return target, target
        except (OSError, ValueError):  # not privileged: the hard limit is as far as we go
            pass
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard, hard


def c_parser_loaded() -> bool:
    """The pure-Python HTTP parser is slower and the subject of most smuggling advisories."""
    return aiohttp.http_parser.HttpRequestParser.__module__ == "aiohttp._http_parser"


def install_uvloop() -> None:
    with contextlib.suppress(ImportError):
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


async def start_site(
    settings: Settings, app: web.Application | None = None, reuse_port: bool = False
) -> tuple[web.AppRunner, int]:
    """Start serving; returns the runner and the bound port (useful with port 0). Requests
    are served in their connections' tasks (`run_requests_inline`: it sets the running
    loop's task factory)."""
    if not c_parser_loaded():
        log.warning("aiohttp's C HTTP parser is not loaded: slower, and less strict")
    app = app or create_app(settings)
    run_requests_inline(asyncio.get_running_loop())
    bounds = ConnectionBounds(
        app[METRICS],
        header_timeout_s=settings.header_timeout_s,
        max_connections=settings.max_connections,
    )
    app[METRICS].open_connections.set_function(lambda: bounds.open)
    runner = BoundedRunner(
        app,
        bounds,
        access_log=None,
        handler_cancellation=True,
        shutdown_timeout=settings.shutdown_timeout_s,
        keepalive_timeout=settings.keepalive_timeout_s,
    )
    tls = ReloadingTLS(settings.tls_cert, settings.tls_key) if settings.tls_cert else None
    await runner.setup()
    site = AcceptingSite(
        runner,
        settings.host,
        settings.port,
        reuse_port=reuse_port,
        backlog=4096,
        ssl_context=tls.context if tls is not None else None,
    )
    try:
        await site.start()
    except BaseException:
        await runner.cleanup()
        raise
    return runner, int(runner.addresses[0][1])


def tune_gc() -> None:
    """For a serving process: what exists once it serves (modules, the app) is never
    collected, so it leaves the collector's view (`gc.freeze`); young collections become rare
    enough that short-lived request objects die before them (`GC_YOUNG_THRESHOLD`)."""
    gc.collect()
    gc.freeze()
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(GC_YOUNG_THRESHOLD, older, oldest)


async def serve(settings: Settings, reuse_port: bool = False) -> None:
    """Serve until SIGTERM/SIGINT, then drain in-flight requests (bounded) and exit."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    runner, port = await start_site(settings, reuse_port=reuse_port)
    tune_gc()
    try:
        scheme = "https" if settings.tls_cert else "http"
        print(f"sessionpool router listening on {scheme}://{settings.host}:{port}", flush=True)
        await stop.wait()
    finally:
        await runner.cleanup()


def _child(settings: Settings) -> None:
    from router.logs import configure

    configure("INFO", json=settings.log_json)  # a spawned process starts unconfigured
    install_uvloop()
    asyncio.run(serve(settings, reuse_port=True))


def run_router(settings: Settings) -> None:
    """`sessionpool router`: one process, or N sharing the port through SO_REUSEPORT."""
    install_uvloop()
    soft, _ = raise_open_files(settings.max_open_files)  # spawned children inherit it
    if soft < settings.max_open_files:
        log.warning(
            "open files limited to %d (max_open_files %d): about %d relayed connections "
            "per process",
            soft,
            settings.max_open_files,
            soft // 2,
        )
    if settings.processes == 1:
        asyncio.run(serve(settings))
        return
    if settings.port == 0:
        sys.exit("--processes > 1 needs a fixed --port")
    if not hasattr(socket, "SO_REUSEPORT"):
        sys.exit("--processes > 1 needs SO_REUSEPORT")
    ctx = multiprocessing.get_context("spawn")
    children = [
        ctx.Process(target=_child, args=(settings,), daemon=True) for _ in range(settings.processes)
    ]
    for child in children:
        child.start()

    def forward(signum: int, _frame: object) -> None:
        for child in children:
            if child.pid is not None and child.is_alive():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(child.pid, signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    for child in children:
        child.join()
