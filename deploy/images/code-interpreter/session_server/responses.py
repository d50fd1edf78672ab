"""Response bodies of both API contracts, shaped as ACA and its clients expect them."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from .executions import Execution, Status
from .files import FileEntry
from .models import Kind, Outcome

# api-versions before this date speak the legacy contract.
FIRST_NEW_CONTRACT_VERSION = "2024-10-02"


def is_legacy_version(api_version: str | None) -> bool:
    """True for api-versions up to 2024-08-02-preview; a missing version means the new one."""
    if not api_version:
        return False
    return api_version[:10] < FIRST_NEW_CONTRACT_VERSION


def _result_value(outcome: Outcome, jupyter_format: bool) -> Any:
    if jupyter_format and not isinstance(outcome.result, dict):
        return outcome.result_text
    return outcome.result


def legacy_execution(execution: Execution) -> dict[str, Any]:
    """`{"$id", "properties": {status, stdout, stderr, result, executionResult, …}}`.

    Both `result` (Python pools) and `executionResult` (Node pools, the 2024-08 sample) are
    sent because clients read one or the other.
    """
    outcome = execution.outcome or Outcome()
    result = _result_value(outcome, execution.request.jupyter_format)
    return {
        "$id": "1",
        "properties": {
            "$id": "2",
            "status": "Failure" if outcome.failed else "Success",
            "stdout": outcome.stdout,
            "stderr": outcome.stderr,
            "result": result,
            "executionResult": result,
            "executionTimeInMilliseconds": outcome.duration_ms,
        },
    }


def new_execution(execution: Execution) -> dict[str, Any]:
    """`SessionCodeExecutionResource`; for shell commands `status` is the exit code."""
    request = execution.request
    body: dict[str, Any] = {
        "id": execution.id,
        "identifier": request.identifier,
        "sessionId": request.identifier,
        "executionType": "Asynchronous" if request.asynchronous else "Synchronous",
        "status": execution.status.value,
    }
    if execution.internal_error:
        body["error"] = {"code": "InternalServerError", "message": execution.internal_error}
        return body
    outcome = execution.outcome
    if outcome is None:  # queued or running: no result yet
        return body
    result: dict[str, Any] = {"stdout": outcome.stdout, "stderr": outcome.stderr}
    if request.kind is Kind.SHELL:
        body["status"] = str(outcome.exit_code)
        body["exitCode"] = outcome.exit_code
    else:
        result["executionResult"] = _result_value(outcome, request.jupyter_format)
    result["executionTimeInMilliseconds"] = outcome.duration_ms
    body["result"] = result
    if execution.status is Status.FAILED and outcome.error_name:
        body["error"] = _execution_error(outcome)
    return body


def _execution_error(outcome: Outcome) -> dict[str, str]:
    if outcome.timed_out:
        return {"code": "ExecutionTimeout", "message": outcome.error_message}
    if outcome.error_name in ("KernelDied", "CommandStartError"):
        return {"code": outcome.error_name, "message": outcome.error_message}
    message = f"{outcome.error_name}: {outcome.error_message}".rstrip(": ")
    return {"code": "ExecutionError", "message": message}


def legacy_files(entries: Iterable[FileEntry]) -> dict[str, Any]:
    """`{"$id": "1", "value": [{"$id", "properties": {filename, size, lastModifiedTime}}]}`.

    `filename` is relative to the data directory, so it can be passed back to
    `files/content/{filename}` as is.
    """
    next_id = 2
    value = []
    for entry in entries:
        filename = f"{entry.directory}/{entry.name}" if entry.directory else entry.name
        value.append(
            {
                "$id": str(next_id),
                "properties": {
                    "$id": str(next_id + 1),
                    "filename": filename,
                    "size": entry.size,
                    "lastModifiedTime": entry.modified_rfc3339,
                },
            }
        )
        next_id += 2
    return {"$id": "1", "value": value}


def new_file(entry: FileEntry) -> dict[str, Any]:
    """`SessionResourceFile`."""
    return {
        "name": entry.name,
        "directory": entry.directory,
        "type": "Directory" if entry.is_dir else "File",
        "contentType": entry.content_type,
        "sizeInBytes": entry.size,
        "lastModifiedAt": entry.modified_rfc3339,
    }


def new_files(entries: Iterable[FileEntry]) -> dict[str, Any]:
    """`{"value": [SessionResourceFile…], "nextLink": null}` (one page holds everything)."""
    return {"value": [new_file(e) for e in entries], "nextLink": None}
