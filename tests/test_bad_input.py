"""Malformed and hostile input against a running router: 4xx in the ACA envelope, never a 5xx.

Every case runs against a real router (aiohttp TestServer, `handler_cancellation=True`), real
Redis and fake sandboxes on loopback, and checks afterwards that no task leaked (the loop's task
count returns to its baseline) and that another caller is served right after. Where the HTTP
parser itself refuses a request (header size, framing), aiohttp answers a plain-text 400 and
closes the connection: the request never reaches a handler, so it cannot carry the envelope.

Query strings with `identifier` given twice are refused (400 InvalidIdentifier): the router
routes on one value, and a session that read the other would disagree on whose session it is.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import re
import time
import urllib.parse
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st
from yarl import URL

from router.app import create_app
from router.identifiers import IDENTIFIER
from router.keys import Keys
from router.pools import POOL_NAME
from router.settings import Settings
from router.store import Store, open_redis
from sessionpool.testing import HEALTH_PROBE, pool_body
from tests.helpers import FakeSandbox, add_ready, make_pool, wait_until

pytestmark = pytest.mark.timeout(300)
MAX_BODY = 64 * 1024
FUZZ = hsettings(
    max_examples=100,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


# The router under test ---------------------------------------------------------------------


@dataclass
class Env:
    base: str
    port: int
    store: Store
    http: aiohttp.ClientSession
    demo: list[TracingSandbox]
    other: FakeSandbox
    baseline: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def demo_names(self) -> set[str]:
        return {sb.name for sb in self.demo}


class TracingSandbox(FakeSandbox):
    """A fake sandbox that also notes every request it *starts* handling."""

    def __init__(self) -> None:
        super().__init__()
        self.started: list[str] = []

    async def echo(self, request: web.Request) -> web.Response:
        self.started.append(request.raw_path)
        return await super().echo(request)


@contextlib.asynccontextmanager
async def open_env(settings: Settings, ready: int = 8) -> AsyncIterator[Env]:
    """Pools `demo` (`ready` sessions over two fake sandboxes) and `other` (one)."""
    redis = open_redis(settings.redis_url)
    store = Store(redis, Keys(settings.key_prefix))
    demo_pool = make_pool("demo", ready=ready, max_sessions=ready + 10)
    other_pool = make_pool("other", ready=1)
    await store.put_pool(demo_pool)
    await store.put_pool(other_pool)
    demo = [await TracingSandbox().start() for _ in range(2)]
    other = await FakeSandbox().start()
    for i in range(ready):
        await add_ready(store, demo_pool, demo[i % 2])
    await add_ready(store, other_pool, other)
    app = create_app(settings.replace(max_body_bytes=MAX_BODY, allocation_wait_s=0.5))
    server = TestServer(app, host="127.0.0.1", handler_cancellation=True)
    await server.start_server()
    # force_close: no keep-alive connection (and its server task) outlives a request.
    http = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(force_close=True),
        timeout=aiohttp.ClientTimeout(total=15),
    )
    env = Env(f"http://127.0.0.1:{server.port}", server.port, store, http, demo, other)
    try:
        # The bystander's session exists before any case: its requests claim nothing.
        await bystander_served(env)
        # The router keeps one idle connection per sandbox (and each sandbox a task for it):
        # open both before counting, or the first request to the other one looks like a leak.
        for i in range(8):
            hit = {r["sandbox"] for sb in demo for r in sb.requests}
            if hit == env.demo_names:
                break
            async with http.get(f"{env.base}/pools/demo/warm?identifier=warm-{i}") as r:
                assert r.status == 200
        else:
            raise AssertionError("the demo pool's sessions did not cover both sandboxes")
        env.baseline = len(asyncio.all_tasks())
        yield env
    finally:
        await http.close()
        await server.close()
        for sb in [*demo, other]:
            sb.slow_release.set()
            await sb.close()
        await redis.aclose()


async def bystander_served(env: Env) -> None:
    """Another caller's ordinary request succeeds."""
    async with env.http.post(f"{env.base}/pools/demo/echo?identifier=bystander", data=b"hi") as r:
        assert r.status == 200, await r.text()
        assert (await r.json())["sandbox"] in env.demo_names


async def settled(env: Env) -> None:
    """After a case: no leaked task, and the router still serves others."""
    await wait_until(lambda: len(asyncio.all_tasks()) <= env.baseline, timeout=10)
    await bystander_served(env)


@pytest.fixture
async def env(settings: Settings) -> AsyncIterator[Env]:
    async with open_env(settings) as e:
        yield e


