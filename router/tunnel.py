"""A relayed WebSocket as a byte tunnel.

The router checks the caller's upgrade, makes the sandbox's upgrade with the caller's own key,
protocols and extensions, answers the caller with the sandbox's 101, and from then on moves
bytes: frames pass through untouched (masked as the caller masked them, compressed if the two
ends agreed to), so subprotocols, extensions and close codes are end to end. A small scanner per
direction follows frame headers only: data frames count as session activity (pings do not),
a frame over `max_frame_bytes` ends the relay with 1009, and the router can close both ends
with 1001 at shutdown when no frame is half sent.

An idle tunnel is two transports and a few small objects, instead of two aiohttp WebSocket
objects, their readers, writers and queues, and two pump tasks (32 KiB → see bench/results).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import logging
import struct
from collections.abc import Callable
from typing import cast

from aiohttp import web
from multidict import CIMultiDict

from router.errors import SessionTimeoutError, SessionUnreachableError

log = logging.getLogger("sessionpool.proxy")
WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
MAX_HEAD_BYTES = 16 * 1024
HIGH_WATER = 256 * 1024  # bytes queued towards one side before the other is paused
GOING_AWAY, TOO_BIG = 1001, 1009


def accept_key(key: str) -> str:
    return base64.b64encode(hashlib.sha1(key.encode() + WS_GUID).digest()).decode()


def close_frame(code: int, reason: bytes, masked: bool) -> bytes:
    payload = struct.pack("!H", code) + reason[:120]
    if not masked:
        return bytes((0x88, len(payload))) + payload
    # A zero mask is a valid mask: the payload goes as is.
    return bytes((0x88, 0x80 | len(payload))) + b"\0\0\0\0" + payload


class TooBigError(Exception):
    pass


class _Scanner:
    """Follows frame boundaries in one direction of a tunnel."""

    __slots__ = ("_head", "_left", "max_frame_bytes", "on_data")

    def __init__(self, max_frame_bytes: int, on_data: Callable[[], None]) -> None:
        self.max_frame_bytes = max_frame_bytes
        self.on_data = on_data
        self._head = b""  # a frame header not yet complete
        self._left = 0  # payload bytes of the current frame still to pass

    @property
    def at_boundary(self) -> bool:
        return not self._head and not self._left

    def feed(self, data: bytes) -> None:
        """Raises: TooBigError."""
        i, n = 0, len(data)
        while i < n:
            if self._left:
                step = min(self._left, n - i)
                self._left -= step
                i += step
                continue
            head = self._head + data[i : i + 14]
            size = _frame_header_size(head)
            if size is None or len(head) < size:
                self._head = head
                i = n
                continue
            consumed = size - len(self._head)
            self._head = b""
            i += consumed
            length = head[1] & 0x7F
            if length == 126:
                length = struct.unpack_from("!H", head, 2)[0]
            elif length == 127:
                length = struct.unpack_from("!Q", head, 2)[0]
            if length > self.max_frame_bytes:
                raise TooBigError
            if head[0] & 0x0F in (0, 1, 2):  # continuation, text, binary
                self.on_data()
            self._left = length


def _frame_header_size(head: bytes) -> int | None:
    if len(head) < 2:
        return None
    length = head[1] & 0x7F
    size = 2 + (2 if length == 126 else 8 if length == 127 else 0)
    return size + 4 if head[1] & 0x80 else size


class Tunnel(asyncio.Protocol):
    """The sandbox connection's protocol, and the caller connection's payload parser."""

    def __init__(self, on_data: Callable[[], None], max_frame_bytes: int) -> None:
        self.up: asyncio.Transport | None = None
        self.down: asyncio.Transport | None = None
        self._head = b""
        self.handshake: asyncio.Future[tuple[bytes, bytes]] = (
            asyncio.get_running_loop().create_future()
        )
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._to_up = _Scanner(max_frame_bytes, on_data)
        self._to_down = _Scanner(max_frame_bytes, on_data)
        self._pending = b""  # sandbox bytes that arrived before the caller was answered

    # The sandbox side (asyncio.Protocol) ---------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.up = cast(asyncio.Transport, transport)  # uvloop's is not an asyncio.Transport

    def data_received(self, data: bytes) -> None:
        if not self.handshake.done():
            self._head += data
            end = self._head.find(b"\r\n\r\n")
            if end >= 0:
                self.handshake.set_result((self._head[:end], self._head[end + 4 :]))
                self._head = b""
            elif len(self._head) > MAX_HEAD_BYTES:
                self.handshake.set_exception(SessionUnreachableError("Oversized upgrade answer."))
            return
        if self.down is None or self.up is None:
            self._pending += data
            return
        self._relay(data, self._to_down, self.down, self.up)

    def connection_lost(self, exc: BaseException | None) -> None:
        if not self.handshake.done():
            self.handshake.set_exception(
                SessionUnreachableError("The session dropped the connection.")
            )
        if self.down is not None:
            self.down.close()  # after what is queued for the caller
        self._finish()

    def pause_writing(self) -> None:
        if self.down is not None:
            self.down.pause_reading()

    def resume_writing(self) -> None:
        if self.down is not None:
            self.down.resume_reading()

    # The caller side (aiohttp's payload parser interface) ----------------------------------

    def start(self, down: asyncio.Transport, rest: bytes) -> None:
        """The caller has its 101: relay what the sandbox sent already, then everything."""
        self.down = down
        pending, self._pending = rest + self._pending, b""
        if pending and self.up is not None:
            self._relay(pending, self._to_down, down, self.up)

    def feed_data(self, data: bytes) -> tuple[bool, bytes]:
        if self.up is not None and self.down is not None:
            self._relay(data, self._to_up, self.up, self.down)
        return False, b""

    def feed_eof(self) -> None:
        if self.up is not None:
            self.up.close()
        self._finish()

    # Both ---------------------------------------------------------------------------------

    def _relay(
        self, data: bytes, scanner: _Scanner, dst: asyncio.Transport, src: asyncio.Transport
    ) -> None:
        try:
            scanner.feed(data)
        except TooBigError:
            log.info("websocket frame over the size limit: closing both ends with 1009")
            self.close(TOO_BIG, b"message too big")
            return
        dst.write(data)
        if dst is self.down and dst.get_write_buffer_size() > HIGH_WATER:
            # aiohttp owns the caller side's flow-control callbacks: poll until it drains.
            src.pause_reading()
            asyncio.get_running_loop().call_later(0.01, self._drained, dst, src)

    def _drained(self, dst: asyncio.Transport, src: asyncio.Transport) -> None:
        if dst.is_closing() or src.is_closing():
            return
        if dst.get_write_buffer_size() > HIGH_WATER // 4:
            asyncio.get_running_loop().call_later(0.01, self._drained, dst, src)
        else:
            src.resume_reading()

    def close(self, code: int, reason: bytes) -> None:
        """Close both ends with `code` where no frame is half sent, then the connections."""
        for transport, scanner, masked in (
            (self.down, self._to_down, False),
            (self.up, self._to_up, True),
        ):
            if transport is None or transport.is_closing():
                continue
            if scanner.at_boundary:
                transport.write(close_frame(code, reason, masked))
                transport.close()
            else:
                transport.abort()
        self._finish()

    def _finish(self) -> None:
        if not self.done.done():
            self.done.set_result(None)


def upgrade_request(target: str, addr: str, headers: CIMultiDict[str]) -> bytes:
    lines = [f"GET {target} HTTP/1.1", f"Host: {addr}"]
    lines += [f"{name}: {value}" for name, value in headers.items()]
    lines += ["Upgrade: websocket", "Connection: Upgrade", "", ""]
    return "\r\n".join(lines).encode("latin-1")


def parse_upgrade_answer(head: bytes, key: str) -> CIMultiDict[str]:
    """The sandbox's 101 headers.

    Raises:
        SessionUnreachableError: not a 101 for this key.
    """
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ", 2)
    status = parts[1] if len(parts) > 1 else "?"
    if status != "101":
        raise SessionUnreachableError(f"The session refused the WebSocket upgrade ({status}).")
    headers: CIMultiDict[str] = CIMultiDict()
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if sep and name.strip():
            headers.add(name.strip(), value.strip())
    if headers.get("Sec-WebSocket-Accept") != accept_key(key):
        raise SessionUnreachableError("The session answered the WebSocket upgrade wrongly.")
    return headers


async def open_tunnel(
    addr: str,
    target: str,
    headers: CIMultiDict[str],
    key: str,
    connect_timeout_s: float,
    tunnel: Tunnel,
) -> tuple[CIMultiDict[str], bytes]:
    """Connect to the sandbox and make its upgrade; returns its 101 headers and any bytes
    that followed them.

    Raises:
        SessionUnreachableError, SessionTimeoutError.
    """
    host, _, port = addr.rpartition(":")
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(connect_timeout_s):
            await loop.create_connection(lambda: tunnel, host.strip("[]"), int(port))
            assert tunnel.up is not None
            tunnel.up.write(upgrade_request(target, addr, headers))
            head, rest = await tunnel.handshake
    except TimeoutError as exc:
        if tunnel.up is not None:
            tunnel.up.abort()
        raise SessionTimeoutError("The session did not answer in time.") from exc
    except OSError as exc:
        log.warning("session at %s is unreachable: %r", addr, exc)
        raise SessionUnreachableError("The session is unreachable.") from exc
    try:
        return parse_upgrade_answer(head, key), rest
    except SessionUnreachableError:
        assert tunnel.up is not None
        tunnel.up.abort()
        raise


def switching_protocols(answer: CIMultiDict[str], drop: frozenset[str]) -> web.StreamResponse:
    """The caller's 101, from the sandbox's."""
    headers: CIMultiDict[str] = CIMultiDict()
    for name, value in answer.items():
        if name.lower() not in drop:
            headers.add(name, value)
    headers["Upgrade"] = "websocket"
    headers["Connection"] = "Upgrade"
    resp = web.StreamResponse(status=101, headers=headers)
    resp.force_close()
    return resp
