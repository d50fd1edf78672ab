"""Session identifier validation (ACA's 2025-10-02 pattern: 4-128 characters)."""

from __future__ import annotations

import hashlib
import re

from multidict import MultiMapping

from router.errors import InvalidIdentifierError, MissingIdentifierError

IDENTIFIER = re.compile(r"[A-Za-z0-9_|}{\[\]:\";'<>?/.,@#$%^&*()\-+=!~`]{4,128}")


def check_identifier(value: str | None) -> str:
    """Return the (already URL-decoded) identifier, or raise.

    Raises:
        MissingIdentifierError: absent or empty.
        InvalidIdentifierError: wrong length or a character outside the allowed set.
    """
    if not value:
        raise MissingIdentifierError("The query parameter 'identifier' is required.")
    if not IDENTIFIER.fullmatch(value):
        raise InvalidIdentifierError(
            "The identifier must be 4-128 characters of A-Za-z0-9 and "
            "_|}{[]:\";'<>?/.,@#$%^&*()-+=!~`."
        )
    return value


def query_identifier(query: MultiMapping[str]) -> str:
    """The one `identifier` of a query string, checked.

    Raises:
        MissingIdentifierError: absent or empty.
        InvalidIdentifierError: malformed, or given more than once (the router and the session
            could each read a different one and disagree on whose session this is).
    """
    values = query.getall("identifier", [])
    if len(values) > 1:
        raise InvalidIdentifierError("The query parameter 'identifier' must be given only once.")
    return check_identifier(values[0] if values else None)


def session_key(identifier: str, owner: str | None) -> str:
    """The name a session is stored under: the identifier itself, or, on a tenant-bound pool
    (`owner` given), the identifier scoped to its owner.

    Two principals sending the same identifier to a tenant-bound pool get two sessions, and
    neither can reach, extend, stop or detect the other's. The scope is a fixed-length digest
    of the principal and a space, a character identifiers cannot contain, so no identifier
    sent to a pool without binding can ever name a bound session.
    """
    if owner is None:
        return identifier
    digest = hashlib.sha256(owner.encode("utf-8", "surrogatepass")).hexdigest()[:32]
    return f"{digest} {identifier}"


def shown_identifier(key: str) -> str:
    """The identifier a caller sent, from the name its session is stored under."""
    return key.partition(" ")[2] or key
