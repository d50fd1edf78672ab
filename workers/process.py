"""The `process` runtime: a pool's command as a local process. Development only.

NOT a security boundary: the process runs as the worker's user on the worker's host (inside
bubblewrap when `bwrap` is installed: the host's file system read-only but for a private scratch
directory, its own PID namespace, and death with the worker). Each sandbox gets a free loopback
port in `PORT`; the template's command must listen on it. Sandboxes live as long as the worker
that started them: `list` only knows its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import socket
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from router.errors import SandboxRuntimeError
from workers.runtime import Exit, Handle, Observed, SandboxSpec

log = logging.getLogger("sessionpool.process")


@dataclass
class _Proc:
    spec: SandboxSpec
    proc: asyncio.subprocess.Process
    created_s: float
    scratch: str
    watcher: asyncio.Task[None] | None = None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ProcessRuntime:
    """Sandboxes as child processes of this worker."""

    name = "process"

    async def engine_id(self) -> str:
        """This host: a process sandbox lives only where its worker runs."""
        return f"process:{os.uname().nodename}"

    def __init__(self, use_bwrap: bool | None = None) -> None:
        self._procs: dict[str, _Proc] = {}
        self._exits: asyncio.Queue[Exit | None] = asyncio.Queue()
        self._bwrap = shutil.which("bwrap") if use_bwrap is not False else None
        log.warning(
            "process runtime: sandboxes are plain local processes, NOT a security "
            "boundary; use the docker runtime for untrusted code"
        )

    async def create(self, spec: SandboxSpec) -> Handle:
        pool = spec.pool
        argv = [*pool.command, *pool.args]
        if not argv:
            raise SandboxRuntimeError(f"pool {pool.name}: the process runtime needs a command")
        port = _free_port()
        # A private, writable scratch directory: HOME and TMPDIR point there.
        scratch = tempfile.mkdtemp(prefix=f"sessionpool-{spec.sandbox_id[:8]}-")
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": scratch, "TMPDIR": scratch}
        env.update({e.name: e.value for e in pool.env if e.value is not None})
        env.update(spec.env)
        env["PORT"] = str(port)
        if self._bwrap:
            # The host's file system read-only but for the scratch directory. /tmp stays
            # visible (read-only): the command or its interpreter may live there.
            argv = [
                self._bwrap,
                "--ro-bind",
                "/",
                "/",
                "--dev",
                "/dev",
                "--proc",
                "/proc",
                "--bind",
                scratch,
                scratch,
                "--unshare-pid",
                "--die-with-parent",
                "--",
                *argv,
            ]
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv,
                env=env,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.DEVNULL,
                start_new_session=True,
            )
        except OSError as exc:
            shutil.rmtree(scratch, ignore_errors=True)
            raise SandboxRuntimeError(f"pool {pool.name}: cannot start {argv[0]!r}: {exc}") from exc
        container = f"proc-{proc.pid}-{spec.sandbox_id[:8]}"
        entry = _Proc(spec, proc, time.time(), scratch)
        self._procs[container] = entry
        entry.watcher = asyncio.create_task(self._watch(container, entry))
        return Handle(container, f"127.0.0.1:{port}")

    async def _watch(self, container: str, entry: _Proc) -> None:
        await entry.proc.wait()
        if container in self._procs:
            self._exits.put_nowait(Exit(container, entry.spec.pool.name, entry.spec.sandbox_id))

    async def destroy(self, container: str) -> None:
        entry = self._procs.pop(container, None)
        if entry is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(entry.proc.pid, signal.SIGKILL)
        await entry.proc.wait()
        if entry.watcher is not None:
            await entry.watcher
        shutil.rmtree(entry.scratch, ignore_errors=True)

    async def list(self, scope: str) -> list[Observed]:
        return [
            Observed(
                container=c,
                pool=p.spec.pool.name,
                sandbox_id=p.spec.sandbox_id,
                version=p.spec.pool.version,
                running=p.proc.returncode is None,
                created_s=p.created_s,
            )
            for c, p in self._procs.items()
            if p.spec.scope == scope
        ]

    async def exits(self, scope: str) -> AsyncIterator[Exit]:
        while True:
            item = await self._exits.get()
            if item is None:
                return
            yield item

    async def close(self) -> None:
        for container in list(self._procs):
            await self.destroy(container)
        self._exits.put_nowait(None)
