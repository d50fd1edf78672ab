"""The platform MCP endpoint of a pool (`{pool endpoint}/mcp`): MCP over streamable HTTP.

One JSON-RPC 2.0 message (or a batch) per POST; each request is answered in the POST's
response, as JSON, or as one SSE event per answer when the caller accepts only
`text/event-stream`. Notifications and client responses get 202. Nothing is kept between POSTs:
`Mcp-Session-Id` is issued on `initialize` for clients that track it but never required, so the
bare sequence of ACA's tutorial (`initialize` without params, then `tools/call`, no session
header) works, and so does any router for any POST. The server sends no requests of its own,
so a GET stream is refused with 405, as the transport allows.

Callers authenticate with the pool's MCP key in `x-ms-apikey` (made and rotated through the
admin API). The key is read from the store on every POST, never cached, so a rotation shuts the
old key out of every router at once; it is compared in constant time and never logged.

Taken from the `mcp_types` package (the MCP SDK's pydantic message types): the JSON-RPC
envelope models and error codes, the protocol versions, and the result and tool models. Written
here: the HTTP transport on aiohttp, dispatch, version choice and the tools (`mcp_tools`).
"""

from __future__ import annotations

import hmac
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from aiohttp import web
from mcp_types import (
    INVALID_PARAMS,
    INVALID_REQUEST,
    METHOD_NOT_FOUND,
    PARSE_ERROR,
    CallToolRequestParams,
    EmptyResult,
    ErrorData,
    Implementation,
    InitializeResult,
    JSONRPCRequest,
    ListToolsResult,
    ServerCapabilities,
    ToolsCapability,
)
from mcp_types.version import HANDSHAKE_PROTOCOL_VERSIONS
from pydantic import BaseModel, ValidationError

from router.bodies import read_body
from router.errors import (
    PoolNotFoundError,
    UnauthorizedError,
)
from router.mcp_tools import Environments, ToolError, tools_for
from router.pools import BUILTIN_TYPES, POOL_NAME, Pool
from router.proxy import Upstream
from router.routing import Routing

MAX_BODY_BYTES = 4 << 20
MAX_BATCH = 32
# What a client that names no version gets: the version ACA's tutorial expects.
DEFAULT_PROTOCOL_VERSION = "2025-03-26"
# Handshake versions whose tool messages we speak (the 2026-07-28 stateless era is not
# offered: its `server/discover` gets METHOD_NOT_FOUND and SDK clients fall back).
PROTOCOL_VERSIONS = tuple(v for v in HANDSHAKE_PROTOCOL_VERSIONS if v >= "2025-03-26")
SERVER_INFO = Implementation(name="sessionpool", title="sessionpool MCP server", version="0.1.0")
# Fields of newer protocol eras that handshake-era clients neither need nor expect.
NEWER_ERA_FIELDS = {"result_type", "ttl_ms", "cache_scope"}
SESSION_HEADER = "Mcp-Session-Id"

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
_NO_ID: Any = None


class RpcError(Exception):
    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def _dump(model: BaseModel) -> dict[str, Any]:
    return model.model_dump(mode="json", by_alias=True, exclude_none=True, exclude=NEWER_ERA_FIELDS)


def _error(request_id: Any, code: int, message: str) -> dict[str, Any]:
    error = ErrorData(code=code, message=message)
    return {"jsonrpc": "2.0", "id": request_id, "error": _dump(error)}


def _negotiate(params: dict[str, Any] | None) -> str:
    """The version to speak: the client's if we have it, ACA's when it names none, else our
    newest (the client then decides whether it can go on)."""
    asked = (params or {}).get("protocolVersion")
    if asked is None:
        return DEFAULT_PROTOCOL_VERSION
    return asked if asked in PROTOCOL_VERSIONS else PROTOCOL_VERSIONS[-1]


