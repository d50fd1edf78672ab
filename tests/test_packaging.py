"""The built wheel on its own: installed into a fresh virtual environment, its `sessionpool up
--runtime process` serves the demo pool from the package's own files (the demo app is package
data), with nothing from this checkout on the path.

The fresh environment gets its third-party dependencies through a `.pth` line naming this
environment's site-packages (the test runs offline); a `.pth` line only appends a directory, so
this checkout's editable install is not activated there and `sessionpool` resolves to the wheel.
"""

from __future__ import annotations

import asyncio
import shutil
import signal
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import aiohttp
import pytest

from sessionpool.testing import unused_port, wait_until

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.timeout(180)


def _run(*argv: str | Path, cwd: Path) -> str:
    done = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def _source_copy(dest: Path) -> Path:
    """This checkout's files (tracked, and new ones git does not ignore) copied to `dest`: a
    wheel built in place could carry a deleted module along from setuptools' `build/`."""
    listed = _run("git", "ls-files", "-z", "--cached", "--others", "--exclude-standard", cwd=ROOT)
    for name in filter(None, listed.split("\0")):
        if (ROOT / name).is_file():  # a deleted file is still listed until committed
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, dest / name)
    return dest


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv with the wheel built from this checkout installed in it; its bin/."""
    tmp = tmp_path_factory.mktemp("wheel")
    source = _source_copy(tmp / "source")
    _run(
        sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", tmp / "dist", source, cwd=tmp
    )
    (wheel,) = (tmp / "dist").glob("sessionpool-*.whl")
    venv = tmp / "venv"
    _run(sys.executable, "-m", "venv", "--without-pip", venv, cwd=tmp)
    python = venv / "bin" / "python"
    purelib = _run(python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))", cwd=tmp)
    Path(purelib.strip(), "dependencies.pth").write_text(sysconfig.get_path("purelib") + "\n")
    _run(
        sys.executable,
        "-m",
        "pip",
        "--python",
        python,
        "install",
        "-q",
        "--no-deps",
        wheel,
        cwd=tmp,
    )
    return venv / "bin"


def test_the_wheel_carries_the_demo_app_and_not_this_checkout(installed: Path) -> None:
    where = _run(
        installed / "python",
        "-c",
        "import sessionpool, sessionpool.up as up; print(sessionpool.__file__); print(up.ECHO)",
        cwd=installed,
    ).split()
    venv = installed.parent
    assert all(Path(p).is_relative_to(venv) for p in where), where
    assert Path(where[1]).is_file()
    # Every module in the wheel is one of this checkout's (none from an old build).
    (wheel,) = (venv.parent / "dist").glob("sessionpool-*.whl")
    modules = [n for n in zipfile.ZipFile(wheel).namelist() if n.endswith(".py")]
    assert "router/app.py" in modules
    assert [m for m in modules if not (ROOT / m).is_file()] == []


async def test_up_from_the_wheel_serves_the_demo_pool(installed: Path, tmp_path: Path) -> None:
    port = unused_port()
    up = await asyncio.create_subprocess_exec(
        installed / "sessionpool",
        "up",
        "--runtime",
        "process",
        "--port",
        str(port),
        cwd=tmp_path,  # not this checkout: nothing of it is importable from here
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}/pools/demo/hello?identifier=me-1"
    try:
        async with aiohttp.ClientSession() as http:

            async def served() -> dict[str, str] | None:
                assert up.returncode is None, "sessionpool up exited"
                try:
                    async with http.get(url) as r:
                        return await r.json() if r.status == 200 else None
                except aiohttp.ClientError:
                    return None

            body = await wait_until(served, timeout=60)
            assert body["path"] == "/hello"  # the demo echo app answered, through the router
    finally:
        if up.returncode is None:
            up.send_signal(signal.SIGINT)
        out, _ = await asyncio.wait_for(up.communicate(), 60)
    assert up.returncode == 0, out.decode()
    assert b"no sandbox left behind" in out
