"""Credentials and principals: API keys (stored hashed) and JWT bearer tokens (HS256, RS256).

A caller sends one credential, `Authorization: Bearer <api key or JWT>` or, for API keys
only, `x-api-key: <key>`. API keys live in `api_keys_file` as SHA-256 hashes only:

    - name: ci                      # the principal is `key:ci`
      key_sha256: 9f86d081...       # sessionpool hash-key < key.txt
      roles: [executor]             # executor: data plane + session management; admin: /admin
      pools: [demo]                 # required: a list, or ["*"] for every pool

`sessionpool new-key ci --role executor` makes a key and prints its entry. The
file is re-read when it changes. JWTs are verified with `jwt_hs256_secret` (HS256) or the
keys of `jwt_jwks` (RS256, a file or an http(s) URL, cached `jwks_ttl_s` and fetched again
when a token names an unknown `kid`), against `jwt_audience` and, if set, `jwt_issuer`.
Their roles come from `roles` (a list) and `scp`/`scope` (space-separated), matched without
case and with an optional `sessionpool.` prefix (`SessionPool.Executor`); `pools` (a list or
a space-separated string) scopes them. The principal is `jwt:<sub>` (or `jwt:<oid>`).
"""

from router.auth.edge import ANONYMOUS, AUTH, Authenticator
from router.auth.keyfile import KEY_NAME, ApiKeys, hash_key, load_api_keys, new_key
from router.auth.principals import ADMIN, EXECUTOR, ROLES, Principal
from router.auth.tokens import JwksCache, JwtVerifier, principal_from_claims

__all__ = [
    "ADMIN",
    "ANONYMOUS",
    "AUTH",
    "EXECUTOR",
    "KEY_NAME",
    "ROLES",
    "ApiKeys",
    "Authenticator",
    "JwksCache",
    "JwtVerifier",
    "Principal",
    "hash_key",
    "load_api_keys",
    "new_key",
    "principal_from_claims",
]
