"""Forwarding headers a sandbox sees: who called, over what, through which proxies.

A caller's `X-Forwarded-For`, `Forwarded`, `X-Real-IP`, `X-Forwarded-Proto` and
`X-Forwarded-Host` are believed only when the connection comes from an address in
`trusted_proxies` (a load balancer of the operator's). Then the router appends the peer to
the chain the proxy started. From anyone else they are lies as likely as not, so they are
replaced by what the router saw itself, never appended to: a session that logs or
rate-limits by client address cannot be fooled by a header the client wrote.
"""

from __future__ import annotations

from aiohttp import web
from multidict import CIMultiDict

from router.addresses import Network, in_networks

TRUSTED_PROXIES = web.AppKey("trusted_proxies", tuple[Network, ...])
# Set here from the router's own view (or a trusted proxy's); never copied from the caller.
FORWARDING = frozenset(
    {
        "x-forwarded-for",
        "forwarded",
        "x-real-ip",
        "x-forwarded-proto",
        "x-forwarded-host",
        "x-forwarded-prefix",
    }
)


def _quoted(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _forwarded_element(peer: str, scheme: str, host: str) -> str:
    """An RFC 7239 element for this hop; IPv6 nodes are bracketed and quoted."""
    node = _quoted(f"[{peer}]") if ":" in peer else (peer or "unknown")
    return f"for={node};proto={scheme};host={_quoted(host)}"


def forwarding_headers(request: web.Request, prefix: str) -> list[tuple[str, str]]:
    """The forwarding headers of `request` as the sandbox sees them.

    `prefix` is the path the router stripped (`/pools/demo`), sent as X-Forwarded-Prefix so
    a session can build links (e.g. Operation-Location) that work through the router.
    """
    headers = request.headers
    peer = request.remote or ""
    trusted = in_networks(peer, request.app.get(TRUSTED_PROXIES, ()))
    if trusted:
        chain = headers.getall("X-Forwarded-For", [])
        proto = headers.get("X-Forwarded-Proto") or request.scheme
        host = headers.get("X-Forwarded-Host") or request.host
        out = [("X-Forwarded-For", ", ".join([*chain, peer]))]
    else:
        proto, host = request.scheme, request.host
        out = [("X-Forwarded-For", peer)]
    out += (
        ("X-Forwarded-Proto", proto),
        ("X-Forwarded-Host", host),
        ("X-Forwarded-Prefix", prefix),
    )
    if "Forwarded" in headers:
        element = _forwarded_element(peer, request.scheme, request.host)
        prior = headers.getall("Forwarded") if trusted else []
        out.append(("Forwarded", ", ".join([*prior, element])))
    if "X-Real-IP" in headers:
        out.append(("X-Real-IP", headers["X-Real-IP"] if trusted else peer))
    return out


def set_forwarding(request: web.Request, out: CIMultiDict[str], prefix: str) -> None:
    """Write the forwarding headers of `request` into `out` (which holds none of them)."""
    for name, value in forwarding_headers(request, prefix):
        out[name] = value
