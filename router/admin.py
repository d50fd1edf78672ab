"""The control-plane API: `GET /admin/pools`, `GET|PUT|PATCH|DELETE /admin/pools/{pool}`,
`POST /admin/pools/{pool}/fetchMcpServerCredentials|rotateMcpServerCredentials`.

Every handler needs the `admin` role (and, for a pool-scoped credential, the pool in scope).
Bodies are ARM-shaped (`{"properties": {...}}`), JSON only and at most `MAX_BODY_BYTES`.
PUT creates (201) or replaces (200); PATCH is a JSON merge patch (RFC 7386) onto the stored
definition. In both, a secret given by name only keeps its stored value, so a definition read
with GET (which never echoes secret values) can be sent back as it is. A body is validated as
a whole before anything is stored.
"""

from __future__ import annotations

import secrets
from typing import Any

import orjson
from aiohttp import web

from router.auth import ADMIN, AUTH, Principal
from router.errors import (
    BadRequestError,
    InvalidPoolError,
    PoolNotFoundError,
    RequestTooLargeError,
    UnsupportedMediaTypeError,
)
from router.limits import LimitPolicy
from router.pools import CODE_INTERPRETER_IMAGE, POOL_NAME, SHELL_IMAGE, Pool, parse_pool
from router.store import Store

MAX_BODY_BYTES = 1 << 20
MAX_DEPTH = 32  # a pool definition nests 7 levels; PUT/PATCH bodies may nest this deep
JSON_TYPES = frozenset({"application/json", "application/merge-patch+json"})
# Top-level keys besides `properties` that a body may carry and that are not stored: ARM's
# envelope and the read-only fields of our own GET, so GET output can be PUT back.
ENVELOPE_KEYS = frozenset(
    {
        "name",
        "id",
        "type",
        "location",
        "tags",
        "systemData",
        "poolManagementEndpoint",
        "counts",
        "version",
    }
)
POOL_TYPE = "sessionpool/sessionPools"
# ARM paths are case-insensitive: ARM spells these `…Mcp…`, ACA's docs `…MCP…`.
MCP_CREDENTIAL_ACTIONS = frozenset({"fetchmcpservercredentials", "rotatemcpservercredentials"})
MCP_KEY_BYTES = 32