def assert_envelope(status: int, body: bytes, headers: Any, *codes: str) -> str:
    """A 4xx in the ACA envelope whose code is one of `codes` (any code if none given)."""
    assert 400 <= status < 500, (status, body[:300])
    doc = json.loads(body)
    code = doc["error"]["code"]
    assert not codes or code in codes, doc
    assert doc["error"]["message"]
    assert re.fullmatch(r"[0-9a-f]{32}", doc["error"]["traceId"])
    assert headers["x-ms-error-code"] == code
    return str(code)


async def call(
    env: Env, method: str, path: str, **kwargs: Any
) -> tuple[int, bytes, aiohttp.typedefs.LooseHeaders]:
    """One request with `path` sent exactly as written (already percent-encoded)."""
    url = URL(env.base + path, encoded=True)
    async with env.http.request(method, url, **kwargs) as r:
        return r.status, await r.read(), r.headers


# Raw sockets: what aiohttp's client refuses to send -----------------------------------------


@dataclass
class Reply:
    status: int | None  # None: the router closed without answering
    headers: dict[str, str]
    body: bytes


def parse_reply(raw: bytes) -> Reply:
    if not raw:
        return Reply(None, {}, b"")
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return Reply(status, headers, body)


async def raw_exchange(
    port: int, data: bytes, timeout_s: float = 5.0, wait_ok: bool = False
) -> Reply:
    """Send `data`; read one response (by its Content-Length) or until the router closes.

    `wait_ok`: the router may still be waiting for the rest of the request at the timeout.
    """
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    raw = b""
    try:
        writer.write(data)
        await writer.drain()
        async with asyncio.timeout(timeout_s):
            while b"\r\n\r\n" not in raw and (chunk := await reader.read(65536)):
                raw += chunk
            length = parse_reply(raw).headers.get("content-length") if raw else None
            if length is None:
                raw += await reader.read()
            else:
                while len(raw.partition(b"\r\n\r\n")[2]) < int(length):
                    if not (chunk := await reader.read(65536)):
                        break
                    raw += chunk
    except ConnectionResetError:
        pass
    except TimeoutError:
        if not wait_ok:
            raise
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
    return parse_reply(raw)


