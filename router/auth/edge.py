"""The request edge: the one credential a request carries, turned into a `Principal`."""

from __future__ import annotations

import logging
import re
from pathlib import Path
from urllib.parse import urlsplit

from aiohttp import web

from router.addresses import is_loopback
from router.auth.keyfile import ApiKeys
from router.auth.principals import ROLES, Principal
from router.auth.tokens import JwtVerifier
from router.errors import UnauthorizedError
from router.settings import Settings

log = logging.getLogger("sessionpool.auth")

API_KEY_HEADER = "x-api-key"
TOKEN = re.compile(r"[\x21-\x7e]{1,8192}")  # visible ASCII: RFC 6750 b64token and any API key
ANONYMOUS = Principal("anonymous", ROLES)


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
        if jwks.startswith("http://") and not is_loopback(urlsplit(jwks).hostname or ""):
            # Whoever sits on the path could hand us their own signing keys.
            raise ValueError(
                f"jwt_jwks: {jwks!r} is plain http to another host: use https:// "
                "(http:// is accepted for a loopback address only)"
            )
        verifier = JwtVerifier(settings) if settings.jwt_hs256_secret or jwks else None
        if verifier is not None and not settings.jwt_issuer:
            log.warning(
                "jwt_issuer is not set: tokens of ANY issuer are accepted as long as they are "
                "signed with the configured key and name the audience; set jwt_issuer"
            )
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
