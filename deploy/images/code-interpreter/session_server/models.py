"""Execution requests as parsed from either API contract, and their outcomes."""

from __future__ import annotations

import base64
import binascii
import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .errors import BadRequestError, InvalidRequestBodyError, PropertiesMissingError
from .settings import Settings


class Kind(enum.Enum):
    """What an execution runs: Python code in the kernel, or a process."""

    PYTHON = "python"
    SHELL = "shell"


@dataclass(frozen=True)
class ExecutionRequest:
    """One execution, validated; enum values already normalised."""

    kind: Kind
    timeout_s: int
    max_output: int
    asynchronous: bool = False
    code: str = ""
    # For Kind.SHELL: the argv to run (`shellCommand` becomes `["/bin/bash", "-c", cmd]`).
    argv: tuple[str, ...] = ()
    stdin: str | None = None
    jupyter_format: bool = False
    identifier: str = ""


@dataclass(frozen=True)
class Outcome:
    """What an execution produced.

    `result` is the JSON value of the last expression ("" when there is none) or an image
    object; `result_text` is its `text/plain` repr (None when there is none).
    """

    stdout: str = ""
    stderr: str = ""
    result: Any = ""
    result_text: str | None = None
    error_name: str = ""
    error_message: str = ""
    timed_out: bool = False
    kernel_restarted: bool = False
    exit_code: int | None = None
    duration_ms: int = 0

    @property
    def failed(self) -> bool:
        """True when the code raised, timed out, or the command exited non-zero."""
        if self.exit_code is not None:
            return self.exit_code != 0 or self.timed_out
        return bool(self.error_name) or self.timed_out


@dataclass
class BoundedText:
    """Accumulates text up to `limit` characters and drops the rest, so that a runaway
    `print` loop costs no memory."""

    limit: int
    _parts: list[str] = field(default_factory=list)
    _length: int = 0
    truncated: bool = False

    def append(self, text: str) -> None:
        room = self.limit - self._length
        if len(text) > room:
            self.truncated = True
            text = text[: max(room, 0)]
        if text:
            self._parts.append(text)
            self._length += len(text)

    def __str__(self) -> str:
        return "".join(self._parts)


_INPUT_TYPES = {"inline", "inlinetext", "inlinebase64"}
_EXECUTION_TYPES = {"synchronous", "asynchronous"}