def request_bytes(target: str, *headers: str, body: bytes = b"", method: str = "GET") -> bytes:
    lines = [f"{method} {target} HTTP/1.1", "Host: router.test", *headers, "Connection: close"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def assert_refused(reply: Reply) -> None:
    """The parser refused the request: a 4xx and a closed connection, or just the close."""
    if reply.status is not None:
        assert 400 <= reply.status < 500, reply
        if reply.status != 400 or "x-ms-error-code" in reply.headers:
            assert_envelope(reply.status, reply.body, reply.headers)


# 1. Identifiers ----------------------------------------------------------------------------

IDENT_CHARS = "abcXYZ019_|}{[]:\";'<>?/.,@#$%^&*()-+=!~`"
identifiers = st.one_of(
    st.text(max_size=300),
    st.text(alphabet=IDENT_CHARS, max_size=300),
    st.text(alphabet=st.characters(codec="utf-8"), min_size=3, max_size=6).map(lambda s: "ab" + s),
    st.sampled_from(["", "abc", "a\x00bcd", "abcd\r\nX-Injected: 1", "ab\ncd", "a" * 128]),
)


def test_identifiers_fuzzed(settings: Settings) -> None:
    """Any identifier: 200 from the pool's own session iff it is valid, else 400 — never 5xx."""

    async def case(env: Env, ident: str) -> None:
        encoded = urllib.parse.quote(ident, safe="")
        status, body, headers = await call(env, "GET", f"/pools/demo/p?identifier={encoded}")
        if IDENTIFIER.fullmatch(ident):
            assert status == 200, body
            seen = json.loads(body)
            assert seen["sandbox"] in env.demo_names
            assert seen["raw_path"] == f"/p?identifier={encoded}"  # forwarded verbatim
        else:
            code = "MissingIdentifier" if ident == "" else "InvalidIdentifier"
            assert_envelope(status, body, headers, code)
        await settled(env)

    with asyncio.Runner() as runner:
        cm = open_env(settings, ready=120)
        env = runner.run(cm.__aenter__())
        try:

            @FUZZ
            @given(identifiers)
            def check(ident: str) -> None:
                runner.run(case(env, ident))

            check()
        finally:
            runner.run(cm.__aexit__(None, None, None))


@pytest.mark.parametrize(
    ("query", "code"),
    [
        ("identifier=%", "InvalidIdentifier"),
        ("identifier=%C3%28abcd", "InvalidIdentifier"),  # invalid UTF-8: U+FFFD, refused
        ("identifier=%00%00%00%00", "InvalidIdentifier"),
        ("identifier=abcd%0d%0aX-Injected:%201", "InvalidIdentifier"),
        pytest.param("identifier=" + "%41" * 300, "InvalidIdentifier", id="300-encoded"),
        ("identifier=ab+cd", "InvalidIdentifier"),  # '+' is a space in a query
        ("identifier", "MissingIdentifier"),
        ("=abcd", "MissingIdentifier"),
        ("Identifier=abcd", "MissingIdentifier"),  # the name is case-sensitive, as in ACA
        ("identifier=&identifier=", "InvalidIdentifier"),
        ("identifier=abcd&identifier=efgh", "InvalidIdentifier"),  # twice: see the docstring
        ("identifier=abcd&identifier=abcd", "InvalidIdentifier"),
        # A '%' not followed by two hex digits stays as it is; '%' is an identifier character.
        ("identifier=%zz%zz", None),
        ("identifier=ab%2", None),
    ],
)
async def test_identifier_encodings_and_duplicates(env: Env, query: str, code: str | None) -> None:
    status, body, headers = await call(env, "GET", f"/pools/demo/q?{query}")
    if code is None:
        assert status == 200, body
        assert json.loads(body)["raw_path"] == f"/q?{query}"
    else:
        assert_envelope(status, body, headers, code)
        assert not recorded(env, "/q")
    path = f"/pools/demo/.management/getSession?{query}"
    status, body, headers = await call(env, "POST", path)
    if code is None:
        assert status == 200 and json.loads(body)["identifier"] == query.partition("=")[2]
    else:
        assert_envelope(status, body, headers, code)
    await settled(env)


# 2. Pool names and paths -------------------------------------------------------------------


def test_pool_names_fuzzed(settings: Settings) -> None:
    """Any pool name: only an existing pool is served; everything else is a 404 envelope."""

    async def case(env: Env, name: str, encode: bool) -> None:
        segment = urllib.parse.quote(name, safe="") if encode else name
        path = f"/pools/{segment}/x?identifier=bystander"
        status, body, headers = await call(env, "GET", path)
        name = urllib.parse.unquote(segment)
        if name == "demo":
            assert status == 200
            assert json.loads(body)["raw_path"] == "/x?identifier=bystander"
        elif name == "other":
            assert status == 200  # its own session in the other pool; never a demo sandbox
            assert json.loads(body)["sandbox"] == env.other.name
        elif status == 400 and "x-ms-error-code" not in headers:
            pass  # the HTTP parser refused the target itself
        else:
            assert_envelope(status, body, headers, "PoolNotFound", "NotFound")
        await settled(env)

    names = st.one_of(
        st.text(max_size=80),
        st.from_regex(POOL_NAME, fullmatch=True),
        st.sampled_from(
            ["demo", "other", "..", "%2e%2e", "..%2f", "demo%2f..%2fother", "demo%00", "DEMO"]
        ),
    )

    with asyncio.Runner() as runner:
        cm = open_env(settings)
        env = runner.run(cm.__aenter__())
        try:

            @FUZZ
            @given(names, st.booleans())
            def check(name: str, encode: bool) -> None:
                if not encode and not re.fullmatch(r"[A-Za-z0-9._~%-]+", name):
                    encode = True  # raw: only what is valid in a path segment as it is
                runner.run(case(env, name, encode))

            check()
        finally:
            runner.run(cm.__aexit__(None, None, None))


@pytest.mark.parametrize(
    ("target", "forwarded"),
    [
        ("/pools/demo/%2e%2e/other/x", "/%2e%2e/other/x"),
        ("/pools/demo/%2E%2E%2Fother%2Fx", "/%2E%2E%2Fother%2Fx"),
        ("/pools/demo/..%2f..%2fother/x", "/..%2f..%2fother/x"),
        ("/pools/demo/../other/x", "/../other/x"),
        ("/pools/demo/a/../../other/x", "/a/../../other/x"),
        ("/pools/demo/./x", "/./x"),
        ("/pools/demo//x", "//x"),
        ("/pools/demo/%2F%2Fevil.test/x", "/%2F%2Fevil.test/x"),
        ("/subscriptions/s/resourceGroups/r/sessionPools/demo/../other/x", "/../other/x"),
        ("/subscriptions/s/resourceGroups/r/sessionPools/demo/%2e%2e/x", "/%2e%2e/x"),
    ],
)
async def test_encoded_traversal_is_forwarded_verbatim_to_the_same_pool(
    env: Env, target: str, forwarded: str
) -> None:
    reply = await raw_exchange(env.port, request_bytes(f"{target}?identifier=bystander"))
    assert reply.status == 200, reply
    seen = json.loads(reply.body)
    assert seen["sandbox"] in env.demo_names  # demo's session, never the other pool's
    assert seen["raw_path"] == f"{forwarded}?identifier=bystander"
    assert env.other.requests == []
    await settled(env)


@pytest.mark.parametrize(
    "target",
    [
        "/pools/%2e%2e/other/x",
        "/pools/..%2fother/x",
        "/pools/other%2f..%2fdemo/x",
        "/pools/./demo/x",
        "/pools/../pools/demo/x",
        "/pools/%64emo/x",  # a percent-encoded name is decoded, then must match exactly
        "/pools/demo%20/x",
    ],
)
async def test_traversal_in_the_pool_name_is_not_found(env: Env, target: str) -> None:
    reply = await raw_exchange(env.port, request_bytes(f"{target}?identifier=bystander"))
    if target == "/pools/%64emo/x":
        assert reply.status == 200 and json.loads(reply.body)["sandbox"] in env.demo_names
    else:
        assert reply.status == 404, reply
        assert_envelope(reply.status, reply.body, reply.headers, "PoolNotFound", "NotFound")
    assert env.other.requests == []
    await settled(env)


# 3. Headers and framing the parser refuses -------------------------------------------------

IDENT_Q = "/pools/demo/h?identifier=bystander"
JSON_TYPE = {"Content-Type": "application/json"}


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(request_bytes(IDENT_Q, "X-Long: " + "a" * 9000), id="header-line-9000"),
        pytest.param(
            request_bytes("/pools/demo/" + "a" * 9000 + "?identifier=abcd"), id="url-9000"
        ),
        pytest.param(request_bytes(IDENT_Q, *(f"X-H{i}: v" for i in range(200))), id="200-headers"),
        pytest.param(request_bytes(IDENT_Q, "X-A: v\rX-Injected: 1"), id="bare-CR-injection"),
        pytest.param(request_bytes(IDENT_Q, "Bad Name: v"), id="space-in-name"),
        pytest.param(request_bytes(IDENT_Q, "X-A\x00: v"), id="NUL-in-name"),
        pytest.param(request_bytes(IDENT_Q, "(x): v"), id="separator-in-name"),
        pytest.param(request_bytes(IDENT_Q, ": v"), id="empty-name"),
        pytest.param(request_bytes(IDENT_Q, "X-A: a\x00b"), id="NUL-in-value"),
        pytest.param(request_bytes(IDENT_Q, "X-A: v", " folded: 1"), id="obs-fold"),
        pytest.param(
            request_bytes(IDENT_Q, "Content-Length: 5", "Transfer-Encoding: chunked", method="POST")
            + b"0\r\n\r\n",
            id="CL-and-TE",
        ),
        pytest.param(
            request_bytes(IDENT_Q, "Content-Length: 5", "Content-Length: 6", method="POST")
            + b"hello!",
            id="two-CLs",
        ),
        pytest.param(
            request_bytes(IDENT_Q, "Content-Length: +5", method="POST") + b"hello", id="CL-plus"
        ),
        pytest.param(request_bytes(IDENT_Q, "Content-Length: -1", method="POST"), id="CL-negative"),
        pytest.param(
            request_bytes(IDENT_Q, "Content-Length: 0x5", method="POST") + b"hello", id="CL-hex"
        ),
        pytest.param(
            request_bytes(IDENT_Q, "Transfer-Encoding: gzip, chunked, identity", method="POST")
            + b"0\r\n\r\n",
            id="TE-not-chunked-last",
        ),
        pytest.param(
            request_bytes(IDENT_Q, "Transfer-Encoding: chunked", method="POST")
            + b"zz\r\nhello\r\n0\r\n\r\n",
            id="bad-chunk-size",
        ),
        pytest.param(b"GET " + IDENT_Q.encode() + b" HTTP/9.9\r\n\r\n", id="bad-version"),
        pytest.param(b"G\x00T / HTTP/1.1\r\n\r\n", id="NUL-in-method"),
        pytest.param(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 64, id="TLS"),
        pytest.param(b"GET /pools/demo/h?identifier=ab\x00cd HTTP/1.1\r\n\r\n", id="NUL-in-url"),
    ],
)
async def test_malformed_requests_are_refused_before_any_session(env: Env, data: bytes) -> None:
    reply = await raw_exchange(env.port, data)
    assert_refused(reply)
    assert not [r for sb in env.demo for r in sb.requests if r.get("raw_path", "")[:2] == "/h"]
    await settled(env)


