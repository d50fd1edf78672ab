"""A private redis-server on a unix socket: what `sessionpool up`, the tests and the
benchmarks run when they are given no Redis."""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path


class RedisServer:
    """A private redis-server on a unix socket (no TCP port), stoppable and restartable.

    `appendonly=True` keeps state across a restart (fsync on every write), for failure tests.
    `password=True` makes it want a random password, kept in a 0600 file of `directory` (never
    on a command line) and in `url`: `up`'s process-runtime sandboxes run as this user.
    """

    def __init__(self, directory: Path, appendonly: bool = False, password: bool = False) -> None:
        self.directory = directory
        self.socket = directory / "redis.sock"
        self.appendonly = appendonly
        self.password = secrets.token_urlsafe(24) if password else ""
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"unix://{auth}{self.socket}"

    def argv(self) -> list[str]:
        exe = shutil.which("redis-server")
        if exe is None:
            raise RuntimeError("redis-server is not installed (apt-get install redis-server)")
        argv = [exe]
        if self.password:
            conf = self.directory / "redis.conf"
            conf.unlink(missing_ok=True)
            fd = os.open(conf, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(f"requirepass {self.password}\n")
            argv.append(str(conf))  # the config file comes first, options after it
        argv += ["--port", "0", "--unixsocket", str(self.socket), "--unixsocketperm", "700"]
        argv += ["--save", "", "--dir", str(self.directory)]
        if self.appendonly:
            return [*argv, "--appendonly", "yes", "--appendfsync", "always"]
        return [*argv, "--appendonly", "no"]

    def start(self, new_session: bool = False) -> RedisServer:
        """Start and wait until the socket exists (`new_session`: not in our process group,
        so a Ctrl-C in a terminal does not stop it before the caller cleans up).

        Raises:
            RuntimeError: redis-server is missing or did not start within 10 s.
        """
        self.socket.unlink(missing_ok=True)
        self.proc = subprocess.Popen(
            self.argv(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=new_session,
        )
        deadline = time.monotonic() + 10
        while not self.socket.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("redis-server did not start")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        """Stop at once (SIGKILL), as a crash would; `start()` brings it back."""
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None
        self.socket.unlink(missing_ok=True)


@contextlib.contextmanager
def redis_server(directory: Path, appendonly: bool = False) -> Iterator[RedisServer]:
    server = RedisServer(directory, appendonly).start()
    try:
        yield server
    finally:
        server.stop()
