"""Session identifier validation (ACA's 2025-10-02 pattern: 4-128 characters)."""

from __future__ import annotations

import re

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
