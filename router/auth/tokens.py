"""Bearer JWTs: HS256 with a shared secret, RS256 with a JWK set (file or URL) kept cached."""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import orjson

from router.auth.principals import ROLES, Principal
from router.errors import UnauthorizedError
from router.settings import Settings

log = logging.getLogger("sessionpool.auth")

JWKS_REFETCH_MIN_S = 5.0  # unknown `kid`s cannot make us fetch the key set more often
JWKS_FETCH_TIMEOUT_S = 5.0
JWKS_MAX_BYTES = 1 << 20


def _parse_jwks(doc: Any) -> dict[str, Any]:
    """kid → RSA public key, for the signing keys of a JWK set usable with RS256."""
    if not isinstance(doc, dict) or not isinstance(doc.get("keys"), list):
        raise ValueError("not a JWK set (no `keys` list)")
    out: dict[str, Any] = {}
    for jwk in doc["keys"]:
        if (
            not isinstance(jwk, dict)
            or jwk.get("kty") != "RSA"
            or jwk.get("use", "sig") != "sig"
            or jwk.get("alg", "RS256") != "RS256"
        ):
            continue
        try:
            out[str(jwk.get("kid", ""))] = jwt.PyJWK(jwk, "RS256").key
        except jwt.PyJWKError as exc:
            log.warning("skipping a JWK (kid %r): %s", jwk.get("kid"), exc)
    if not out:
        raise ValueError("the JWK set has no RS256 signing key")
    return out


class JwksCache:
    """RS256 keys from a file or URL: cached `ttl_s`, fetched again for an unknown `kid`."""

    def __init__(self, source: str, ttl_s: float) -> None:
        self.source = source
        self.ttl_s = ttl_s
        self.refetch_min_s = JWKS_REFETCH_MIN_S
        self.fetches = 0
        self._keys: dict[str, Any] = {}
        self._fresh_until = float("-inf")
        self._attempted_at = float("-inf")
        self._lock = asyncio.Lock()

    async def key_for(self, kid: Any) -> Any:
        """The public key for a token's `kid` (or the only key when the token names none).

        Raises:
            UnauthorizedError: no such key, even after fetching the set again.
        """
        if time.monotonic() >= self._fresh_until:
            await self._refresh()
        key = self._lookup(kid)
        if key is None:  # perhaps rotated since we fetched
            await self._refresh()
            key = self._lookup(kid)
        if key is None:
            raise UnauthorizedError("The bearer token is signed with an unknown key.")
        return key

    def _lookup(self, kid: Any) -> Any:
        if kid is None:
            return next(iter(self._keys.values())) if len(self._keys) == 1 else None
        return self._keys.get(kid) if isinstance(kid, str) else None

    async def _refresh(self) -> None:
        async with self._lock:
            now = time.monotonic()
            if now - self._attempted_at < self.refetch_min_s:
                return  # just fetched (maybe by a concurrent request): do not hammer the source
            self._attempted_at = now
            try:
                keys = _parse_jwks(orjson.loads(await self._fetch()))
            except (aiohttp.ClientError, OSError, TimeoutError, ValueError) as exc:
                log.warning("cannot load the JWKS from %s: %s", self.source, exc)
                return  # keep the keys we have, stale or not
            self.fetches += 1
            self._keys = keys
            self._fresh_until = now + self.ttl_s

    async def _fetch(self) -> bytes:
        if not self.source.startswith(("http://", "https://")):
            return await asyncio.to_thread(Path(self.source).read_bytes)
        timeout = aiohttp.ClientTimeout(total=JWKS_FETCH_TIMEOUT_S)
        async with (
            aiohttp.ClientSession(timeout=timeout) as client,
            client.get(self.source, allow_redirects=False) as resp,
        ):
            if resp.status != 200:
                raise ValueError(f"HTTP {resp.status}")
            body = bytearray()
            async for chunk in resp.content.iter_any():
                body += chunk
                if len(body) > JWKS_MAX_BYTES:
                    raise ValueError("the JWK set is larger than 1 MiB")
            return bytes(body)


def _names(value: Any) -> list[str]:
    """A claim given as a list of strings or as one space-separated string."""
    if isinstance(value, str):
        return value.split()
    if isinstance(value, list):
        return [v for v in value if isinstance(v, str)]
    return []


def _role(name: str) -> str | None:
    low = name.lower()
    for prefix in ("sessionpool.", "sessionpool/", "sessionpool:"):
        low = low.removeprefix(prefix)
    return low if low in ROLES else None


def principal_from_claims(claims: dict[str, Any]) -> Principal:
    """The principal a verified token describes.

    Raises:
        UnauthorizedError: the token names no subject or has a malformed `pools` claim.
    """
    subject = claims.get("sub") or claims.get("oid")
    if not isinstance(subject, str) or not subject:
        raise UnauthorizedError("The bearer token names no subject (sub or oid).")
    roles = {
        r
        for claim in ("roles", "scp", "scope")
        for n in _names(claims.get(claim))
        if (r := _role(n)) is not None
    }
    pools = None
    if "pools" in claims:
        raw = claims["pools"]
        names = raw.split() if isinstance(raw, str) else raw
        if not isinstance(names, list) or not all(isinstance(p, str) for p in names):
            raise UnauthorizedError("The bearer token's `pools` claim is malformed.")
        pools = frozenset(names)
    return Principal(f"jwt:{subject}", frozenset(roles), pools)


class JwtVerifier:
    """Checks signature, expiry, audience and issuer of bearer JWTs."""

    def __init__(self, settings: Settings) -> None:
        self.hs256_secret = settings.jwt_hs256_secret.encode()
        self.jwks = JwksCache(settings.jwt_jwks, settings.jwks_ttl_s) if settings.jwt_jwks else None
        self.issuer = settings.jwt_issuer or None
        self.audience = [a.strip() for a in settings.jwt_audience.split(",") if a.strip()]
        self.leeway_s = settings.jwt_leeway_s

    async def verify(self, token: str) -> Principal:
        """Raises: UnauthorizedError: the token is not valid."""
        try:
            header = jwt.get_unverified_header(token)
        except jwt.InvalidTokenError:
            raise UnauthorizedError("The bearer token is malformed.") from None
        alg = header.get("alg")
        key: Any
        if alg == "HS256" and self.hs256_secret:
            key = self.hs256_secret
        elif alg == "RS256" and self.jwks is not None:
            key = await self.jwks.key_for(header.get("kid"))
        else:
            raise UnauthorizedError(f"Tokens signed with {str(alg)[:16]!r} are not accepted.")
        try:
            claims = jwt.decode(
                token,
                key,
                algorithms=[alg],
                audience=self.audience,
                issuer=self.issuer,
                leeway=self.leeway_s,
                options={"require": ["exp"]},
            )
        except jwt.InvalidTokenError as exc:
            raise UnauthorizedError(f"The bearer token is not valid: {exc}") from None
        return principal_from_claims(claims)
