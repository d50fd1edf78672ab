"""A hostile session: each endpoint starts an attack from inside its sandbox, in the background.

Runs on Debian's python3-aiohttp (3.8). Attacks run in child processes so the server keeps
answering (until the attack takes the whole sandbox down, which is the point of some of them).
"""

import asyncio
import contextlib
import errno
import os
import subprocess
import sys
import tempfile

from aiohttp import web

# The echo app (sessionpool/demo/echo.py) sits beside this file in the image: its health and
# network probe are this session's too.
from echo import connect, health, serve

routes = web.RouteTableDef()  # the attacks; main() adds echo's /health and /connect


def _spawn(code):
    """Run `code` in a detached python3 child; return its pid."""
    proc = subprocess.Popen(
        [sys.executable, "-c", code],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    return proc.pid


@routes.post("/forkbomb")
async def forkbomb(request):
    # Each child forks forever; fork failures (the pids limit) are ignored and retried.
    pid = _spawn(
        "import os, time\n"
        "while True:\n"
        "    try:\n"
        "        os.fork()\n"
        "    except OSError:\n"
        "        time.sleep(0.01)\n"
    )
    return web.json_response({"started": pid})


@routes.post("/membomb")
async def membomb(request):
    # In this very process when ?self=1 (the OOM killer then takes the server), else a child.
    code = (
        "blocks = []\n"
        "while True:\n"
        "    blocks.append(bytearray(16 << 20))\n"
        "    for i in range(0, len(blocks[-1]), 4096):\n"
        "        blocks[-1][i] = 1\n"
    )
    if request.query.get("self") == "1":
        asyncio.get_running_loop().call_later(0.05, exec, code)
        return web.json_response({"started": os.getpid()})
    return web.json_response({"started": _spawn(code)})


@routes.post("/fill")
async def fill(request):
    """Write to `path` until the filesystem refuses; report how far it got."""
    path = request.query.get("path", "/tmp/fill")
    limit = int(request.query.get("max_mb", "2048")) << 20
    keep = request.query.get("keep") == "1"
    return web.json_response(await asyncio.to_thread(_fill, path, limit, keep))


def _fill(path, limit, keep):
    written, error = 0, None
    block = b"\0" * (1 << 20)
    try:
        with open(path, "wb") as f:
            while written < limit:
                f.write(block)
                f.flush()
                written += len(block)
            os.fsync(f.fileno())
    except OSError as exc:
        error = f"{type(exc).__name__}: {exc}"
    if not keep:
        with contextlib.suppress(OSError):
            os.unlink(path)
    return {"written": written, "error": error}


@routes.post("/stubborn")
async def stubborn(request):
    pid = _spawn(
        "import signal, time\n"
        "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        "signal.signal(signal.SIGINT, signal.SIG_IGN)\n"
        "while True:\n"
        "    time.sleep(1)\n"
    )
    return web.json_response({"started": pid})


def _read(path):
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def _cgroup(v1, v2):
    """A cgroup file's content: the v2 name under /sys/fs/cgroup, else the v1 one."""
    got = _read("/sys/fs/cgroup/" + v2)
    return got if got is not None else _read("/sys/fs/cgroup/" + v1)


def _writable(path):
    try:
        fd, name = tempfile.mkstemp(dir=path, prefix=".probe-")
    except OSError as exc:
        return errno.errorcode.get(exc.errno, str(exc.errno))
    os.close(fd)
    os.unlink(name)
    return "ok"


def _report():
    status = dict(
        line.split(":", 1)
        for line in (_read("/proc/self/status") or "").splitlines()
        if ":" in line
    )
    mounts = {}
    for line in (_read("/proc/self/mountinfo") or "").splitlines():
        left, _, right = line.partition(" - ")
        fields, extra = left.split(), right.split()
        mounts[fields[4]] = {
            "options": fields[5],
            "fstype": extra[0] if extra else "",
            "super": extra[2] if len(extra) > 2 else "",
        }
    home = os.path.expanduser("~")
    paths = ["/", "/etc", "/usr", "/opt", "/tmp", "/var/tmp", "/run", "/mnt/data", "/dev/shm"]
    paths += [home, os.getcwd()]
    return {
        "uid": os.getuid(),
        "gid": os.getgid(),
        "home": home,
        "cwd": os.getcwd(),
        "caps": {
            k: status.get(k, "").strip() for k in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb")
        },
        "no_new_privs": status.get("NoNewPrivs", "").strip(),
        "seccomp": status.get("Seccomp", "").strip(),
        "memory_max": _cgroup("memory/memory.limit_in_bytes", "memory.max"),
        "memsw_max": _cgroup("memory/memory.memsw.limit_in_bytes", "memory.swap.max"),
        "memory_usage": _cgroup("memory/memory.usage_in_bytes", "memory.current"),
        "cpu_max": _cgroup("cpu/cpu.cfs_quota_us", "cpu.max"),
        "cpu_period": _cgroup("cpu/cpu.cfs_period_us", "cpu.max"),
        "pids_max": _cgroup("pids/pids.max", "pids.max"),
        "mounts": mounts,
        "writable": {p: _writable(p) for p in paths},
    }


@routes.get("/report")
async def report(request):
    """What this sandbox is allowed: capabilities, limits, mounts, where it can write."""
    return web.json_response(await asyncio.to_thread(_report))


@routes.get("/exists")
async def exists(request):
    found = await asyncio.to_thread(os.path.exists, request.query.get("path", ""))
    return web.json_response({"exists": found})


def main():
    app = web.Application()
    app.add_routes(routes)
    app.router.add_get("/health", health)
    app.router.add_get("/connect", connect)
    serve(app)


if __name__ == "__main__":
    main()