def test_raw_bytes_fuzzed(settings: Settings) -> None:
    """Random bytes after a valid request line: a 4xx, a close or a 200 — never a 5xx."""

    async def case(env: Env, junk: bytes) -> None:
        data = b"POST " + IDENT_Q.encode() + b" HTTP/1.1\r\nHost: r\r\nConnection: close\r\n"
        # The junk may leave a request incomplete (a body still owed): the router waits.
        reply = await raw_exchange(env.port, data + junk, timeout_s=1, wait_ok=True)
        if reply.status is not None:
            assert reply.status < 500, reply
        await settled(env)

    junk = st.one_of(
        st.binary(max_size=400),
        st.lists(
            st.sampled_from(
                [
                    *(b"\r\n", b"\n", b"\r", b":", b" ", b"X-A", b"Content-Length: 3", b"\x00"),
                    *(b"Transfer-Encoding: chunked", b"abc", b"0\r\n\r\n", b"\xff"),
                ]
            ),
            max_size=30,
        ).map(b"".join),
    )
    with asyncio.Runner() as runner:
        cm = open_env(settings)
        env = runner.run(cm.__aenter__())
        try:

            @FUZZ
            @given(junk)
            def check(data: bytes) -> None:
                runner.run(case(env, data + b"\r\n\r\n"))

            check()
        finally:
            runner.run(cm.__aexit__(None, None, None))


