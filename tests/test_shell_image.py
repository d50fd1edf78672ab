"""The Shell session image, end to end: a real container, real HTTP, no mocks."""

from __future__ import annotations

import uuid
from typing import Any

import aiohttp
import pytest

from tests.helpers import multipart
from tests.test_code_interpreter_image import image_fixtures

pytestmark = [pytest.mark.docker, pytest.mark.timeout(300), pytest.mark.asyncio]

IMAGE = "sessionpool/shell:dev"
SHELL = {"api-version": "2025-02-02-preview", "identifier": "shell-session"}


base_url, http = image_fixtures(IMAGE, "shell-image")


async def execute(http: aiohttp.ClientSession, body: dict[str, Any]) -> dict[str, Any]:
    async with http.post("/executions", params=SHELL, json=body) as resp:
        assert resp.status == 200, await resp.text()
        result: dict[str, Any] = await resp.json()
    return result


async def test_shell_command_status_is_the_exit_code(http: aiohttp.ClientSession) -> None:
    ok = await execute(http, {"shellCommand": "echo hi; echo err >&2"})
    assert ok["status"] == "0"
    assert ok["result"]["stdout"] == "hi\n"
    assert ok["result"]["stderr"] == "err\n"
    failed = await execute(http, {"shellCommand": "exit 3"})
    assert failed["status"] == "3"


async def test_the_usual_tools_are_there(http: aiohttp.ClientSession) -> None:
    cmd = (
        "set -e; echo '{\"a\": [1, 2]}' | jq -c .a; git --version >/dev/null; "
        "curl --version >/dev/null; tar --version >/dev/null; sqlite3 --version >/dev/null; "
        "id -u; pwd"
    )
    out = await execute(http, {"shellCommand": cmd})
    assert out["status"] == "0", out
    assert out["result"]["stdout"].splitlines() == ["[1,2]", "1000", "/mnt/data"]


async def test_exec_args_and_stdin(http: aiohttp.ClientSession) -> None:
    out = await execute(http, {"execCommandAndArgs": ["tr", "a-z", "A-Z"], "stdin": "shout\n"})
    assert out["status"] == "0"
    assert out["result"]["stdout"] == "SHOUT\n"


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/executions", {"code": "print(1)"}),
        ("/executions", {"properties": {"codeInputType": "inline", "code": "1 + 1"}}),
        ("/code/execute", {"properties": {"codeInputType": "inline", "code": "1 + 1"}}),
    ],
)
async def test_python_code_is_a_400_naming_the_field(
    http: aiohttp.ClientSession, path: str, body: dict[str, Any]
) -> None:
    async with http.post(path, params=SHELL, json=body) as resp:
        assert resp.status == 400
        error = (await resp.json())["error"]
    assert resp.headers["x-ms-error-code"] == error["code"]
    assert "'code'" in error["message"]
    assert "Shell" in error["message"]


async def test_files_round_trip_with_commands(http: aiohttp.ClientSession) -> None:
    name = f"f-{uuid.uuid4().hex[:8]}.txt"
    body, headers = multipart(name, b"line one\nline two\n")
    async with http.post("/files", params=SHELL, data=body, headers=headers) as resp:
        assert resp.status == 200, await resp.text()
        assert (await resp.json())["name"] == name
    out = await execute(http, {"shellCommand": f"wc -l < {name}; echo made > out.txt"})
    assert out["result"]["stdout"].strip() == "2"
    async with http.get("/files/out.txt/content", params=SHELL) as resp:
        assert resp.status == 200
        assert await resp.read() == b"made\n"
    async with http.get("/files", params=SHELL) as resp:
        names = {f["name"] for f in (await resp.json())["value"]}
    assert {name, "out.txt"} <= names
