"""Credentials and principals: API keys (stored hashed) and JWT bearer tokens (HS256, RS256).

A caller sends one credential, `Authorization: Bearer <api key or JWT>` or, for API keys
only, `x-api-key: <key>`. API keys live in `api_keys_file` as SHA-256 hashes only:

    - name: ci                      # the principal is `key:ci`
      key_sha256: 9f86d081...       # sessionpool hash-key < key.txt
      roles: [executor]             # executor: data plane + session management; admin: /admin
      pools: [demo]                 # optional; absent = every pool

`sessionpool new-key ci --role executor` makes a key and prints its entry. The
file is re-read when it changes. JWTs are verified with `jwt_hs256_secret` (HS256) or the
keys of `jwt_jwks` (RS256, a file or an http(s) URL, cached `jwks_ttl_s` and fetched again
when a token names an unknown `kid`), against `jwt_audience` and, if set, `jwt_issuer`.
Their roles come from `roles` (a list) and `scp`/`scope` (space-separated), matched without
case and with an optional `sessionpool.` prefix (`SessionPool.Executor`); `pools` (a list or
a space-separated string) scopes them. The principal is `jwt:<sub>` (or `jwt:<oid>`).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import os
import re
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import orjson
import yaml
from aiohttp import web

from router.errors import ForbiddenError, UnauthorizedError
from router.pools import POOL_NAME
from router.settings import Settings

log = logging.getLogger("sessionpool.auth")

EXECUTOR = "executor"
ADMIN = "admin"
ROLES = frozenset({EXECUTOR, ADMIN})
CHALLENGE = 'Bearer realm="sessionpool"'
API_KEY_HEADER = "x-api-key"
TOKEN = re.compile(r"[\x21-\x7e]{1,8192}")  # visible ASCII: RFC 6750 b64token and any API key
KEY_NAME = re.compile(r"[A-Za-z0-9_.@-]{1,128}")
KEYS_RECHECK_S = 5.0  # how often the API keys file's mtime is looked at
JWKS_REFETCH_MIN_S = 5.0  # unknown `kid`s cannot make us fetch the key set more often
JWKS_FETCH_TIMEOUT_S = 5.0
JWKS_MAX_BYTES = 1 << 20


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling. `id` owns tenant-bound sessions; `pools` None means every pool."""

    id: str
    roles: frozenset[str]
    pools: frozenset[str] | None = None

    def require(self, role: str, pool: str | None = None) -> None:
        """Check that the principal has `role`, and `pool` in its scope when one is given.

        Raises:
            ForbiddenError: the role is missing or the pool is out of scope.
        """
        if role not in self.roles:
            raise ForbiddenError(f"The credential lacks the '{role}' role.")
        if pool is not None and not self.may_use(pool):
            raise ForbiddenError(f"The credential is not valid for session pool '{pool}'.")

    def may_use(self, pool: str) -> bool:
        return self.pools is None or pool in self.pools


ANONYMOUS = Principal("anonymous", ROLES)


def hash_key(key: str) -> str:
    """The `key_sha256` to store for an API key."""
    return hashlib.sha256(key.encode()).hexdigest()


def new_key() -> str:
    """A fresh random API key (256 bits; never contains dots, so it never looks like a JWT)."""
    return "sp_" + secrets.token_urlsafe(32)


# API keys ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ApiKey:
    digest: bytes
    principal: Principal


def load_api_keys(path: str) -> tuple[ApiKey, ...]:
    """Parse an API keys file (YAML or JSON: a list, or `{keys: [...]}`).

    Raises:
        ValueError: the file cannot be read, or an entry is invalid (the message names it).
    """
    try:
        doc = yaml.safe_load(Path(path).read_bytes())
    except (OSError, yaml.YAMLError) as exc:
        raise ValueError(f"api_keys_file: cannot read {path}: {exc}") from None
    items = doc.get("keys") if isinstance(doc, dict) else doc
    if doc is None:
        items = []
    if not isinstance(items, list):
        raise ValueError(f"api_keys_file {path}: must be a list of keys (or {{keys: [...]}})")
    out: list[ApiKey] = []
    names: set[str] = set()
    digests: set[bytes] = set()
    for i, e in enumerate(items):
        at = f"api_keys_file {path}: keys[{i}]"
        if not isinstance(e, dict):
            raise ValueError(f"{at}: must be a mapping")
        name = e.get("name")
        if not isinstance(name, str) or not KEY_NAME.fullmatch(name):
            raise ValueError(f"{at}.name: required, 1-128 of [A-Za-z0-9_.@-]")
        digest_hex = e.get("key_sha256")
        if not isinstance(digest_hex, str) or not re.fullmatch(r"[0-9a-fA-F]{64}", digest_hex):
            raise ValueError(f"{at}.key_sha256: required, 64 hex digits (the key's SHA-256)")
        roles = e.get("roles")
        if (
            not isinstance(roles, list)
            or not roles
            or not all(isinstance(r, str) and r in ROLES for r in roles)
        ):
            raise ValueError(f"{at}.roles: a non-empty list of {sorted(ROLES)}")
        pools = e.get("pools")
        if pools is not None and (
            not isinstance(pools, list)
            or not all(isinstance(p, str) and POOL_NAME.match(p) for p in pools)
        ):
            raise ValueError(f"{at}.pools: a list of pool names")
        digest = bytes.fromhex(digest_hex)
        if name in names:
            raise ValueError(f"{at}.name: {name!r} appears twice")
        if digest in digests:
            raise ValueError(f"{at}.key_sha256: the same key appears twice")
        names.add(name)
        digests.add(digest)
        scope = None if pools is None else frozenset(pools)
        out.append(ApiKey(digest, Principal(f"key:{name}", frozenset(roles), scope)))
    return tuple(out)