def new_mcp_key() -> str:
    return secrets.token_urlsafe(MCP_KEY_BYTES)


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386: objects merge key by key, `null` removes a key, anything else replaces."""
    if not isinstance(patch, dict):
        return patch
    out = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = merge_patch(out.get(key), value)
    return out


def pool_view(pool: Pool, counts: dict[str, int], endpoint: str) -> dict[str, Any]:
    """What GET answers: the definition without secret values, the endpoint, live counts.

    An MCP-enabled pool shows its MCP endpoint (never its key).
    """
    props = pool.public_properties()
    if pool.mcp_enabled:
        props["mcpServerSettings"] = {
            **props.get("mcpServerSettings", {}),
            "mcpServerEndpoint": f"{endpoint}/mcp",
        }
    return {
        "id": f"/admin/pools/{pool.name}",
        "name": pool.name,
        "type": POOL_TYPE,
        "properties": props,
        "poolManagementEndpoint": endpoint,
        "counts": counts,
        "version": pool.version,
    }


def _json(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(
        body=orjson.dumps(body), status=status, headers=headers, content_type="application/json"
    )


async def _read_json(request: web.Request) -> Any:
    """The request body as JSON, within the size cap.

    Raises:
        UnsupportedMediaTypeError: not a JSON content type.
        RequestTooLargeError: over `MAX_BODY_BYTES`.
        InvalidPoolError: not valid JSON.
    """
    ctype = request.content_type
    if ctype not in JSON_TYPES:
        raise UnsupportedMediaTypeError(
            f"Content-Type {ctype!r} is not supported; send application/json."
        )
    if (request.content_length or 0) > MAX_BODY_BYTES:
        raise RequestTooLargeError(MAX_BODY_BYTES)
    body = bytearray()
    async for chunk in request.content.iter_any():
        body += chunk
        if len(body) > MAX_BODY_BYTES:
            raise RequestTooLargeError(MAX_BODY_BYTES)
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise InvalidPoolError(f"body: not valid JSON ({exc})") from None
    if _depth(doc) > MAX_DEPTH:
        # orjson reads 1024 levels but writes only 254, and merge_patch recurses: refuse here.
        raise InvalidPoolError(f"body: nested more than {MAX_DEPTH} levels deep")
    return doc


def _depth(doc: Any) -> int:
    """How deeply objects and arrays nest in `doc` (iterative: any depth is safe)."""
    deepest = 0
    todo = [(doc, 1)]
    while todo:
        node, level = todo.pop()
        if isinstance(node, dict | list):
            deepest = max(deepest, level)
            todo.extend((v, level + 1) for v in (node.values() if isinstance(node, dict) else node))
    return deepest


def _properties(name: str, body: Any) -> Any:
    """The `properties` of an ARM-shaped body (a flat body is taken as the properties).

    Raises:
        InvalidPoolError: the body is not an object, names another pool or has stray keys.
    """
    if not isinstance(body, dict):
        raise InvalidPoolError("body: must be a JSON object")
    if "name" in body and body["name"] != name:
        raise InvalidPoolError(f"name: {body['name']!r} does not match the URL's {name!r}")
    if "properties" not in body:
        return {k: v for k, v in body.items() if k not in ENVELOPE_KEYS}
    stray = sorted(set(body) - ENVELOPE_KEYS - {"properties"})
    if stray:
        raise InvalidPoolError(f"{stray[0]}: unknown field; pool settings go under properties")
    return body["properties"]


def _secret_values(props: Any) -> dict[str, str]:
    raw = props.get("secrets") if isinstance(props, dict) else None
    if not isinstance(raw, list):
        return {}
    return {
        s["name"]: s["value"]
        for s in raw
        if isinstance(s, dict)
        and isinstance(s.get("name"), str)
        and isinstance(s.get("value"), str)
    }


def _keep_secret_values(props: Any, stored: dict[str, str]) -> Any:
    """Give secrets listed by name only the value `stored` has under that name.

    Raises:
        InvalidPoolError: a secret has no value and none is stored under its name.
    """
    if not isinstance(props, dict) or not isinstance(props.get("secrets"), list):
        return props
    secrets = []
    for i, s in enumerate(props["secrets"]):
        if isinstance(s, dict) and "value" not in s and isinstance(s.get("name"), str):
            if s["name"] not in stored:
                raise InvalidPoolError(
                    f"properties.secrets[{i}].value: required for new secret {s['name']!r}"
                )
            s = {**s, "value": stored[s["name"]]}
        secrets.append(s)
    return {**props, "secrets": secrets}


class AdminApi:
    """The handlers; the store is looked up under `store_key` (set up by the app)."""

    def __init__(
        self,
        store_key: web.AppKey[Store],
        code_interpreter_image: str = CODE_INTERPRETER_IMAGE,
        shell_image: str = SHELL_IMAGE,
        limits: LimitPolicy | None = None,
    ) -> None:
        self.store_key = store_key
        # What PythonLTS and Shell pools without containers get.
        self.images = {"code_interpreter_image": code_interpreter_image, "shell_image": shell_image}
        self.limits = limits or LimitPolicy()  # no definition may ask for more

    async def _authorize(self, request: web.Request, pool: str | None) -> Principal:
        return await request.app[AUTH].authorize(request, ADMIN, pool)

    @staticmethod
    def _name(request: web.Request) -> str:
        name = request.match_info["pool"]
        if not POOL_NAME.match(name):
            raise PoolNotFoundError(name)
        return name

    async def _view(self, request: web.Request, pool: Pool) -> dict[str, Any]:
        counts = await request.app[self.store_key].counts(pool.name)
        endpoint = f"{request.scheme}://{request.host}/pools/{pool.name}"
        return pool_view(pool, counts, endpoint)

    async def _existing(self, request: web.Request, name: str) -> Pool:
        pool = await request.app[self.store_key].get_pool(name)
        if pool is None:
            raise PoolNotFoundError(name)
        return pool

    async def _stored_properties(self, request: web.Request, name: str) -> dict[str, Any] | None:
        """The stored properties, secrets included, read without validating them again: a
        definition that a later release validates more strictly can still be replaced."""
        return await request.app[self.store_key].stored_properties(name)

    async def list_pools(self, request: web.Request) -> web.Response:
        principal = await self._authorize(request, None)
        store = request.app[self.store_key]
        views = []
        for name in await store.pool_names():
            if not principal.may_use(name):
                continue
            try:
                pool = await store.get_pool(name)
            except InvalidPoolError as exc:  # stored by an older, laxer release: show why
                views.append(
                    {
                        "id": f"/admin/pools/{name}",
                        "name": name,
                        "type": POOL_TYPE,
                        "error": {"code": exc.code, "message": exc.message},
                    }
                )
                continue
            if pool is not None:  # deleted meanwhile
                views.append(await self._view(request, pool))
        return _json({"value": views})

    async def get_pool(self, request: web.Request) -> web.Response:
        name = request.match_info["pool"]
        await self._authorize(request, name)
        pool = await self._existing(request, self._name(request))
        return _json(await self._view(request, pool))

    async def put_pool(self, request: web.Request) -> web.Response:
        name = request.match_info["pool"]
        await self._authorize(request, name)
        body = await _read_json(request)
        store = request.app[self.store_key]
        props = _properties(name, body)
        old = await self._stored_properties(request, name) if POOL_NAME.match(name) else None
        props = _keep_secret_values(props, _secret_values(old))
        pool = parse_pool(name, {"properties": props}, **self.images)
        self.limits.check(pool)
        await store.put_pool(pool)
        view = await self._view(request, pool)
        if old is None:
            return _json(view, 201, {"Location": view["id"]})
        return _json(view)

    async def patch_pool(self, request: web.Request) -> web.Response:
        name = request.match_info["pool"]
        await self._authorize(request, name)
        old = await self._stored_properties(request, self._name(request))
        if old is None:
            raise PoolNotFoundError(name)
        patch = _properties(name, await _read_json(request))
        props = merge_patch(old, patch)  # onto the stored definition, secrets included
        props = _keep_secret_values(props, _secret_values(old))
        pool = parse_pool(name, {"properties": props}, **self.images)
        self.limits.check(pool)
        await request.app[self.store_key].put_pool(pool)
        return _json(await self._view(request, pool))

    async def mcp_credentials(self, request: web.Request) -> web.Response:
        """`fetchMcpServerCredentials` (the same key every time, made on first fetch) and
        `rotateMcpServerCredentials` (a new key; the old one is refused from then on)."""
        action = request.match_info["action"].lower()
        if action not in MCP_CREDENTIAL_ACTIONS:
            raise web.HTTPNotFound()
        name = request.match_info["pool"]
        await self._authorize(request, name)
        pool = await self._existing(request, self._name(request))
        if not pool.mcp_enabled:
            raise BadRequestError(
                f"Session pool '{name}' has no MCP endpoint: set "
                "properties.mcpServerSettings.isMCPServerEnabled to true first."
            )
        store = request.app[self.store_key]
        if action == "fetchmcpservercredentials":
            key = await store.fetch_mcp_key(name, new_mcp_key())
        else:
            key = new_mcp_key()
            await store.rotate_mcp_key(name, key)
        return _json({"apiKey": key}, headers={"Cache-Control": "no-store"})

    async def delete_pool(self, request: web.Request) -> web.Response:
        name = request.match_info["pool"]
        await self._authorize(request, name)
        # Ends every session and retires every sandbox; the workers remove the containers.
        if not await request.app[self.store_key].delete_pool(self._name(request)):
            raise PoolNotFoundError(name)
        return web.Response(status=204)


def routes(
    store_key: web.AppKey[Store],
    code_interpreter_image: str = CODE_INTERPRETER_IMAGE,
    shell_image: str = SHELL_IMAGE,
    limits: LimitPolicy | None = None,
) -> list[web.RouteDef]:
    """The admin routes, reading the store from `app[store_key]`."""
    api = AdminApi(store_key, code_interpreter_image, shell_image, limits)
    return [
        web.get("/admin/pools", api.list_pools),
        web.get("/admin/pools/{pool}", api.get_pool),
        web.put("/admin/pools/{pool}", api.put_pool),
        web.patch("/admin/pools/{pool}", api.patch_pool),
        web.delete("/admin/pools/{pool}", api.delete_pool),
        web.post("/admin/pools/{pool}/{action}", api.mcp_credentials),
    ]