def parse_execution_request(
    body: Any, settings: Settings, identifier: str = ""
) -> ExecutionRequest:
    """Validate an execution body of either contract.

    Accepts the legacy `{"properties": {...}}` wrapper and the flat body alike, with keys
    and enum values compared case-insensitively, because clients disagree on both.

    Raises:
        InvalidRequestBodyError: the body is not a JSON object.
        PropertiesMissingError: neither `code` nor a shell command is present.
        BadRequestError: a field has the wrong type or is out of range.
    """
    if not isinstance(body, Mapping):
        raise InvalidRequestBodyError("The request body must be a JSON object.")
    fields = _flatten(body)
    timeout_s = _int_field(
        fields,
        "timeoutinseconds",
        "timeoutInSeconds",
        settings.default_timeout_s,
        1,
        settings.max_timeout_s,
    )
    max_output = _int_field(
        fields,
        "outputstreamsmaxlength",
        "outputStreamsMaxLength",
        settings.default_output_length,
        1,
        settings.max_output_length,
    )
    execution_type = _enum_field(fields, "executiontype", "executionType", _EXECUTION_TYPES)
    jupyter_format = _bool_field(
        fields, "returnjupyterformatexecutionresult", "returnJupyterFormatExecutionResult"
    )
    _bool_field(fields, "useemptykernel", "useEmptyKernel")  # accepted; one kernel serves all
    body_identifier = fields.get("identifier")
    common: dict[str, Any] = {
        "timeout_s": timeout_s,
        "max_output": max_output,
        "asynchronous": execution_type == "asynchronous",
        "jupyter_format": jupyter_format,
        "identifier": identifier or (body_identifier if isinstance(body_identifier, str) else ""),
    }
    shell = fields.get("shellcommand")
    exec_args = fields.get("execcommandandargs")
    code = fields.get("code")
    if code is not None and settings.mode == "shell":
        raise BadRequestError(
            "'code': this is a Shell session, which runs no Python code; send 'shellCommand' "
            "or 'execCommandAndArgs' instead."
        )
    if shell is not None or exec_args is not None:
        if code is not None:
            raise BadRequestError("Give either 'code' or a shell command, not both.")
        return ExecutionRequest(
            kind=Kind.SHELL, argv=_shell_argv(shell, exec_args), stdin=_stdin(fields), **common
        )
    if code is None and settings.mode == "shell":
        raise PropertiesMissingError(
            "The execution request must contain 'shellCommand' or 'execCommandAndArgs', "
            "either flat or inside 'properties'."
        )
    if code is None:
        raise PropertiesMissingError(
            "The execution request must contain 'code' (or 'shellCommand' / "
            "'execCommandAndArgs'), either flat or inside 'properties'."
        )
    if not isinstance(code, str):
        raise BadRequestError("'code' must be a string.")
    input_type = _enum_field(fields, "codeinputtype", "codeInputType", _INPUT_TYPES)
    if input_type == "inlinebase64":
        try:
            code = base64.b64decode(code, validate=True).decode()
        except (binascii.Error, UnicodeDecodeError) as exc:
            raise BadRequestError(f"'code' is not valid base64-encoded UTF-8: {exc}") from exc
    return ExecutionRequest(kind=Kind.PYTHON, code=code, **common)


def _flatten(body: Mapping[str, Any]) -> dict[str, Any]:
    """Merge a `properties` wrapper over the top-level fields; lower-case every key."""
    fields = {str(k).lower(): v for k, v in body.items() if str(k).lower() != "properties"}
    properties = body.get("properties")
    if properties is not None:
        if not isinstance(properties, Mapping):
            raise InvalidRequestBodyError("'properties' must be a JSON object.")
        fields.update({str(k).lower(): v for k, v in properties.items()})
    return fields


def _int_field(
    fields: Mapping[str, Any], key: str, name: str, default: int, low: int, high: int
) -> int:
    value = fields.get(key)
    if value is None:
        return default
    # bool is an int subclass; `true` is not a timeout.
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise BadRequestError(f"'{name}' must be an integer between {low} and {high}.")
    return value


def _bool_field(fields: Mapping[str, Any], key: str, name: str) -> bool:
    value = fields.get(key, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise BadRequestError(f"'{name}' must be true or false.")
    return value


def _enum_field(fields: Mapping[str, Any], key: str, name: str, allowed: set[str]) -> str | None:
    value = fields.get(key)
    if value is None:
        return None
    if not isinstance(value, str) or value.lower() not in allowed:
        raise BadRequestError(f"'{name}' must be one of {sorted(allowed)} (any case).")
    return value.lower()


def _shell_argv(shell: Any, exec_args: Any) -> tuple[str, ...]:
    if shell is not None and exec_args is not None:
        raise BadRequestError("'shellCommand' and 'execCommandAndArgs' are mutually exclusive.")
    if shell is not None:
        if not isinstance(shell, str) or not shell.strip():
            raise BadRequestError("'shellCommand' must be a non-empty string.")
        return ("/bin/bash", "-c", shell)
    if (
        not isinstance(exec_args, list)
        or not exec_args
        or not all(isinstance(a, str) for a in exec_args)
        or not exec_args[0]
    ):
        raise BadRequestError("'execCommandAndArgs' must be a non-empty list of strings.")
    return tuple(exec_args)


def _stdin(fields: Mapping[str, Any]) -> str | None:
    value = fields.get("stdin")
    if value is not None and not isinstance(value, str):
        raise BadRequestError("'stdin' must be a string.")
    return value
