"""Reading a whole request body under a cap (the admin API and the MCP endpoint; the proxy
streams bodies instead)."""

from __future__ import annotations

from aiohttp import web

from router.errors import RequestTooLargeError


async def read_body(request: web.Request, max_bytes: int) -> bytes:
    """The body, refused as soon as it is known to pass `max_bytes` (declared or read).

    Raises:
        RequestTooLargeError: over `max_bytes`.
    """
    if (request.content_length or 0) > max_bytes:
        raise RequestTooLargeError(max_bytes)
    body = bytearray()
    async for chunk in request.content.iter_any():
        body += chunk
        if len(body) > max_bytes:
            raise RequestTooLargeError(max_bytes)
    return bytes(body)