async def test_headers_cannot_smuggle_a_line_to_the_session(env: Env) -> None:
    """A header value with a bare LF: either refused, or the session sees clean headers."""
    reply = await raw_exchange(env.port, request_bytes(IDENT_Q, "X-A: v\nX-Second: 2", "X-B: ok"))
    if reply.status == 200:
        seen = json.loads(reply.body)
        assert all("\r" not in v and "\n" not in v for _, v in seen["headers"])
    else:
        assert_refused(reply)
    await settled(env)


# 4. Bodies ---------------------------------------------------------------------------------


def recorded(env: Env, path: str) -> list[dict[str, Any]]:
    """Requests the demo sandboxes received *complete* for `path` (they record after EOF)."""
    return [r for sb in env.demo for r in sb.requests if r.get("raw_path", "").startswith(path)]


async def test_body_over_the_cap_content_length(env: Env) -> None:
    status, body, headers = await call(
        env, "POST", "/pools/demo/big?identifier=bystander", data=b"x" * (MAX_BODY + 1)
    )
    assert status == 413
    assert_envelope(status, body, headers, "RequestTooLarge")
    assert recorded(env, "/big") == []
    # Declared too large, nothing sent: refused before the session is dialled.
    reply = await raw_exchange(
        env.port,
        request_bytes(
            "/pools/demo/big?identifier=bystander", f"Content-Length: {10**15}", method="POST"
        ),
    )
    assert reply.status == 413
    assert_envelope(reply.status, reply.body, reply.headers, "RequestTooLarge")
    await settled(env)


