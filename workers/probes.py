"""Startup and liveness probes with ACA's fields (httpGet or tcpSocket)."""

from __future__ import annotations

import asyncio
import contextlib

import aiohttp

from router.pools import Pool, Probe

# Startup probes are polled fast whatever their periodSeconds: a ready sandbox should enter the
# pool as soon as it answers (a waiting request is waiting for it). The first polls come every
# STARTUP_POLL_MIN_S and the gap grows to STARTUP_POLL_MAX_S, so a quick server is seen within
# a few ms and a slow one costs ~20 polls a second. Until the port accepts a connection those
# polls are bare TCP connects (a third of an HTTP client's attempt in CPU); then the probe
# itself. The failure budget stays threshold * period.
STARTUP_POLL_MIN_S = 0.005
STARTUP_POLL_MAX_S = 0.05
STARTUP_POLL_GROWTH = 1.25


def probe_target(addr: str, pool: Pool, probe: Probe | None) -> tuple[str, int]:
    """Host and port to probe; the target port maps to wherever the runtime put it."""
    host, _, port = addr.rpartition(":")
    if probe is None or probe.port == pool.target_port:
        return host, int(port)
    return host, probe.port


async def tcp_connects(host: str, port: int, timeout_s: float = 1.0) -> bool:
    """Whether a TCP connection to host:port opens within `timeout_s` (then it is closed)."""
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout_s)
    except (OSError, TimeoutError):
        return False
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return True


async def probe_once(
    client: aiohttp.ClientSession, addr: str, pool: Pool, probe: Probe | None
) -> bool:
    """One probe attempt: True when it passed."""
    host, port = probe_target(addr, pool, probe)
    timeout = probe.timeout_s if probe is not None else 1.0
    if probe is None or probe.path is None:
        return await tcp_connects(host, port, timeout)
    try:
        url = f"{probe.scheme}://{host}:{port}{probe.path}"
        async with client.get(
            url,
            headers=dict(probe.headers),
            allow_redirects=False,
            timeout=aiohttp.ClientTimeout(total=timeout),
        ) as resp:
            return 200 <= resp.status < 400
    except (OSError, TimeoutError, aiohttp.ClientError):
        return False


async def wait_started(client: aiohttp.ClientSession, addr: str, pool: Pool) -> bool:
    """Poll the Startup probe (or the target port) until it passes or its budget runs out."""
    probe = pool.probe("Startup")
    loop = asyncio.get_running_loop()
    if probe is not None:
        await asyncio.sleep(probe.initial_delay_s)
        budget = max(probe.period_s * probe.failure_threshold, 5.0)
    else:
        budget = 60.0
    deadline = loop.time() + budget
    gap = STARTUP_POLL_MIN_S
    host, port = probe_target(addr, pool, probe)
    timeout_s = probe.timeout_s if probe is not None else 1.0
    listening = probe is None or probe.path is None  # a TCP probe is that check already
    while True:
        if not listening:
            listening = await tcp_connects(host, port, timeout_s)
        if listening and await probe_once(client, addr, pool, probe):
            return True
        if loop.time() > deadline:
            return False
        await asyncio.sleep(gap)
        gap = min(gap * STARTUP_POLL_GROWTH, STARTUP_POLL_MAX_S)
