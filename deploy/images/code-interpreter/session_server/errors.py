"""Errors the API reports to callers, each with its HTTP status and ACA error code.

ApiError (500 InternalServerError)
├── BadRequestError (400 BadRequest)
│   ├── InvalidRequestBodyError (400 InvalidRequestBody)
│   ├── PropertiesMissingError (400 SessionPropertiesMissing)
│   └── InvalidFileNameError (400 InvalidFileName)
├── FileNotFoundApiError (404 FileNotFound)
├── ExecutionNotFoundError (404 ExecutionNotFound)
├── ExecutionConflictError (409 ExecutionAlreadyExists)
└── UploadTooLargeError (413 FileTooLarge)
"""

from __future__ import annotations

import uuid
from typing import Any, ClassVar

from aiohttp import web


class ApiError(Exception):
    """An error answered with ACA's envelope `{"error": {"code", "message", "traceId"}}`.

    A subclass states its status and code as class arguments:
    `class X(ApiError, status=404, code="...")` (a code alone keeps the parent's status).
    """

    status: ClassVar[int] = 500
    code: ClassVar[str] = "InternalServerError"

    def __init_subclass__(cls, *, status: int | None = None, code: str, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls.status = status or cls.status
        cls.code = code

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class BadRequestError(ApiError, status=400, code="BadRequest"):
    """The request is malformed or a value is out of range."""


class InvalidRequestBodyError(BadRequestError, code="InvalidRequestBody"):
    """The body is not JSON, or not a JSON object."""


class PropertiesMissingError(BadRequestError, code="SessionPropertiesMissing"):
    """The execution body lacks `code` (or a shell command): ACA's `SessionPropertiesMissing`."""


class InvalidFileNameError(BadRequestError, code="InvalidFileName"):
    """A file name has disallowed characters or points outside the data directory."""


class FileNotFoundApiError(ApiError, status=404, code="FileNotFound"):
    """No such file or directory in the data directory."""


class ExecutionNotFoundError(ApiError, status=404, code="ExecutionNotFound"):
    """No execution with that id (never created, or dropped from the retained history)."""


class ExecutionConflictError(ApiError, status=409, code="ExecutionAlreadyExists"):
    """The client-chosen `operation-id` is already used by another execution."""


class UploadTooLargeError(ApiError, status=413, code="FileTooLarge"):
    """An uploaded file exceeds the upload cap."""


def error_response(
    status: int, code: str, message: str, headers: dict[str, str] | None = None
) -> web.Response:
    """Render ACA's error envelope with the `x-ms-error-code` header."""
    body: dict[str, Any] = {
        "error": {"code": code, "message": message, "traceId": uuid.uuid4().hex}
    }
    return web.json_response(
        body, status=status, headers={**(headers or {}), "x-ms-error-code": code}
    )