async def test_body_over_the_cap_chunked_never_reaches_the_session_complete(env: Env) -> None:
    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(4):
            yield b"y" * (MAX_BODY // 2)

    status, body, headers = await call(
        env, "POST", "/pools/demo/bigchunked?identifier=bystander", data=chunks()
    )
    assert status == 413
    assert_envelope(status, body, headers, "RequestTooLarge")
    await settled(env)
    assert recorded(env, "/bigchunked") == []  # the session never saw a complete request


@pytest.mark.parametrize(
    ("framing", "sent"),
    [
        ("Content-Length: 5000", b"a" * 1000),
        ("Content-Length: 5000", b""),
        ("Transfer-Encoding: chunked", b"3e8\r\n" + b"a" * 1000 + b"\r\n"),
        ("Transfer-Encoding: chunked", b"3e8\r\n" + b"a" * 10),  # inside a chunk
        ("Transfer-Encoding: chunked", b"3e8\r\n" + b"a" * 1000 + b"\r\n0\r\n"),  # no last CRLF
    ],
)
async def test_truncated_body_never_reaches_the_session_complete(
    env: Env, framing: str, sent: bytes
) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", env.port)
    head = request_bytes("/pools/demo/cut?identifier=bystander", framing, method="POST")
    writer.write(head + sent)
    await writer.drain()
    # Once a sandbox handles /cut, the router has dialled it and streams what it got; then
    # the client goes away.
    if sent:
        await wait_until(lambda: any(p.startswith("/cut") for sb in env.demo for p in sb.started))
    else:  # the router's client sends the head with the first body bytes: none come here
        await wait_until(lambda: len(asyncio.all_tasks()) > env.baseline)
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    with contextlib.suppress(ConnectionError):
        assert await reader.read() == b""  # no response: the client left first
    await settled(env)  # every task ended: the sandbox has finished with what it got
    assert recorded(env, "/cut") == []


# 5. WebSockets -----------------------------------------------------------------------------

WS_OK_KEY = "dGhlIHNhbXBsZSBub25jZQ=="


@pytest.mark.parametrize(
    "headers",
    [
        ["Sec-WebSocket-Version: 13"],  # no key
        ["Sec-WebSocket-Version: 13", "Sec-WebSocket-Key: short"],
        ["Sec-WebSocket-Version: 13", "Sec-WebSocket-Key: " + "!" * 24],
        ["Sec-WebSocket-Version: 99", f"Sec-WebSocket-Key: {WS_OK_KEY}"],
        [f"Sec-WebSocket-Key: {WS_OK_KEY}"],  # no version
    ],
)
async def test_broken_websocket_handshakes_are_4xx_and_claim_nothing(
    env: Env, headers: list[str]
) -> None:
    data = request_bytes(
        "/pools/demo/ws?identifier=ws-broken", "Upgrade: websocket", "Connection: Upgrade", *headers
    )
    reply = await raw_exchange(env.port, data)
    assert reply.status == 400, reply
    assert_envelope(reply.status, reply.body, reply.headers, "BadRequest")
    assert await env.store.get_session("demo", "ws-broken") is None
    assert all("ws_close_code" not in r for sb in env.demo for r in sb.requests)
    await settled(env)


async def test_a_valid_websocket_still_works(env: Env) -> None:
    async with env.http.ws_connect(f"{env.base}/pools/demo/ws?identifier=bystander") as ws:
        await ws.send_str("hi")
        assert (await ws.receive_str()).endswith(":hi")
    await settled(env)


# 6. Slow clients ---------------------------------------------------------------------------


async def test_slow_clients_do_not_hold_up_others(env: Env) -> None:
    """Five slow-loris connections (headers and a body trickling) while 30 calls are served."""
    slow: list[asyncio.StreamWriter] = []
    stop = asyncio.Event()

    async def trickle(data: bytes) -> None:
        _, writer = await asyncio.open_connection("127.0.0.1", env.port)
        slow.append(writer)
        for i in range(len(data)):
            if stop.is_set():
                return
            writer.write(data[i : i + 1])
            await writer.drain()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.05)

    head = request_bytes("/pools/demo/slow?identifier=bystander", "X-Pad: " + "p" * 200)
    body_req = request_bytes(
        "/pools/demo/slowbody?identifier=bystander", "Content-Length: 100000", method="POST"
    )
    trickles = [asyncio.create_task(trickle(head)) for _ in range(3)]
    trickles += [asyncio.create_task(trickle(body_req + b"z" * 1000)) for _ in range(2)]
    try:
        await wait_until(lambda: len(slow) == 5)
        started = time.monotonic()
        for _ in range(30):
            await bystander_served(env)
        assert time.monotonic() - started < 10
        assert all(not t.done() for t in trickles)  # the slow ones were still going
    finally:
        stop.set()
        await asyncio.gather(*trickles)
        for writer in slow:
            writer.close()
    await settled(env)
    assert recorded(env, "/slow") == []


# 7. Management and admin calls with the wrong types ----------------------------------------


@pytest.mark.parametrize(
    "query",
    ["skip=abc", "skip=-1", "skip=1e3", "skip=%C2%B2", "skip=%D9%A1", "skip=99999999999",
     pytest.param("skip=" + "9" * 400, id="skip=400-digits"), "skip=0x10", "skip=%00",
     "skip=%201", "skip=1.5"],
)  # fmt: skip
async def test_list_sessions_skip_with_wrong_types(env: Env, query: str) -> None:
    for method in ("GET", "POST"):
        status, body, headers = await call(
            env, method, f"/pools/demo/.management/listSessions?{query}"
        )
        assert_envelope(status, body, headers, "BadRequest")
    await settled(env)