class McpEndpoint:
    """The `/pools/{pool}/mcp` route. Requests for pools without an MCP endpoint (custom
    containers serving their own `/mcp`, or MCP not enabled) go to `fallback`, the ordinary
    pool endpoint, unchanged."""

    def __init__(
        self,
        routing_key: web.AppKey[Routing],
        upstream_key: web.AppKey[Upstream],
        fallback: Handler,
    ) -> None:
        self.routing_key = routing_key
        self.upstream_key = upstream_key
        self.fallback = fallback

    async def handle(self, request: web.Request) -> web.StreamResponse:
        pool = await self._mcp_pool(request)
        if pool is None:
            return await self.fallback(request)
        await self._authenticate(request, pool)
        if request.method != "POST":
            # No server-initiated messages, so no GET stream; no state, so nothing to DELETE.
            raise web.HTTPMethodNotAllowed(request.method, ["POST"])
        body = await self._read_body(request)
        client = request.app[self.upstream_key].client
        # The principal behind the key, for tenant binding: the key's holder, whatever its
        # current value (a rotation does not cut a holder off its environments).
        principal = f"mcp:{pool.name}"
        envs = Environments(request.app[self.routing_key], client, pool, principal)
        answers, initialized = await self._dispatch(body, envs)
        if answers is None:
            return web.Response(status=202)
        headers = {SESSION_HEADER: uuid.uuid4().hex} if initialized else {}
        status = 400 if isinstance(answers, dict) and _is_bad(answers) else 200
        if _wants_sse(request) and status == 200:
            return await _send_sse(request, answers, headers)
        return web.Response(
            body=orjson.dumps(answers),
            status=status,
            headers=headers,
            content_type="application/json",
        )

    async def _mcp_pool(self, request: web.Request) -> Pool | None:
        name = request.match_info["pool"]
        if not POOL_NAME.match(name):
            return None
        try:
            pool = await request.app[self.routing_key].get_pool(name)
        except PoolNotFoundError:
            return None
        return pool if pool.mcp_enabled and pool.container_type in BUILTIN_TYPES else None

    async def _authenticate(self, request: web.Request, pool: Pool) -> None:
        """Raises: UnauthorizedError (missing or wrong `x-ms-apikey`)."""
        # aiohttp keeps undecodable header bytes as surrogates: compare bytes, never raise.
        sent = request.headers.get("x-ms-apikey", "").encode("utf-8", "surrogateescape")
        stored = await request.app[self.routing_key].store.mcp_key(pool.name)
        if not sent or stored is None or not hmac.compare_digest(sent, stored.encode()):
            # Same answer for "no key made yet", "missing" and "wrong": nothing to probe.
            raise UnauthorizedError(
                "This MCP endpoint needs the pool's key in the x-ms-apikey header "
                "(POST /admin/pools/{pool}/fetchMcpServerCredentials)."
            )

    @staticmethod
    async def _read_body(request: web.Request) -> Any:
        """The JSON body, or None when it is not JSON (answered with a parse error).

        Raises:
            RequestTooLargeError: over `MAX_BODY_BYTES`.
        """
        raw = await read_body(request, MAX_BODY_BYTES)
        try:
            return orjson.loads(raw)
        except orjson.JSONDecodeError:
            return None

    async def _dispatch(
        self, body: Any, envs: Environments
    ) -> tuple[dict[str, Any] | list[dict[str, Any]] | None, bool]:
        """The answers to a message or batch (None when nothing needs one), and whether an
        `initialize` was among them."""
        if body is None:
            return _error(_NO_ID, PARSE_ERROR, "The body is not valid JSON."), False
        if isinstance(body, list):
            if not body or len(body) > MAX_BATCH:
                msg = f"A batch holds 1-{MAX_BATCH} messages."
                return _error(_NO_ID, INVALID_REQUEST, msg), False
            answers = []
            initialized = False
            for message in body:
                answer, init = await self._one(message, envs)
                initialized |= init
                if answer is not None:
                    answers.append(answer)
            return (answers or None), initialized
        return await self._one(body, envs)

    async def _one(self, message: Any, envs: Environments) -> tuple[dict[str, Any] | None, bool]:
        if not isinstance(message, dict) or message.get("jsonrpc") != "2.0":
            return _error(_NO_ID, INVALID_REQUEST, "Not a JSON-RPC 2.0 message."), False
        if "method" not in message:
            return None, False  # a client's response (we send no requests): nothing to answer
        if "id" not in message:
            return None, False  # a notification (`notifications/initialized`, cancelled, ...)
        try:
            request = JSONRPCRequest.model_validate(message)
        except ValidationError:
            rid = message["id"] if isinstance(message["id"], str | int) else _NO_ID
            return _error(rid, INVALID_REQUEST, "Not a valid JSON-RPC request."), False
        try:
            result = await self._call(request.method, request.params, envs)
        except RpcError as exc:
            return _error(request.id, exc.code, exc.message), False
        except ToolError as exc:
            return _error(request.id, exc.code, exc.message), False
        answer = {"jsonrpc": "2.0", "id": request.id, "result": result}
        return answer, request.method == "initialize"

    async def _call(
        self, method: str, params: dict[str, Any] | None, envs: Environments
    ) -> dict[str, Any]:
        if method == "initialize":
            return _dump(
                InitializeResult(
                    protocol_version=_negotiate(params),
                    capabilities=ServerCapabilities(tools=ToolsCapability(list_changed=False)),
                    server_info=SERVER_INFO,
                    instructions=(
                        "Call launchShell for an environmentId, then run code or commands in "
                        "that environment; it keeps its state between calls."
                    ),
                )
            )
        if method == "ping":
            return _dump(EmptyResult())
        if method == "tools/list":
            return _dump(ListToolsResult(tools=tools_for(envs.pool)))
        if method == "tools/call":
            try:
                call = CallToolRequestParams.model_validate(params or {})
            except ValidationError as exc:
                raise RpcError(INVALID_PARAMS, _first_problem(exc)) from None
            return _dump(await envs.call(call.name, call.arguments or {}))
        raise RpcError(METHOD_NOT_FOUND, f"Method not found: {method!r}.")


def _first_problem(exc: ValidationError) -> str:
    err = exc.errors()[0]
    where = ".".join(str(p) for p in err["loc"]) or "params"
    return f"Invalid params: {where}: {err['msg']}"


def _is_bad(answer: dict[str, Any]) -> bool:
    """A lone parse or envelope error: HTTP 400, as the transport asks."""
    error = answer.get("error")
    return isinstance(error, dict) and error.get("code") in (PARSE_ERROR, INVALID_REQUEST)


def _wants_sse(request: web.Request) -> bool:
    """SSE only for a caller that accepts it and not JSON (SDK clients accept both and get
    JSON: one answer per POST needs no stream)."""
    accept = request.headers.get("Accept", "").lower()
    return "text/event-stream" in accept and "application/json" not in accept


async def _send_sse(
    request: web.Request, answers: dict[str, Any] | list[dict[str, Any]], headers: dict[str, str]
) -> web.StreamResponse:
    resp = web.StreamResponse(
        headers={**headers, "Content-Type": "text/event-stream", "Cache-Control": "no-store"}
    )
    await resp.prepare(request)
    for answer in answers if isinstance(answers, list) else [answers]:
        await resp.write(b"event: message\ndata: " + orjson.dumps(answer) + b"\n\n")
    await resp.write_eof()
    return resp