class ApiKeys:
    """The keys of `api_keys_file`, re-read when the file changes (checked every few s)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._stamp = self._file_stamp()
        self._keys = load_api_keys(path)
        self._checked = time.monotonic()

    def _file_stamp(self) -> tuple[int, int, int]:
        st = os.stat(self.path)
        return st.st_mtime_ns, st.st_size, st.st_ino

    def _maybe_reload(self) -> None:
        now = time.monotonic()
        if now - self._checked < KEYS_RECHECK_S:
            return
        self._checked = now
        try:
            stamp = self._file_stamp()
            if stamp == self._stamp:
                return
            self._keys = load_api_keys(self.path)
            self._stamp = stamp
            log.info("api keys reloaded from %s: %d keys", self.path, len(self._keys))
        except (OSError, ValueError) as exc:
            log.warning("keeping the previous api keys: %s", exc)

    def match(self, token: str) -> Principal | None:
        """The principal whose key is `token`, comparing hashes in constant time."""
        self._maybe_reload()
        digest = hashlib.sha256(token.encode("ascii")).digest()
        found = None
        for key in self._keys:  # no early exit: time does not depend on which key matched
            if hmac.compare_digest(key.digest, digest):
                found = key.principal
        return found


# JWT ---------------------------------------------------------------------------------------


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


# The request edge --------------------------------------------------------------------------


class Authenticator:
    """Turns a request's credential into a `Principal` (anonymous, every role, if auth=none)."""

    def __init__(
        self, required: bool, keys: ApiKeys | None = None, jwt_verifier: JwtVerifier | None = None
    ) -> None:
        self.required = required
        self.keys = keys
        self.jwt = jwt_verifier

    @classmethod
    def from_settings(cls, settings: Settings) -> Authenticator:
        """Raises: ValueError: a credential source is unusable (the message says which)."""
        settings.check_router_auth()
        if settings.auth != "required":
            log.warning("auth=none: every caller is anonymous with every role")
            return cls(required=False)
        keys = ApiKeys(settings.api_keys_file) if settings.api_keys_file else None
        jwks = settings.jwt_jwks
        if jwks and not jwks.startswith(("http://", "https://")) and not Path(jwks).is_file():
            raise ValueError(f"jwt_jwks: {jwks!r} is neither an http(s) URL nor a file")
        verifier = JwtVerifier(settings) if settings.jwt_hs256_secret or jwks else None
        return cls(required=True, keys=keys, jwt_verifier=verifier)

    async def authenticate(self, request: web.Request) -> Principal:
        """Raises: UnauthorizedError: no credential, or not a valid one."""
        if not self.required:
            return ANONYMOUS
        token, api_key_only = _credential(request)
        principal = self.keys.match(token) if self.keys is not None else None
        if principal is not None:
            return principal
        if self.jwt is not None and not api_key_only and token.count(".") == 2:
            return await self.jwt.verify(token)
        raise UnauthorizedError("The credential is not valid.")

    async def authorize(
        self, request: web.Request, role: str, pool: str | None = None
    ) -> Principal:
        """Authenticate, then require `role` (and `pool` in scope).

        Raises:
            UnauthorizedError: no credential, or not a valid one.
            ForbiddenError: the role is missing or the pool is out of scope.
        """
        principal = await self.authenticate(request)
        principal.require(role, pool)
        return principal


AUTH = web.AppKey("authenticator", Authenticator)


def _credential(request: web.Request) -> tuple[str, bool]:
    """The one credential a request carries, and whether it came as `x-api-key`."""
    bearer = request.headers.getall("Authorization", [])
    api_key = request.headers.getall(API_KEY_HEADER, [])
    if not bearer and not api_key:
        raise UnauthorizedError(
            "No credential: send Authorization: Bearer <token> (or x-api-key: <key>)."
        )
    if len(bearer) + len(api_key) > 1:
        raise UnauthorizedError("Send exactly one credential.")
    if bearer:
        scheme, _, token = bearer[0].strip().partition(" ")
        if scheme.lower() != "bearer":
            raise UnauthorizedError("The Authorization header must use the Bearer scheme.")
    else:
        token = api_key[0]
    token = token.strip()
    if not TOKEN.fullmatch(token):
        raise UnauthorizedError("The credential is malformed.")
    return token, not bearer