async def test_management_with_wrong_methods_and_bodies(env: Env) -> None:
    ep = "/pools/demo/.management"
    cases = [
        ("PUT", f"{ep}/getSession?identifier=bystander", 405),
        ("GET", f"{ep}/stopSession?identifier=bystander", 405),
        ("DELETE", f"{ep}/listSessions", 405),
        ("GET", f"{ep}/nothing?identifier=bystander", 404),
        ("GET", f"{ep}/?identifier=bystander", 404),
        ("POST", f"{ep}/getSession?identifier=nobody-here", 404),
    ]
    for method, path, want in cases:
        status, body, headers = await call(
            env, method, path, data=b"[[[[", headers={"Content-Type": "application/json"}
        )
        assert status == want, (method, path, body)
        assert_envelope(status, body, headers)
    await settled(env)


def nested(depth: int) -> Any:
    doc: Any = 1
    for _ in range(depth):
        doc = {"a": doc}
    return doc


Z40 = b"0" * 40
ADMIN_BODIES: list[tuple[str, bytes]] = [
    ("array", b"[]"),
    ("array-of-pool", b'[{"properties": {}}]'),
    ("null", b"null"),
    ("number", b"1"),
    ("string", b'"x"'),
    ("not-json", b"{properties"),
    ("empty", b""),
    ("bad-utf8", b'{"properties": "\xff"}'),
    ("lone-surrogate", b'"\\ud800"'),
    ("infinity", b'{"properties": {"scaleConfiguration": {"readySessionInstances": 1e999}}}'),
    ("big-int", b'{"properties": {"scaleConfiguration": {"readySessionInstances": 1%s}}}' % Z40),
    ("float-count", b'{"properties": {"scaleConfiguration": {"readySessionInstances": 2.0}}}'),
    ("bool-count", b'{"properties": {"scaleConfiguration": {"maxConcurrentSessions": true}}}'),
    ("properties-array", b'{"properties": []}'),
    ("stray-key", b'{"properties": {}, "surprise": 1}'),
    ("other-name", b'{"name": "other", "properties": {}}'),
    ("name-object", b'{"name": {"x": 1}, "properties": {}}'),
    ("deep-40", orjson.dumps({"properties": nested(40)})),
    ("deep-300", json.dumps({"properties": {"x": nested(300)}}).encode()),
    ("deep-1000-arrays", b'{"properties": {"x": ' + b"[" * 1000 + b"]" * 1000 + b"}}"),
    ("deep-2000", b"[" * 2000 + b"]" * 2000),
    ("huge-string", orjson.dumps({"properties": {"x": "s" * (2 << 20)}})),
    ("secret-without-value", b'{"properties": {"secrets": [{"name": "new"}]}}'),
    ("memory-huge", orjson.dumps({"properties": {"customContainerTemplate": {
        "containers": [{"image": "x", "resources": {"memory": "9" * 400 + "Ti"}}],
        "ingress": {"targetPort": 80}}}})),
    ("memory-exp", orjson.dumps({"properties": {"customContainerTemplate": {
        "containers": [{"image": "x", "resources": {"memory": "1e9999"}}],
        "ingress": {"targetPort": 80}}}})),
    ("scheme-object", orjson.dumps({"properties": {"customContainerTemplate": {
        "containers": [{"image": "x", "probes": [{"type": "Startup", "httpGet": {
            "port": 80, "scheme": {"a": 1}}}]}], "ingress": {"targetPort": 80}}}})),
]  # fmt: skip


@pytest.mark.parametrize(("name", "data"), ADMIN_BODIES, ids=[n for n, _ in ADMIN_BODIES])
async def test_admin_bodies_with_wrong_types(env: Env, name: str, data: bytes) -> None:
    before = await env.store.get_pool("demo")
    for method, pool in (("PUT", "fresh-pool"), ("PUT", "demo"), ("PATCH", "demo")):
        status, body, headers = await call(
            env,
            method,
            f"/admin/pools/{pool}",
            data=io.BytesIO(data),
            headers={"Content-Type": "application/json"},
        )
        want = 413 if name == "huge-string" else 400
        assert status == want, (method, pool, body[:300])
        assert_envelope(status, body, headers)
    assert await env.store.get_pool("fresh-pool") is None  # nothing half-applied
    assert await env.store.get_pool("demo") == before
    await settled(env)


