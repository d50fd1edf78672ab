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
    """An error answered with ACA's envelope `{"error": {"code", "message", "traceId"}}`."""

    status: ClassVar[int] = 500
    code: ClassVar[str] = "InternalServerError"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class BadRequestError(ApiError):
    """The request is malformed or a value is out of range."""

    status = 400
    code = "BadRequest"


class InvalidRequestBodyError(BadRequestError):
    """The body is not JSON, or not a JSON object."""

    code = "InvalidRequestBody"


class PropertiesMissingError(BadRequestError):
    """The execution body lacks `code` (or a shell command): ACA's `SessionPropertiesMissing`."""

    code = "SessionPropertiesMissing"


class InvalidFileNameError(BadRequestError):
    """A file name has disallowed characters or points outside the data directory."""

    code = "InvalidFileName"


class FileNotFoundApiError(ApiError):
    """No such file or directory in the data directory."""

    status = 404
    code = "FileNotFound"


class ExecutionNotFoundError(ApiError):
    """No execution with that id (never created, or dropped from the retained history)."""

    status = 404
    code = "ExecutionNotFound"


class ExecutionConflictError(ApiError):
    """The client-chosen `operation-id` is already used by another execution."""

    status = 409
    code = "ExecutionAlreadyExists"


class UploadTooLargeError(ApiError):
    """An uploaded file exceeds the upload cap."""

    status = 413
    code = "FileTooLarge"


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
