"""Where a request goes: the pool, the endpoint prefix, and the rest, split once per request."""

from __future__ import annotations

from dataclasses import dataclass

from aiohttp import web


@dataclass(frozen=True, slots=True)
class Target:
    """A request for a pool endpoint: `prefix` is the endpoint's raw path (`/pools/demo`) and
    `rest` what follows it with the query, both exactly as sent; `path` is `rest` unqueried."""

    pool: str
    prefix: str
    rest: str
    path: str

    @classmethod
    def split(cls, pool: str, raw_path: str, depth: int) -> Target:
        """The target of `raw_path` whose first `depth` segments name the endpoint."""
        path, sep, query = raw_path.partition("?")
        parts = path.split("/", depth + 1)
        rest = "/" + parts[depth + 1] if len(parts) > depth + 1 else "/"
        return cls(pool, "/".join(parts[: depth + 1]), rest + sep + query, rest)

    @classmethod
    def whole(cls, pool: str, raw_path: str) -> Target:
        """A host-suffix request: the whole path goes to the session."""
        return cls(pool, "", raw_path, raw_path.partition("?")[0])

    def base_url(self, request: web.Request) -> str:
        """The endpoint's absolute URL, for links in management answers."""
        return f"{request.scheme}://{request.host}{self.prefix}"
