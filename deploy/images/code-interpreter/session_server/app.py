"""The aiohttp application: ACA's code interpreter API, legacy and new contracts."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from aiohttp import BodyPartReader, hdrs, web
from yarl import URL

from .errors import (
    ApiError,
    BadRequestError,
    InvalidRequestBodyError,
    PropertiesMissingError,
    UploadTooLargeError,
    error_response,
)
from .executions import Execution, Executor
from .files import FileEntry, FileStore, multipart_filename
from .models import parse_execution_request
from .responses import (
    is_legacy_version,
    legacy_execution,
    legacy_files,
    new_execution,
    new_file,
    new_files,
)
from .settings import Settings

if TYPE_CHECKING:
    from .kernel import Kernel

log = logging.getLogger(__name__)

# Multipart framing around an upload; a body larger than the cap plus this cannot fit.
_MULTIPART_OVERHEAD_BYTES = 64 * 1024

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass(frozen=True)
class State:
    """What the handlers share; one per application."""

    settings: Settings
    kernel: Kernel | None  # None in a Shell session
    executor: Executor
    files: FileStore


# aiohttp 3.8 (Debian bookworm) predates web.AppKey.
_STATE = "code_interpreter_state"


def _state(request: web.Request) -> State:
    state: State = request.app[_STATE]
    return state


def _legacy(request: web.Request) -> bool:
    return is_legacy_version(request.query.get("api-version"))


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Answer every error with ACA's envelope, including aiohttp's own 404/405/413."""
    try:
        return await handler(request)
    except ApiError as exc:
        return error_response(exc.status, exc.code, exc.message)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        code = {404: "NotFound", 405: "MethodNotAllowed", 413: "RequestEntityTooLarge"}
        headers = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else None
        return error_response(
            exc.status, code.get(exc.status, "BadRequest"), exc.reason or "", headers
        )


async def health(request: web.Request) -> web.Response:
    """Liveness/readiness: the port only opens once the kernel is ready."""
    return web.json_response("healthy")


# --- executions ----------------------------------------------------------------------------


async def _read_json(request: web.Request) -> Any:
    raw = await request.read()  # bounded by client_max_size
    if not raw.strip():
        raise PropertiesMissingError("The request body is empty.")
    try:
        return json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidRequestBodyError(f"The request body is not valid JSON: {exc}") from exc


async def _submit(request: web.Request) -> Execution:
    state = _state(request)
    body = await _read_json(request)
    parsed = parse_execution_request(
        body, state.settings, identifier=request.query.get("identifier", "")
    )
    return state.executor.submit(parsed, request.headers.get("operation-id"))


def _execution_headers(request: web.Request, execution: Execution) -> dict[str, str]:
    headers = {
        "operation-id": execution.id,
        "x-ms-session-guid": _state(request).settings.session_guid,
    }
    if execution.outcome is not None:
        duration = str(execution.outcome.duration_ms)
        headers["x-ms-container-execution-duration"] = duration
        headers["x-ms-execution-request-time"] = duration
    return headers


def _raise_internal(execution: Execution) -> None:
    if execution.internal_error:
        raise ApiError(f"The server failed to run the execution: {execution.internal_error}")


async def legacy_execute(request: web.Request) -> web.Response:
    """`POST code/execute` (and `/execute`, `python/execute`): always synchronous."""
    execution = await _state(request).executor.wait(await _submit(request))
    _raise_internal(execution)
    return web.json_response(
        legacy_execution(execution), headers=_execution_headers(request, execution)
    )


def _operation_location(request: web.Request, execution_id: str) -> str:
    # Behind a router that strips a path prefix, it may tell us the prefix to put back.
    prefix = request.headers.get("X-Forwarded-Prefix", "").rstrip("/")
    query = {k: request.query[k] for k in ("api-version", "identifier") if k in request.query}
    return str(URL.build(path=f"{prefix}/executions/{execution_id}", query=query))


async def create_execution(request: web.Request) -> web.Response:
    """`POST /executions`: synchronous (200) or asynchronous (202 + Operation-Location)."""
    executor = _state(request).executor
    execution = await _submit(request)
    headers = {"Operation-Location": _operation_location(request, execution.id)}
    if execution.request.asynchronous:
        headers.update(_execution_headers(request, execution))
        return web.json_response(new_execution(execution), status=202, headers=headers)
    await executor.wait(execution)
    _raise_internal(execution)
    headers.update(_execution_headers(request, execution))
    return web.json_response(new_execution(execution), headers=headers)


async def get_execution(request: web.Request) -> web.Response:
    """`GET /executions/{id}`."""
    execution = _state(request).executor.get(request.match_info["execution_id"])
    return web.json_response(
        new_execution(execution), headers=_execution_headers(request, execution)
    )


# --- files ---------------------------------------------------------------------------------


