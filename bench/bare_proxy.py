"""A minimal aiohttp reverse proxy to one fixed upstream, with no Redis: the reference point.

Same techniques as the router: one ClientSession, auto_decompress=False, streamed bodies both
ways, hop-by-hop headers dropped, uvloop, no access log, handler cancellation.

    python bench/bare_proxy.py PORT UPSTREAM_HOST:PORT
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
from collections.abc import AsyncIterator

import aiohttp
from aiohttp import web
from multidict import CIMultiDict
from yarl import URL

HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "host",
    }
)
CLIENT = web.AppKey("client", aiohttp.ClientSession)
UPSTREAM = web.AppKey("upstream", str)


async def _client_ctx(app: web.Application) -> AsyncIterator[None]:
    app[CLIENT] = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=4.0),
        auto_decompress=False,
        cookie_jar=aiohttp.DummyCookieJar(),
        timeout=aiohttp.ClientTimeout(total=None, sock_connect=5),
        read_bufsize=256 * 1024,
    )
    yield
    await app[CLIENT].close()


async def handle(request: web.Request) -> web.StreamResponse:
    headers = CIMultiDict((k, v) for k, v in request.headers.items() if k.lower() not in HOP)
    url = URL(f"http://{request.app[UPSTREAM]}{request.raw_path}", encoded=True)
    data = request.content.iter_any() if request.body_exists else None
    async with request.app[CLIENT].request(
        request.method,
        url,
        headers=headers,
        data=data,
        allow_redirects=False,
        skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding", "Content-Type"),
    ) as up:
        out = CIMultiDict((k, v) for k, v in up.headers.items() if k.lower() not in HOP)
        if "Transfer-Encoding" in up.headers:
            out.popall("Content-Length", None)
        resp = web.StreamResponse(status=up.status, reason=up.reason, headers=out)
        await resp.prepare(request)
        async for chunk in up.content.iter_any():
            await resp.write(chunk)
        await resp.write_eof()
        return resp


def main() -> None:
    port, upstream = int(sys.argv[1]), sys.argv[2]
    with contextlib.suppress(ImportError):
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    app = web.Application()
    app[UPSTREAM] = upstream
    app.cleanup_ctx.append(_client_ctx)
    app.router.add_route("*", "/{tail:.*}", handle)
    web.run_app(
        app, host="127.0.0.1", port=port, access_log=None, print=None, handler_cancellation=True
    )


if __name__ == "__main__":
    main()
