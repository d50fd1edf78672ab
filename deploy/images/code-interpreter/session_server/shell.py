"""Shell executions: one process (group) per request, stdin piped, output bounded."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from pathlib import Path

from .models import Outcome

# Exit status reported when a command is killed for running too long (as timeout(1) does).
TIMEOUT_EXIT_CODE = 124
# Exit status of a command that could not be started (as a shell reports it).
NOT_FOUND_EXIT_CODE = 127
_CHUNK_BYTES = 64 * 1024
# After the command exits, how long background children may keep its pipes open.
_PIPE_GRACE_S = 1.0


async def run_command(
    argv: tuple[str, ...], stdin: str | None, timeout_s: float, max_output: int, cwd: Path
) -> Outcome:
    """Run `argv` in its own process group; kill the whole group on timeout."""
    started = time.monotonic()
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            cwd=cwd,
            start_new_session=True,
        )
    except (FileNotFoundError, PermissionError, NotADirectoryError) as exc:
        return Outcome(
            stderr=f"{argv[0]}: {exc.strerror}\n",
            exit_code=NOT_FOUND_EXIT_CODE,
            error_name="CommandStartError",
            error_message=str(exc),
            duration_ms=int((time.monotonic() - started) * 1000),
        )
    assert proc.stdout is not None
    assert proc.stderr is not None
    # Bytes, not characters: allow for multi-byte UTF-8 before cutting to `max_output`.
    byte_limit = max_output * 4
    readers = [
        asyncio.create_task(_read_bounded(proc.stdout, byte_limit)),
        asyncio.create_task(_read_bounded(proc.stderr, byte_limit)),
    ]
    writer = asyncio.create_task(_feed_stdin(proc, stdin))
    timed_out = False
    try:
        try:
            await asyncio.wait_for(proc.wait(), timeout_s)
        except TimeoutError:
            timed_out = True
            _kill_group(proc.pid)
            await proc.wait()
        # Background children (`sleep 100 &`) may hold the pipes open: give them a moment.
        done, _ = await asyncio.wait(readers, timeout=_PIPE_GRACE_S)
        if len(done) < len(readers):
            _kill_group(proc.pid)
        stdout, stderr = await asyncio.gather(*readers)
    finally:
        # Cancelled (server shutting down) or done: leave no process behind.
        if proc.returncode is None:
            _kill_group(proc.pid)
        for task in (*readers, writer):
            task.cancel()
        await asyncio.gather(*readers, writer, return_exceptions=True)
    out = stdout.decode(errors="replace")[:max_output]
    err = stderr.decode(errors="replace")
    exit_code = _exit_code(proc.returncode)
    error_name = error_message = ""
    if timed_out:
        exit_code = TIMEOUT_EXIT_CODE
        error_name = "ExecutionTimeout"
        error_message = f"Command timed out after {timeout_s:g} seconds and was killed."
        err += error_message + "\n"
    return Outcome(
        stdout=out,
        stderr=err[:max_output],
        exit_code=exit_code,
        timed_out=timed_out,
        error_name=error_name,
        error_message=error_message,
        duration_ms=int((time.monotonic() - started) * 1000),
    )


async def _read_bounded(stream: asyncio.StreamReader, limit: int) -> bytes:
    """Read to EOF, keeping only the first `limit` bytes."""
    kept = bytearray()
    while chunk := await stream.read(_CHUNK_BYTES):
        if len(kept) < limit:
            kept += chunk[: limit - len(kept)]
    return bytes(kept)


async def _feed_stdin(proc: asyncio.subprocess.Process, data: str | None) -> None:
    if data is None or proc.stdin is None:
        return
    # The command may exit without reading its input; that is its business.
    with contextlib.suppress(BrokenPipeError, ConnectionResetError):
        proc.stdin.write(data.encode())
        await proc.stdin.drain()
        proc.stdin.close()


def _kill_group(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


def _exit_code(returncode: int | None) -> int:
    """Exit status as a shell reports it: 128 + N for death by signal N."""
    if returncode is None:
        return -1
    return 128 - returncode if returncode < 0 else returncode
