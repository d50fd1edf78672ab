"""Session management endpoints (`/.management/*`, and the code interpreter's own)."""

from __future__ import annotations

import datetime as dt
from typing import Any

import orjson
from aiohttp import web

from router.errors import BadRequestError, SessionNotFoundError
from router.identifiers import query_identifier, session_key, shown_identifier
from router.pools import Pool
from router.routing import Routing
from router.store import Session

PAGE_SIZE = 300


def iso(ms: int | None) -> str | None:
    if ms is None:
        return None
    t = dt.datetime.fromtimestamp(ms / 1000, tz=dt.UTC)
    return t.strftime("%Y-%m-%dT%H:%M:%S.") + f"{t.microsecond // 1000:03d}Z"


def session_view(s: Session) -> dict[str, Any]:
    """Both spellings ACA uses: docs say `expiresAt`, the swagger `expireAt`."""
    expires = iso(s.expires_ms)
    return {
        "identifier": shown_identifier(s.identifier),
        "etag": s.sandbox,
        "createdAt": iso(s.created_ms),
        "lastAccessedAt": iso(s.last_accessed_ms),
        "expiresAt": expires,
        "expireAt": expires,
    }


def json_response(body: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(body), status=status, content_type="application/json")


def _skip(request: web.Request) -> int:
    raw = request.query.get("skip", "0")
    # isascii: str.isdigit() also accepts digits int() refuses (superscripts: '²').
    if not (raw.isascii() and raw.isdigit()) or len(raw) > 9:
        raise BadRequestError("skip: must be a non-negative integer")
    return int(raw)


def _owner(pool: Pool, principal: str) -> str | None:
    """Whose sessions the caller may see: its own on a tenant-bound pool, else everyone's."""
    return principal if pool.tenant_binding else None


def _not_found(pool: Pool, ident: str) -> SessionNotFoundError:
    return SessionNotFoundError(f"Session {ident} was not found in session pool {pool.name}.")


async def _list(
    request: web.Request, routing: Routing, pool: Pool, base: str, principal: str
) -> web.Response:
    skip = _skip(request)
    if pool.tenant_binding:
        # Only the caller's own sessions, paged among themselves: neither the count, nor the
        # pages, nor nextLink say anything about other principals' sessions.
        own = await routing.store.sessions_named(pool.name, session_key("", principal))
        sessions, total = own[skip : skip + PAGE_SIZE], len(own)
    else:
        sessions, total = await routing.store.list_sessions(pool.name, skip, PAGE_SIZE)
    after = skip + PAGE_SIZE
    next_link = None
    if after < total:
        next_link = f"{base}/{request.path.rsplit('/', 1)[1]}?skip={after}"
    views = [session_view(s) for s in sessions]
    return json_response({"value": views, "sessions": views, "count": total, "nextLink": next_link})


async def _get(request: web.Request, routing: Routing, pool: Pool, principal: str) -> web.Response:
    ident = query_identifier(request.query)
    owner = _owner(pool, principal)
    session = await routing.store.get_session(pool.name, session_key(ident, owner))
    # Another principal's session is exactly as absent as one that never existed.
    if session is None or (owner is not None and session.owner != owner):
        raise _not_found(pool, ident)
    return json_response(session_view(session))


async def _stop(request: web.Request, routing: Routing, pool: Pool, principal: str) -> str:
    ident = query_identifier(request.query)
    owner = _owner(pool, principal)
    key = session_key(ident, owner)
    # One script checks the owner and stops: no window between the check and the stop.
    if not await routing.store.stop(pool.name, key, "stopped", owner=owner or ""):
        raise _not_found(pool, ident)
    routing.forget(pool.name, key)
    return ident


async def management(
    request: web.Request,
    routing: Routing,
    pool: Pool,
    action: str,
    base: str,
    principal: str = "",
) -> web.StreamResponse:
    """`/.management/{stopSession,getSession,listSessions}` on every pool.

    `principal` is the caller's id: on a tenant-bound pool it sees and stops only its own.
    """
    method = request.method
    if action == "stopSession" and method == "POST":
        ident = await _stop(request, routing, pool, principal)
        return web.Response(text=f"Session {ident} in session pool {pool.name} stopped.")
    if action == "getSession" and method in ("GET", "POST"):
        return await _get(request, routing, pool, principal)
    if action == "listSessions" and method in ("GET", "POST"):
        return await _list(request, routing, pool, base + "/.management", principal)
    if action in ("stopSession", "getSession", "listSessions"):
        raise web.HTTPMethodNotAllowed(
            method, ["POST"] if action == "stopSession" else ["GET", "POST"]
        )
    raise web.HTTPNotFound()


CODE_INTERPRETER_PATHS = frozenset({"/session", "/listSessions", "/metadata"})


async def code_interpreter(
    request: web.Request,
    routing: Routing,
    pool: Pool,
    path: str,
    base: str,
    principal: str = "",
) -> web.StreamResponse:
    """`GET|DELETE /session`, `GET /listSessions`, `GET /metadata` (2025-02-02-preview)."""
    method = request.method
    if path == "/session" and method == "GET":
        return await _get(request, routing, pool, principal)
    if path == "/session" and method == "DELETE":
        await _stop(request, routing, pool, principal)
        return web.Response(status=204)
    if path == "/listSessions" and method == "GET":
        return await _list(request, routing, pool, base, principal)
    if path == "/metadata" and method == "GET" and pool.container_type == "Shell":
        return json_response(
            {
                "runtimes": [{"name": "bash", "version": "5.2"}],
                "preInstalledPackages": [],
                "createdAt": None,
                "lastUpdatedAt": None,
            }
        )
    if path == "/metadata" and method == "GET":
        return json_response(
            {
                "runtimes": [{"name": "python", "version": "3.11"}],
                "preInstalledPackages": [],
                "jupyterKernel": {
                    "name": "python3",
                    "version": "3.11",
                    "projectUrl": "https://ipython.org",
                    "description": "IPython kernel",
                },
                "createdAt": None,
                "lastUpdatedAt": None,
            }
        )
    raise web.HTTPMethodNotAllowed(method, ["DELETE", "GET"] if path == "/session" else ["GET"])
