"""The WebSocket byte tunnel: frame scanning under any chunking, and what passes end to end."""

from __future__ import annotations

import os
import struct
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from aiohttp import WSMsgType, web
from aiohttp.test_utils import TestServer
from hypothesis import given
from hypothesis import strategies as st

from router.app import create_app
from router.settings import Settings
from router.store import Store
from router.tunnel import TooBigError, _Scanner
from tests.helpers import add_ready, make_pool


def frame(opcode: int, payload: bytes, masked: bool) -> bytes:
    n = len(payload)
    mask_bit = 0x80 if masked else 0
    if n < 126:
        head = bytes((0x80 | opcode, mask_bit | n))
    elif n < 1 << 16:
        head = bytes((0x80 | opcode, mask_bit | 126)) + struct.pack("!H", n)
    else:
        head = bytes((0x80 | opcode, mask_bit | 127)) + struct.pack("!Q", n)
    return head + (os.urandom(4) if masked else b"") + payload


frames = st.lists(
    st.tuples(
        st.sampled_from([0x1, 0x2, 0x9, 0xA]),  # text, binary, ping, pong
        st.sampled_from([0, 1, 125, 126, 127, 65535, 65536, 70000]),
        st.booleans(),
    ),
    max_size=8,
)


@given(frames, st.lists(st.integers(min_value=1, max_value=9000), max_size=40))
def test_scanner_counts_data_frames_however_the_bytes_are_cut(
    spec: list[tuple[int, int, bool]], cuts: list[int]
) -> None:
    seen: list[None] = []
    scanner = _Scanner(1 << 20, lambda: seen.append(None))
    stream = b"".join(frame(op, b"x" * n, masked) for op, n, masked in spec)
    i = 0
    for cut in cuts:
        scanner.feed(stream[i : i + cut])
        i += cut
    scanner.feed(stream[i:])
    assert len(seen) == sum(1 for op, _, _ in spec if op in (0x1, 0x2))
    assert scanner.at_boundary


def test_scanner_refuses_a_frame_over_the_limit() -> None:
    scanner = _Scanner(1000, lambda: None)
    scanner.feed(frame(0x2, b"y" * 1000, True))
    with pytest.raises(TooBigError):
        scanner.feed(frame(0x2, b"y" * 1001, True)[:8])  # the header alone is enough


async def compressed_echo(request: web.Request) -> web.WebSocketResponse:
    ws = web.WebSocketResponse(compress=True, max_msg_size=0)
    await ws.prepare(request)
    async for msg in ws:
        if msg.type == WSMsgType.TEXT:
            await ws.send_str(msg.data * 2)
        elif msg.type == WSMsgType.BINARY:
            await ws.send_bytes(msg.data)
    return ws


@pytest.fixture
async def router(settings: Settings, store: Store) -> AsyncIterator[str]:
    upstream = web.Application()
    upstream.router.add_get("/ws", compressed_echo)
    up = TestServer(upstream, host="127.0.0.1")
    await up.start_server()

    class Sandbox:
        name = "compressing"
        addr = f"127.0.0.1:{up.port}"

    pool = make_pool()
    await store.put_pool(pool)
    await add_ready(store, pool, Sandbox())  # type: ignore[arg-type]
    server = TestServer(
        create_app(settings.replace(ws_max_msg_bytes=64 * 1024)),
        host="127.0.0.1",
        handler_cancellation=True,
    )
    await server.start_server()
    yield f"http://127.0.0.1:{server.port}/pools/demo/ws?identifier=tunnel"
    await server.close()
    await up.close()


async def test_compression_is_negotiated_end_to_end_and_big_frames_are_refused(
    router: str,
) -> None:
    async with aiohttp.ClientSession() as http:
        async with http.ws_connect(router, compress=15) as ws:
            assert ws.compress == 15  # the sandbox's answer reached the caller
            await ws.send_str("abc" * 1000)
            assert await ws.receive_str() == "abc" * 2000
            await ws.send_bytes(os.urandom(100 * 1024))  # incompressible: over 64 KiB on the wire
            msg: Any = await ws.receive()
            assert msg.type == WSMsgType.CLOSE
            assert msg.data == aiohttp.WSCloseCode.MESSAGE_TOO_BIG