async def test_admin_wrong_content_types_and_names(env: Env) -> None:
    for ctype in ("text/plain", "application/x-www-form-urlencoded", "application/json-seq"):
        status, body, headers = await call(
            env, "PUT", "/admin/pools/fresh-pool", data=b"{}", headers={"Content-Type": ctype}
        )
        assert status == 415
        assert_envelope(status, body, headers, "UnsupportedMediaType")
    for name in ("%2e%2e", "..%2fdemo", "DEMO", "a" * 100, "%00abc", "-abc"):
        for method in ("GET", "PATCH", "DELETE"):
            status, body, headers = await call(
                env,
                method,
                f"/admin/pools/{name}",
                data=b"{}",
                headers={"Content-Type": "application/json"},
            )
            assert status == 404, (method, name, body)
            assert_envelope(status, body, headers, "PoolNotFound", "NotFound")
        status, body, headers = await call(
            env, "PUT", f"/admin/pools/{name}", json={"properties": {}}
        )
        assert status == 400, (name, body)
        assert_envelope(status, body, headers, "InvalidPoolDefinition")
    await settled(env)


async def test_admin_chunked_body_over_the_cap(env: Env) -> None:
    async def chunks() -> AsyncIterator[bytes]:
        yield b'{"properties": {"x": "'
        for _ in range(40):
            yield b"z" * 65536
        yield b'"}}'

    status, body, headers = await call(
        env,
        "PUT",
        "/admin/pools/fresh-pool",
        data=chunks(),
        headers={"Content-Type": "application/json"},
    )
    assert status == 413
    assert_envelope(status, body, headers, "RequestTooLarge")
    assert await env.store.get_pool("fresh-pool") is None
    await settled(env)


# Hypothesis: pool definitions ---------------------------------------------------------------

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4)
    ),
    max_leaves=20,
)
VALID_PROPS: dict[str, Any] = pool_body(
    ready=0,
    max_sessions=5,
    cooldown_s=60,
    container={
        "command": [],
        "args": [],
        "env": [{"name": "MODE", "value": "x"}, {"name": "KEY", "secretRef": "k"}],
        "resources": {"cpu": 0.5, "memory": "256Mi"},
        "probes": [HEALTH_PROBE],
    },
    containerType="CustomContainer",
    sessionNetworkConfiguration={"status": "EgressDisabled"},
    sandboxConfiguration={"pidsLimit": 64},
    tenantBinding=False,
    secrets=[{"name": "k", "value": "v"}],
)["properties"]


def leaf_paths(doc: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix]
    if isinstance(doc, dict):
        for k, v in doc.items():
            out += leaf_paths(v, (*prefix, k))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            out += leaf_paths(v, (*prefix, i))
    return out


PATHS = leaf_paths(VALID_PROPS)[1:]


def replaced(doc: Any, path: tuple[Any, ...], value: Any) -> Any:
    doc = orjson.loads(orjson.dumps(doc))
    node = doc
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return doc


bodies = st.one_of(
    json_values,  # anything at all as the whole body
    st.dictionaries(st.sampled_from(["properties", "name", "id", "tags", "x"]), json_values),
    st.builds(
        lambda changes: {
            "properties": _apply(VALID_PROPS, changes),
        },
        st.lists(st.tuples(st.sampled_from(PATHS), json_values), min_size=1, max_size=3),
    ),
)


def _apply(doc: Any, changes: list[tuple[tuple[Any, ...], Any]]) -> Any:
    for path, value in changes:
        with contextlib.suppress(KeyError, IndexError, TypeError):  # an earlier change moved it
            doc = replaced(doc, path, value)
    return doc


def test_admin_pool_definitions_fuzzed(settings: Settings) -> None:
    """Any JSON PUT or PATCHed: 2xx and readable back, or 400 naming a field — never 5xx."""

    async def case(env: Env, body: Any, method: str) -> None:
        if method == "PATCH":  # onto a valid stored definition
            status, _, _ = await call(
                env, "PUT", "/admin/pools/fuzz", json={"properties": VALID_PROPS}
            )
            assert status in (200, 201)
        status, raw, headers = await call(
            env, method, "/admin/pools/fuzz", data=json.dumps(body), headers=JSON_TYPE
        )
        if status in (200, 201):
            status, raw, _ = await call(env, "GET", "/admin/pools/fuzz")
            assert status == 200, raw
            status, raw, _ = await call(env, "GET", "/admin/pools")
            assert status == 200, raw
            assert all("error" not in view for view in json.loads(raw)["value"])
        else:
            assert status == 400, raw
            assert_envelope(status, raw, headers, "InvalidPoolDefinition")
        await settled(env)

    with asyncio.Runner() as runner:
        cm = open_env(settings)
        env = runner.run(cm.__aenter__())
        try:

            @FUZZ
            @given(bodies, st.sampled_from(["PUT", "PATCH"]))
            def check(body: Any, method: str) -> None:
                runner.run(case(env, body, method))

            check()
        finally:
            runner.run(cm.__aexit__(None, None, None))