async def _upload(request: web.Request) -> list[FileEntry]:
    state = _state(request)
    if not request.content_type.startswith("multipart/"):
        raise BadRequestError("Upload with Content-Type multipart/form-data, part name 'file'.")
    length = request.content_length
    if length is not None and length > state.files.max_upload_bytes + _MULTIPART_OVERHEAD_BYTES:
        raise UploadTooLargeError(
            f"The upload exceeds the limit of {state.files.max_upload_bytes} bytes."
        )
    directory = request.query.get("path")
    saved = []
    reader = await request.multipart()
    while (part := await reader.next()) is not None:
        if not isinstance(part, BodyPartReader):
            continue
        filename = multipart_filename(part.headers.get(hdrs.CONTENT_DISPOSITION, ""))
        if filename:
            target = state.files.resolve(filename, directory)
            saved.append(await state.files.save(part, target))
        # Form fields without a file name (and nested multiparts) are skipped unread;
        # `next()` drains them.
    if not saved:
        raise BadRequestError("The request has no multipart part 'file' with a filename.")
    return saved


async def legacy_upload(request: web.Request) -> web.Response:
    """`POST files/upload` (and `python/uploadFile`): `{"value": [...]}`."""
    return web.json_response(legacy_files(await _upload(request)))


async def upload(request: web.Request) -> web.Response:
    """`POST /files`: one `SessionResourceFile` (legacy api-versions: the `value` list)."""
    entries = await _upload(request)
    if _legacy(request):
        return web.json_response(legacy_files(entries))
    return web.json_response(new_file(entries[0]))


async def list_files(request: web.Request) -> web.Response:
    """`GET /files` (`path`, `recursive`); legacy api-versions list files only."""
    files = _state(request).files
    directory = files.resolve_dir(request.query.get("path"))
    recursive = request.query.get("recursive", "").lower() in ("true", "1")
    legacy = _legacy(request)
    entries = await files.list_dir(directory, recursive=recursive, files_only=legacy)
    return web.json_response(legacy_files(entries) if legacy else new_files(entries))


async def file_metadata(request: web.Request) -> web.Response:
    """`GET /files/{name}`."""
    files = _state(request).files
    entry = files.entry(files.resolve(request.match_info["name"], request.query.get("path")))
    return web.json_response(legacy_files([entry]) if _legacy(request) else new_file(entry))


async def file_content(request: web.Request) -> web.FileResponse:
    """`GET /files/{name}/content` and the legacy `GET files/content/{name}`: raw bytes."""
    files = _state(request).files
    path = files.resolve(request.match_info["name"], request.query.get("path"))
    return web.FileResponse(files.existing_file(path))


async def delete_file(request: web.Request) -> web.Response:
    """`DELETE /files/{name}`: 204 (legacy api-versions: 200 with a message)."""
    files = _state(request).files
    files.delete(files.resolve(request.match_info["name"], request.query.get("path")))
    if _legacy(request):
        return web.json_response({"message": "file deleted successfully"})
    return web.Response(status=204)


# --- application ---------------------------------------------------------------------------


def create_app(settings: Settings) -> web.Application:
    """The application; the kernel starts (and the port opens) only once it is ready."""
    app = web.Application(
        middlewares=[error_middleware], client_max_size=settings.max_json_body_bytes
    )

    async def lifecycle(app: web.Application) -> AsyncIterator[None]:
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        kernel: Kernel | None = None
        if settings.mode == "python":
            # Imported here: the shell image has no Jupyter.
            from .kernel import Kernel

            kernel = Kernel(settings)
            await kernel.start()
        executor = Executor(settings, kernel)
        app[_STATE] = State(
            settings, kernel, executor, FileStore(settings.data_dir, settings.max_upload_bytes)
        )
        log.info(
            "%s session ready on port %d, files in %s",
            "code interpreter" if kernel else "shell",
            settings.port,
            settings.data_dir,
        )
        try:
            yield
        finally:
            await executor.close()
            if kernel is not None:
                await kernel.stop()

    app.cleanup_ctx.append(lifecycle)
    add = app.router.add_route
    add("GET", "/health", health)
    for path in ("/code/execute", "/execute", "/python/execute"):
        add("POST", path, legacy_execute)
    add("POST", "/executions", create_execution)
    add("GET", "/executions/{execution_id}", get_execution)
    for path in ("/files/upload", "/python/uploadFile"):
        add("POST", path, legacy_upload)
    add("GET", "/files", list_files)
    add("POST", "/files", upload)
    # Order matters: the content routes must win over the metadata route.
    add("GET", "/files/content/{name:.+}", file_content)
    add("GET", "/files/{name:.+}/content", file_content)
    add("GET", "/files/{name:.+}", file_metadata)
    add("DELETE", "/files/{name:.+}", delete_file)
    return app
