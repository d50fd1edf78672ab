"""The error tree; each leaf knows its HTTP status and its ACA error code.

SessionPoolError
├── BadRequestError                  400
│   ├── MissingIdentifierError       400 MissingIdentifier
│   ├── InvalidIdentifierError       400 InvalidIdentifier
│   └── InvalidPoolError             400 InvalidPoolDefinition
├── UnauthorizedError                401 Unauthorized
├── ForbiddenError                   403 Forbidden
├── PoolNotFoundError                404 PoolNotFound
├── SessionNotFoundError             404 SessionNotFound
├── RequestTooLargeError             413 RequestTooLarge
├── UnsupportedMediaTypeError        415 UnsupportedMediaType
├── SessionLimitError                429 SessionLimitReached (Retry-After)
├── SessionUnreachableError          502 SessionUnreachable
├── NoReadySessionError              503 NoReadySession
├── StoreUnavailableError            503 StoreUnavailable
└── SessionTimeoutError              504 SessionTimeout
"""

from __future__ import annotations


class SessionPoolError(Exception):
    """Root of every error sessionpool raises on purpose."""

    status: int = 500
    code: str = "InternalError"
    retry_after_s: int | None = None

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class BadRequestError(SessionPoolError):
    status = 400
    code = "BadRequest"


class MissingIdentifierError(BadRequestError):
    code = "MissingIdentifier"


class InvalidIdentifierError(BadRequestError):
    code = "InvalidIdentifier"


class InvalidPoolError(BadRequestError):
    """A pool definition failed validation; the message names the field."""

    code = "InvalidPoolDefinition"


class UnauthorizedError(SessionPoolError):
    status = 401
    code = "Unauthorized"


class ForbiddenError(SessionPoolError):
    status = 403
    code = "Forbidden"


class PoolNotFoundError(SessionPoolError):
    status = 404
    code = "PoolNotFound"


class SessionNotFoundError(SessionPoolError):
    status = 404
    code = "SessionNotFound"


class RequestTooLargeError(SessionPoolError):
    status = 413
    code = "RequestTooLarge"


class UnsupportedMediaTypeError(SessionPoolError):
    status = 415
    code = "UnsupportedMediaType"


class SessionLimitError(SessionPoolError):
    status = 429
    code = "SessionLimitReached"
    retry_after_s = 1


class SessionUnreachableError(SessionPoolError):
    status = 502
    code = "SessionUnreachable"


class NoReadySessionError(SessionPoolError):
    status = 503
    code = "NoReadySession"
    retry_after_s = 1


class StoreUnavailableError(SessionPoolError):
    status = 503
    code = "StoreUnavailable"
    retry_after_s = 1


class SessionTimeoutError(SessionPoolError):
    status = 504
    code = "SessionTimeout"
