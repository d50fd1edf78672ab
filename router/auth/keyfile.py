"""API keys: the `api_keys_file` (SHA-256 hashes only), parsed, checked and re-read on change."""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import re
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from router.auth.principals import ROLES, Principal
from router.pools import POOL_NAME

log = logging.getLogger("sessionpool.auth")

KEY_NAME = re.compile(r"[A-Za-z0-9_.@-]{1,128}")
ALL_POOLS = "*"  # `pools: ["*"]`: a key for every pool, said explicitly
KEYS_RECHECK_S = 5.0  # how often the API keys file's mtime is looked at


def hash_key(key: str) -> str:
    """The `key_sha256` to store for an API key."""
    return hashlib.sha256(key.encode()).hexdigest()


def new_key() -> str:
    """A fresh random API key (256 bits; never contains dots, so it never looks like a JWT)."""
    return "sp_" + secrets.token_urlsafe(32)


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
        if "pools" not in e:
            # An entry that names no pools once meant every pool: a truncated or hand-edited
            # entry must not silently become an unscoped key.
            raise ValueError(f'{at}.pools: required: the pools this key may use, or ["*"]')
        pools = e["pools"]
        if pools != [ALL_POOLS] and (
            not isinstance(pools, list)
            or not pools
            or not all(isinstance(p, str) and POOL_NAME.match(p) for p in pools)
        ):
            raise ValueError(f'{at}.pools: a non-empty list of pool names, or ["*"] for all')
        digest = bytes.fromhex(digest_hex)
        if name in names:
            raise ValueError(f"{at}.name: {name!r} appears twice")
        if digest in digests:
            raise ValueError(f"{at}.key_sha256: the same key appears twice")
        names.add(name)
        digests.add(digest)
        scope = None if pools == [ALL_POOLS] else frozenset(pools)
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
