"""Session identifier validation (ACA's 2025-10-02 pattern: 4-128 characters)."""

from __future__ import annotations

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
