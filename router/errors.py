"""The error tree; each leaf knows its HTTP status and its ACA error code.

SessionPoolError
├── BadRequestError                  400
│   ├── MissingIdentifierError       400 MissingIdentifier
│   ├── InvalidIdentifierError       400 InvalidIdentifier
│   └── InvalidPoolError             400 InvalidPoolDefinition
├── UnauthorizedError                401 Unauthorized (WWW-Authenticate)
├── ForbiddenError                   403 Forbidden
├── PoolNotFoundError                404 PoolNotFound
├── SessionNotFoundError             404 SessionNotFound
├── RequestTooLargeError             413 RequestTooLarge
├── UnsupportedMediaTypeError        415 UnsupportedMediaType
├── SessionLimitError                429 SessionLimitReached (Retry-After)
├── SessionUnreachableError          502 SessionUnreachable
├── NoReadySessionError              503 NoReadySession
├── StoreUnavailableError            503 StoreUnavailable (Retry-After)
├── SessionTimeoutError              504 SessionTimeout
└── SandboxRuntimeError              500 (workers: a runtime could not create or inspect)

Each leaf knows its status, code and response headers; the router turns any of them into the
ACA error envelope in one place (`router.app.errors_middleware`).
"""

from __future__ import annotations

from typing import Any

CHALLENGE = 'Bearer realm="sessionpool"'  # what a 401 asks for


class SessionPoolError(Exception):
    """Root of every error sessionpool raises on purpose.

    A leaf states its HTTP status, ACA error code and, when a retry makes sense, how many
    seconds to wait, as class arguments: `class X(SessionPoolError, status=..., code=...)`.
    """

    status: int = 500
    code: str = "InternalError"
    retry_after_s: int | None = None

    def __init_subclass__(
        cls,
        *,
        status: int | None = None,
        code: str | None = None,
        retry_after_s: int | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init_subclass__(**kwargs)
        cls.status = status or cls.status
        cls.code = code or cls.code
        cls.retry_after_s = retry_after_s or cls.retry_after_s

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    @property
    def headers(self) -> dict[str, str]:
        """Response headers this error adds to the envelope (`Retry-After`, ...)."""
        if self.retry_after_s is None:
            return {}
        return {"Retry-After": str(self.retry_after_s)}


class BadRequestError(SessionPoolError, status=400, code="BadRequest"): ...


class MissingIdentifierError(BadRequestError, code="MissingIdentifier"): ...


class InvalidIdentifierError(BadRequestError, code="InvalidIdentifier"): ...


class InvalidPoolError(BadRequestError, code="InvalidPoolDefinition"):
    """A pool definition failed validation; the message names the field."""


class UnauthorizedError(SessionPoolError, status=401, code="Unauthorized"):
    @property
    def headers(self) -> dict[str, str]:
        return {"WWW-Authenticate": CHALLENGE}


class ForbiddenError(SessionPoolError, status=403, code="Forbidden"): ...


class PoolNotFoundError(SessionPoolError, status=404, code="PoolNotFound"):
    def __init__(self, pool: str) -> None:
        super().__init__(f"Session pool '{pool}' was not found.")
        self.pool = pool


class SessionNotFoundError(SessionPoolError, status=404, code="SessionNotFound"): ...


class RequestTooLargeError(SessionPoolError, status=413, code="RequestTooLarge"):
    def __init__(self, limit_bytes: int) -> None:
        super().__init__(f"The request body is larger than {limit_bytes} bytes.")
        self.limit_bytes = limit_bytes


class UnsupportedMediaTypeError(SessionPoolError, status=415, code="UnsupportedMediaType"): ...


class SessionLimitError(SessionPoolError, status=429, code="SessionLimitReached", retry_after_s=1):
    """maxConcurrentSessions sessions are allocated already."""


class SessionUnreachableError(SessionPoolError, status=502, code="SessionUnreachable"): ...


class NoReadySessionError(SessionPoolError, status=503, code="NoReadySession", retry_after_s=1):
    """No sandbox became ready within allocation_wait_s."""


class StoreUnavailableError(SessionPoolError, status=503, code="StoreUnavailable", retry_after_s=1):
    """Redis is unreachable (raised by the store at its boundary)."""


class SessionTimeoutError(SessionPoolError, status=504, code="SessionTimeout"): ...


class SandboxRuntimeError(SessionPoolError):
    """A runtime could not create, inspect or destroy a sandbox; the message says why."""
