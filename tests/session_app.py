"""A tiny session server for process-runtime tests: listens on $PORT, names itself by pid."""

from __future__ import annotations

import asyncio
import os
import sys

from aiohttp import web


async def sleep(request: web.Request) -> web.StreamResponse:
    # Streams one byte every 100 ms for `s` seconds: a long download in flight.
    resp = web.StreamResponse()
    await resp.prepare(request)
    for _ in range(int(float(request.query.get("s", "1")) * 10)):
        await resp.write(b".")
        await asyncio.sleep(0.1)
    await resp.write_eof()
    return resp


async def exit_now(request: web.Request) -> web.Response:
    asyncio.get_running_loop().call_later(0.05, os._exit, int(request.query.get("code", "0")))
    return web.Response(text="bye")


async def echo(request: web.Request) -> web.Response:
    return web.json_response({"hostname": f"pid-{os.getpid()}", "path": request.path_qs})


def main() -> None:
    app = web.Application()
    app.router.add_get("/health", lambda r: web.Response(text="ok"))
    app.router.add_get("/sleep", sleep)
    app.router.add_get("/exit", exit_now)
    app.router.add_route("*", "/{tail:.*}", echo)
    web.run_app(app, host="127.0.0.1", port=int(os.environ["PORT"]), print=None, access_log=None)


if __name__ == "__main__":
    sys.exit(main())
