"""The code interpreter session image, end to end: a real container, real HTTP, no mocks.

Request shapes follow what the ACA client libraries send (reference/aca-dynamic-sessions.md
§2.7), and every field those clients read is asserted.
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import aiohttp
import pytest
import pytest_asyncio
from yarl import URL

from tests.helpers import assert_png, multipart, open_engine

pytestmark = [pytest.mark.docker, pytest.mark.timeout(300), pytest.mark.asyncio]

IMAGE = "sessionpool/code-interpreter:dev"
LEGACY = {"api-version": "2024-02-02-preview", "identifier": "test-session"}
NEW = {"api-version": "2025-10-02-preview", "identifier": "test-session"}
SHELL = {"api-version": "2025-02-02-preview", "identifier": "test-session"}
LANGCHAIN_HEADERS = {
    "Content-Type": "application/json",
    "User-Agent": "langchain-azure-dynamic-sessions/0.2.0 (Language=Python)",
}
MIB = 1024 * 1024
HEALTH_DEADLINE_S = 90.0


# --- fixtures ------------------------------------------------------------------------------


async def _wait_healthy(base_url: str, container: Any) -> None:
    """Poll /health until it answers 200; fail early if the container exits."""
    deadline = time.monotonic() + HEALTH_DEADLINE_S
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < deadline:
            try:
                async with session.get(f"{base_url}/health") as resp:
                    if resp.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            container.reload()
            if container.status == "exited":
                logs = container.logs().decode(errors="replace")
                pytest.fail(f"code interpreter container exited:\n{logs}")
            await asyncio.sleep(0.05)
    pytest.fail(f"code interpreter not healthy after {HEALTH_DEADLINE_S} s")


def image_container(image: str, label: str) -> Iterator[str]:
    """Run `image` (built with deploy/images/build.sh if it is missing) until the generator
    closes; yield its base URL once /health answers."""
    client = open_engine(image)
    container = client.containers.run(
        image,
        detach=True,
        ports={"6000/tcp": ("127.0.0.1", None)},
        labels={"sessionpool.test": label},
    )
    try:
        container.reload()
        port = container.ports["6000/tcp"][0]["HostPort"]
        url = f"http://127.0.0.1:{port}"
        asyncio.run(_wait_healthy(url, container))
        yield url
    finally:
        container.remove(force=True)
        client.close()


def image_fixtures(image: str, label: str) -> tuple[Any, Any]:
    """A suite's `base_url` (one container of `image` for the module) and `http` (a client
    on it) fixtures: `base_url, http = image_fixtures(IMAGE, label)`."""

    @pytest.fixture(scope="module")
    def base_url() -> Iterator[str]:
        yield from image_container(image, label)

    @pytest_asyncio.fixture
    async def http(base_url: str) -> AsyncIterator[aiohttp.ClientSession]:
        async with aiohttp.ClientSession(base_url=base_url) as session:
            yield session

    return base_url, http


base_url, http = image_fixtures(IMAGE, "code-interpreter-image")


# --- helpers -------------------------------------------------------------------------------


def _legacy_body(code: str, **extra: Any) -> dict[str, Any]:
    """The body LangChain, LlamaIndex, Semantic Kernel (Python) and AutoGen send."""
    return {
        "properties": {
            "codeInputType": "inline",
            "executionType": "synchronous",
            "code": code,
            **extra,
        }
    }


async def legacy_exec(http: aiohttp.ClientSession, code: str, **extra: Any) -> dict[str, Any]:
    async with http.post(
        "/code/execute", params=LEGACY, json=_legacy_body(code, **extra), headers=LANGCHAIN_HEADERS
    ) as resp:
        assert resp.status == 200, await resp.text()
        body: dict[str, Any] = await resp.json()
    props: dict[str, Any] = body["properties"]
    # Semantic Kernel raises KeyError unless all of these are present.
    for key in ("status", "result", "stdout", "stderr", "executionResult"):
        assert key in props
    return props


async def new_exec(http: aiohttp.ClientSession, body: dict[str, Any]) -> dict[str, Any]:
    async with http.post("/executions", params=NEW, json=body) as resp:
        assert resp.status == 200, await resp.text()
        result: dict[str, Any] = await resp.json()
    return result


def assert_error(status: int, body: dict[str, Any], headers: Any, expected: int) -> str:
    assert status == expected, body
    code: str = body["error"]["code"]
    assert code
    assert body["error"]["message"]
    assert headers["x-ms-error-code"] == code
    return code


def unique(stem: str) -> str:
    return f"{stem}-{uuid.uuid4().hex[:8]}"


# --- health and legacy contract ------------------------------------------------------------


async def test_health(http: aiohttp.ClientSession) -> None:
    async with http.get("/health") as resp:
        assert resp.status == 200


async def test_legacy_execute_langchain_shape(http: aiohttp.ClientSession) -> None:
    # LangChain encodes the identifier and puts it first; the server must not care.
    async with http.post(
        "/code/execute?identifier=user%401%20x&api-version=2024-02-02-preview",
        json=_legacy_body("print('hello')\n1 + 1"),
        headers=LANGCHAIN_HEADERS,
    ) as resp:
        assert resp.status == 200
        assert resp.headers["operation-id"]
        assert resp.headers["x-ms-session-guid"]
        body = await resp.json()
    assert body["$id"] == "1"
    props = body["properties"]
    assert props["status"] == "Success"
    assert props["stdout"] == "hello\n"
    assert props["stderr"] == ""
    assert props["result"] == 2
    assert props["executionResult"] == 2
    assert isinstance(props["executionTimeInMilliseconds"], int)


@pytest.mark.parametrize("path", ["/execute", "/python/execute", "/code/execute"])
async def test_legacy_execute_aliases(http: aiohttp.ClientSession, path: str) -> None:
    # Semantic Kernel's timeoutInSeconds: 100 must be accepted too.
    body = _legacy_body("'via ' + 'alias'", timeoutInSeconds=100)
    async with http.post(path, params=LEGACY, json=body) as resp:
        assert resp.status == 200
        props = (await resp.json())["properties"]
    assert props["status"] == "Success"
    assert props["result"] == "via alias"


async def test_state_persists_across_calls_and_contracts(http: aiohttp.ClientSession) -> None:
    await legacy_exec(http, "persisted_value = 40")
    props = await legacy_exec(http, "persisted_value += 1\npersisted_value")
    assert props["result"] == 41
    new = await new_exec(http, {"code": "persisted_value + 1"})
    assert new["result"]["executionResult"] == 42


@pytest.mark.parametrize(
    ("code", "expected"),
    [
        ("'text'", "text"),
        ("1.5 * 2", 3.0),
        ("True", True),
        ("float('nan')", None),  # NaN is reported as null
        ("a = None\na", ""),  # no displayed value
        ("x = 1", ""),
        ("[1, 2]", "[1, 2]"),  # not JSON-native: the text/plain repr
    ],
)
async def test_last_expression_is_the_result(
    http: aiohttp.ClientSession, code: str, expected: Any
) -> None:
    props = await legacy_exec(http, code)
    assert props["status"] == "Success"
    assert props["result"] == expected
    new = await new_exec(http, {"code": code})
    assert new["result"]["executionResult"] == expected


async def test_dataframe_result_is_its_text_repr(http: aiohttp.ClientSession) -> None:
    props = await legacy_exec(http, "import pandas as pd\npd.DataFrame({'col': [7, 8]})")
    assert "col" in props["result"]
    assert "8" in props["result"]


async def test_jupyter_format_result_is_text(http: aiohttp.ClientSession) -> None:
    body = {"code": "1 + 1", "returnJupyterFormatExecutionResult": True}
    assert (await new_exec(http, body))["result"]["executionResult"] == "2"
    body = {"code": "float('nan')", "returnJupyterFormatExecutionResult": True}
    assert (await new_exec(http, body))["result"]["executionResult"] == "nan"


async def test_stdout_and_stderr_are_separate(http: aiohttp.ClientSession) -> None:
    code = "import sys\nprint('to out')\nprint('to err', file=sys.stderr)"
    props = await legacy_exec(http, code)
    assert props["stdout"] == "to out\n"
    assert props["stderr"] == "to err\n"
    assert props["status"] == "Success"


async def test_exception_is_failure_with_plain_traceback(http: aiohttp.ClientSession) -> None:
    code = "def f():\n    return 1 / 0\nprint('before')\nf()"
    props = await legacy_exec(http, code)
    assert props["status"] == "Failure"
    assert props["stdout"] == "before\n"
    assert "ZeroDivisionError" in props["stderr"]
    assert "Traceback" in props["stderr"]
    assert "\x1b[" not in props["stderr"]  # no ANSI colours
    new = await new_exec(http, {"code": code})
    assert new["status"] == "Failed"
    assert "ZeroDivisionError" in new["result"]["stderr"]
    assert "ZeroDivisionError" in new["error"]["message"]


async def test_matplotlib_figure_is_an_image_result(http: aiohttp.ClientSession) -> None:
    code = "import matplotlib.pyplot as plt\nplt.plot([1, 3, 2])\nplt.title('t')\nplt.show()"
    props = await legacy_exec(http, code)
    assert props["status"] == "Success"
    assert_png(props["result"])
    assert props["result"]["format"] == "png"
    new = await new_exec(http, {"code": "plt.figure(); plt.plot([0, 1])"})
    assert_png(new["result"]["executionResult"])


async def test_figure_after_agg_backend_is_an_image_result_and_is_closed(
    http: aiohttp.ClientSession,
) -> None:
    code = (
        "import matplotlib\nmatplotlib.use('Agg')\nimport matplotlib.pyplot as plt\n"
        "plt.plot([1, 3, 2])\nplt.show()"
    )
    try:
        props = await legacy_exec(http, code)
        assert props["status"] == "Success"
        assert_png(props["result"])
        assert props["result"]["format"] == "png"
        assert "cannot be shown" not in props["stderr"]
        # Closed once sent: the next execution does not send it again.
        after = await legacy_exec(http, "import matplotlib.pyplot as plt\nlen(plt.get_fignums())")
        assert after["result"] == 0
        # Without show() and through the new contract too.
        new = await new_exec(http, {"code": "fig, ax = plt.subplots(); ax.bar([1], [2])"})
        assert new["result"]["executionResult"]["type"] == "image"
    finally:
        await legacy_exec(
            http, "import matplotlib\nmatplotlib.use('module://matplotlib_inline.backend_inline')"
        )


# --- new contract --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "body",
    [
        # Semantic Kernel .NET: flat, PascalCase enums.
        {"codeInputType": "Inline", "executionType": "Synchronous", "timeoutInSeconds": 100},
        # Lowercase enums, as every Python client sends them.
        {"codeInputType": "inline", "executionType": "synchronous"},
        # Azure CLI: wrapped in "properties", identifier in the body.
        {
            "properties": {
                "identifier": "test-session",
                "codeInputType": "inline",
                "executionType": "synchronous",
                "timeoutInSeconds": 60,
            }
        },
        # Only code.
        {},
    ],
)
async def test_new_contract_sync_execution(
    http: aiohttp.ClientSession, body: dict[str, Any]
) -> None:
    code = "print('new contract')\n6 * 7"
    if "properties" in body:
        body = {"properties": {**body["properties"], "code": code}}
    else:
        body = {**body, "code": code}
    async with http.post("/executions", params=NEW, json=body) as resp:
        assert resp.status == 200, await resp.text()
        execution = await resp.json()
        assert resp.headers["operation-id"] == execution["id"]
        assert resp.headers["Operation-Location"].startswith(f"/executions/{execution['id']}")
    assert execution["identifier"] == "test-session"
    assert execution["executionType"] == "Synchronous"
    assert execution["status"] == "Succeeded"
    assert execution["result"]["stdout"] == "new contract\n"
    assert execution["result"]["stderr"] == ""
    assert execution["result"]["executionResult"] == 42
    assert isinstance(execution["result"]["executionTimeInMilliseconds"], int)
    assert "error" not in execution


async def test_base64_code_input(http: aiohttp.ClientSession) -> None:
    code = base64.b64encode(b"print('decoded')").decode()
    execution = await new_exec(http, {"codeInputType": "InlineBase64", "code": code})
    assert execution["result"]["stdout"] == "decoded\n"


async def test_async_execution_with_operation_location(http: aiohttp.ClientSession) -> None:
    body = {
        "codeInputType": "inline",
        "executionType": "Asynchronous",
        "code": "import time\ntime.sleep(0.5)\nprint('async done')\n'finished'",
    }
    async with http.post("/executions", params=NEW, json=body) as resp:
        assert resp.status == 202
        accepted = await resp.json()
        location = resp.headers["Operation-Location"]
    assert accepted["status"] in ("NotStarted", "Running")
    assert accepted["executionType"] == "Asynchronous"
    assert "result" not in accepted
    assert URL(location).path == f"/executions/{accepted['id']}"
    assert URL(location).query["identifier"] == "test-session"
    deadline = time.monotonic() + 30
    while True:
        async with http.get(location) as resp:
            assert resp.status == 200
            polled = await resp.json()
        if polled["status"] not in ("NotStarted", "Running"):
            break
        assert time.monotonic() < deadline, polled
        await asyncio.sleep(0.05)
    assert polled["id"] == accepted["id"]
    assert polled["status"] == "Succeeded"
    assert polled["result"]["stdout"] == "async done\n"
    assert polled["result"]["executionResult"] == "finished"


async def test_client_chosen_operation_id(http: aiohttp.ClientSession) -> None:
    op_id = unique("op")
    headers = {"operation-id": op_id}
    async with http.post("/executions", params=NEW, json={"code": "1"}, headers=headers) as resp:
        assert resp.status == 200
        assert (await resp.json())["id"] == op_id
    async with http.get(f"/executions/{op_id}", params=NEW) as resp:
        assert resp.status == 200
        assert (await resp.json())["result"]["executionResult"] == 1
    async with http.post("/executions", params=NEW, json={"code": "1"}, headers=headers) as resp:
        assert_error(resp.status, await resp.json(), resp.headers, 409)


async def test_unknown_execution_is_404(http: aiohttp.ClientSession) -> None:
    async with http.get("/executions/does-not-exist", params=NEW) as resp:
        assert_error(resp.status, await resp.json(), resp.headers, 404)


@pytest.mark.parametrize(
    ("raw", "code"),
    [
        (b"{not json", "InvalidRequestBody"),
        (b"[1, 2]", "InvalidRequestBody"),
        (b"", "SessionPropertiesMissing"),
        (b'{"properties": {"codeInputType": "inline"}}', "SessionPropertiesMissing"),
        (b'{"identifier": "x"}', "SessionPropertiesMissing"),
        (b'{"code": "1", "timeoutInSeconds": 0}', "BadRequest"),
        (b'{"code": "1", "timeoutInSeconds": 221}', "BadRequest"),
        (b'{"code": "1", "timeoutInSeconds": "10"}', "BadRequest"),
        (b'{"code": "1", "executionType": "later"}', "BadRequest"),
        (b'{"code": "1", "codeInputType": "file"}', "BadRequest"),
        (b'{"code": "1", "outputStreamsMaxLength": -1}', "BadRequest"),
        (b'{"code": 1}', "BadRequest"),
        (b'{"code": "1", "shellCommand": "ls"}', "BadRequest"),
        (b'{"shellCommand": "ls", "execCommandAndArgs": ["ls"]}', "BadRequest"),
        (b'{"execCommandAndArgs": []}', "BadRequest"),
    ],
)
@pytest.mark.parametrize("path", ["/code/execute", "/executions"])
async def test_bad_execution_requests_are_400(
    http: aiohttp.ClientSession, path: str, raw: bytes, code: str
) -> None:
    headers = {"Content-Type": "application/json"}
    async with http.post(path, params=NEW, data=raw, headers=headers) as resp:
        assert assert_error(resp.status, await resp.json(), resp.headers, 400) == code


async def test_wrong_method_and_unknown_path(http: aiohttp.ClientSession) -> None:
    async with http.put("/executions", params=NEW, json={"code": "1"}) as resp:
        assert_error(resp.status, await resp.json(), resp.headers, 405)
        assert "POST" in resp.headers["Allow"]
    async with http.get("/no/such/route", params=NEW) as resp:
        assert_error(resp.status, await resp.json(), resp.headers, 404)


# --- timeouts, serialisation, truncation ---------------------------------------------------


async def test_timeout_interrupts_runaway_code_and_state_survives(
    http: aiohttp.ClientSession,
) -> None:
    await legacy_exec(http, "survivor = 'still here'")
    started = time.monotonic()
    props = await legacy_exec(http, "while True:\n    pass", timeoutInSeconds=2)
    elapsed = time.monotonic() - started
    assert props["status"] == "Failure"
    assert "timed out" in props["stderr"]
    assert 2 <= elapsed < 10
    # Interrupted, not restarted: the kernel's variables are intact.
    assert (await legacy_exec(http, "survivor"))["result"] == "still here"
    new = await new_exec(http, {"code": "while True: pass", "timeoutInSeconds": 1})
    assert new["status"] == "Failed"
    assert new["error"]["code"] == "ExecutionTimeout"
    assert (await new_exec(http, {"code": "survivor"}))["result"]["executionResult"] == "still here"


async def test_timeout_restarts_a_kernel_that_ignores_interrupt(
    http: aiohttp.ClientSession,
) -> None:
    await legacy_exec(http, "doomed = 1")
    code = "import signal\nsignal.signal(signal.SIGINT, signal.SIG_IGN)\nwhile True:\n    pass"
    props = await legacy_exec(http, code, timeoutInSeconds=1)
    assert props["status"] == "Failure"
    assert "restarted" in props["stderr"]
    # A fresh kernel: the next execution works, the old state is gone.
    after = await legacy_exec(http, "'doomed' in globals(), 3 * 3")
    assert after["status"] == "Success"
    assert after["result"] == "(False, 9)"
    plot = await legacy_exec(http, "import matplotlib.pyplot as plt\nplt.plot([1])\nplt.show()")
    assert plot["result"]["type"] == "image"  # the new kernel was set up like the first


async def test_dead_kernel_is_reported_and_replaced(http: aiohttp.ClientSession) -> None:
    props = await legacy_exec(http, "import os\nos._exit(3)")
    assert props["status"] == "Failure"
    assert "died" in props["stderr"]
    assert (await legacy_exec(http, "2 + 2"))["result"] == 4


async def test_concurrent_executions_are_serialized(http: aiohttp.ClientSession) -> None:
    code = "import time\nstart = time.time()\ntime.sleep(0.4)\n[start, time.time()]"

    async def run() -> list[float]:
        execution = await new_exec(http, {"code": code, "returnJupyterFormatExecutionResult": True})
        start, end = execution["result"]["executionResult"].strip("[]").split(",")
        return [float(start), float(end)]

    spans = sorted(await asyncio.gather(run(), run(), run()))
    for (_, end), (next_start, _) in itertools.pairwise(spans):
        assert next_start >= end


async def test_output_is_truncated(http: aiohttp.ClientSession) -> None:
    code = "import sys\nprint('o' * 10000, end='')\nprint('e' * 10000, end='', file=sys.stderr)"
    execution = await new_exec(http, {"code": code, "outputStreamsMaxLength": 100})
    assert execution["result"]["stdout"] == "o" * 100
    assert execution["result"]["stderr"] == "e" * 100
    # The default limit is 4096 characters, on both contracts.
    assert (await new_exec(http, {"code": code}))["result"]["stdout"] == "o" * 4096
    assert (await legacy_exec(http, code))["stdout"] == "o" * 4096
    shell = await new_exec(http, {"shellCommand": "head -c 5000 /dev/zero | tr '\\0' s"})
    assert shell["result"]["stdout"] == "s" * 4096


# --- shell executions ----------------------------------------------------------------------


async def test_shell_command_status_is_the_exit_code(http: aiohttp.ClientSession) -> None:
    # LangChain's SessionsBashTool sends nothing but shellCommand.
    body = {"shellCommand": "echo hello; echo oops >&2; pwd; exit 3"}
    async with http.post("/executions", params=SHELL, json=body) as resp:
        assert resp.status == 200
        execution = await resp.json()
    assert execution["status"] == "3"
    assert int(execution["status"]) == 3
    assert execution["result"]["stdout"] == "hello\n/mnt/data\n"
    assert execution["result"]["stderr"] == "oops\n"
    assert execution["identifier"] == "test-session"
    ok = await new_exec(http, {"shellCommand": "true", "codeInputType": "inline"})
    assert ok["status"] == "0"


async def test_shell_stdin_and_exec_args(http: aiohttp.ClientSession) -> None:
    execution = await new_exec(http, {"execCommandAndArgs": ["cat"], "stdin": "piped\ninput"})
    assert execution["status"] == "0"
    assert execution["result"]["stdout"] == "piped\ninput"
    execution = await new_exec(http, {"shellCommand": "read a; echo got $a", "stdin": "x1\n"})
    assert execution["result"]["stdout"] == "got x1\n"
    missing = await new_exec(http, {"execCommandAndArgs": ["no-such-binary-here"]})
    assert missing["status"] == "127"


async def test_shell_timeout_kills_the_command(http: aiohttp.ClientSession) -> None:
    started = time.monotonic()
    execution = await new_exec(
        http, {"shellCommand": "sleep 60 & sleep 60; echo never", "timeoutInSeconds": 1}
    )
    assert time.monotonic() - started < 10
    assert execution["status"] == "124"
    assert "never" not in execution["result"]["stdout"]
    assert execution["error"]["code"] == "ExecutionTimeout"


async def test_shell_legacy_path_reports_success_or_failure(http: aiohttp.ClientSession) -> None:
    async with http.post(
        "/code/execute", params=LEGACY, json={"properties": {"shellCommand": "exit 2"}}
    ) as resp:
        assert (await resp.json())["properties"]["status"] == "Failure"


# --- files ---------------------------------------------------------------------------------


@pytest.mark.parametrize("prefix", ["", "/mnt/data/"])
async def test_legacy_file_round_trip(http: aiohttp.ClientSession, prefix: str) -> None:
    name = unique("legacy file") + ".txt"
    content = b"legacy contents\n"
    data, headers = multipart(prefix + name, content)
    async with http.post("/files/upload", params=LEGACY, data=data, headers=headers) as resp:
        assert resp.status == 200, await resp.text()
        uploaded = await resp.json()
    assert uploaded["value"][0]["properties"]["filename"] == name
    assert uploaded["value"][0]["properties"]["size"] == len(content)

    async with http.get("/files", params=LEGACY) as resp:
        listing = await resp.json()
    props = {v["properties"]["filename"]: v["properties"] for v in listing["value"]}
    assert props[name]["size"] == len(content)
    assert props[name]["lastModifiedTime"].endswith("Z")

    async with http.get(f"/files/{name}", params=LEGACY) as resp:
        assert resp.status == 200
        meta = await resp.json()
    assert meta["value"][0]["properties"]["filename"] == name

    # LlamaIndex asks without the prefix; LangChain quotes the full /mnt/data path.
    for path in (f"/files/content/{name}", f"/files/content//mnt/data/{name}"):
        async with http.get(path, params=LEGACY) as resp:
            assert resp.status == 200
            assert await resp.read() == content
            assert resp.headers["Last-Modified"]

    # The kernel sees the file where ACA puts it.
    props = await legacy_exec(http, f"open('/mnt/data/{name}').read()")
    assert props["result"] == content.decode()

    async with http.delete(f"/files/{name}", params=LEGACY) as resp:
        assert resp.status == 200
        assert (await resp.json())["message"] == "file deleted successfully"
    async with http.get(f"/files/content/{name}", params=LEGACY) as resp:
        assert_error(resp.status, await resp.json(), resp.headers, 404)


@pytest.mark.parametrize("path_param", [None, "/mnt/data"])
async def test_new_file_round_trip(http: aiohttp.ClientSession, path_param: str | None) -> None:
    name = unique("report") + ".csv"
    content = b"a,b\n1,2\n"
    params = dict(NEW) if path_param is None else {**NEW, "path": path_param}
    data, headers = multipart(name, content)
    async with http.post("/files", params=params, data=data, headers=headers) as resp:
        assert resp.status == 200, await resp.text()
        uploaded = await resp.json()
    assert uploaded["name"] == name
    assert uploaded["sizeInBytes"] == len(content)
    assert uploaded["type"] == "File"
    assert uploaded["contentType"] == "text/csv"
    assert uploaded["lastModifiedAt"].endswith("Z")

    async with http.get("/files", params=params) as resp:
        listing = await resp.json()
    assert listing["nextLink"] is None
    entries = {e["name"]: e for e in listing["value"]}
    assert entries[name]["sizeInBytes"] == len(content)

    async with http.get(f"/files/{name}", params=params) as resp:
        assert (await resp.json())["sizeInBytes"] == len(content)
    async with http.get(f"/files/{name}/content", params=params) as resp:
        assert resp.status == 200
        assert await resp.read() == content

    async with http.delete(f"/files/{name}", params=params) as resp:
        assert resp.status == 204
    async with http.get(f"/files/{name}", params=params) as resp:
        assert_error(resp.status, await resp.json(), resp.headers, 404)
    async with http.delete(f"/files/{name}", params=params) as resp:
        assert_error(resp.status, await resp.json(), resp.headers, 404)


async def test_subdirectories_and_recursive_listing(http: aiohttp.ClientSession) -> None:
    folder = unique("folder")
    data, headers = multipart("inner.yaml", b"k: v\n")
    params = {**NEW, "path": f"/mnt/data/{folder}/deeper"}
    async with http.post("/files", params=params, data=data, headers=headers) as resp:
        assert resp.status == 200
        assert (await resp.json())["directory"] == f"{folder}/deeper"

    async with http.get("/files", params=NEW) as resp:
        top = {e["name"]: e for e in (await resp.json())["value"]}
    assert top[folder]["type"] == "Directory"
    assert "inner.yaml" not in top

    async with http.get("/files", params={**NEW, "path": folder, "recursive": "true"}) as resp:
        deep = [(e["directory"], e["name"], e["type"]) for e in (await resp.json())["value"]]
    assert (f"{folder}/deeper", "inner.yaml", "File") in deep
    assert (folder, "deeper", "Directory") in deep

    async with http.get("/files/inner.yaml/content", params=params) as resp:
        assert await resp.read() == b"k: v\n"
    async with http.delete(f"/files/{folder}", params=NEW) as resp:
        assert resp.status == 204
    async with http.get("/files", params={**NEW, "path": folder}) as resp:
        assert resp.status == 404


async def test_file_written_by_code_can_be_listed_and_downloaded(
    http: aiohttp.ClientSession,
) -> None:
    name = unique("generated") + ".json"
    await legacy_exec(http, f"open('{name}', 'w').write('{{\"made\": \"by code\"}}')")
    async with http.get("/files", params=LEGACY) as resp:
        names = [v["properties"]["filename"] for v in (await resp.json())["value"]]
    assert name in names
    async with http.get(f"/files/{name}/content", params=NEW) as resp:
        assert await resp.json(content_type=None) == {"made": "by code"}


@pytest.mark.parametrize("path", ["/python/uploadFile", "/files/upload"])
async def test_upload_aliases_and_percent_encoded_names(
    http: aiohttp.ClientSession, path: str
) -> None:
    # aiohttp clients (AutoGen) percent-encode the file name on the wire.
    name = unique("über data") + ".txt"
    form = aiohttp.FormData()
    form.add_field("file", b"12345", filename=f"/mnt/data/{name}")
    async with http.post(path, params=LEGACY, data=form) as resp:
        assert resp.status == 200, await resp.text()
        assert (await resp.json())["value"][0]["properties"]["filename"] == name
    async with http.get(f"/files/{name}", params=NEW) as resp:
        assert (await resp.json())["sizeInBytes"] == 5


@pytest.mark.parametrize(
    "filename",
    ["../escape.txt", "/etc/escape.txt", "a/../../b.txt", "bad?name.txt", "bad*name", "..", ""],
)
async def test_bad_upload_names_are_400(http: aiohttp.ClientSession, filename: str) -> None:
    data, headers = multipart(filename, b"x")
    async with http.post("/files/upload", params=LEGACY, data=data, headers=headers) as resp:
        assert_error(resp.status, await resp.json(), resp.headers, 400)


@pytest.mark.parametrize(
    "raw_path",
    [
        "/files/..%2F..%2Fetc%2Fpasswd",
        "/files/%2e%2e",
        "/files/%2Fetc%2Fpasswd/content",
        "/files/content/..%2Fetc%2Fpasswd",
        "/files/a%00b",
        "/files/name%3Fwith%3Fquestion",
        "/files?path=..%2F..",
        "/files?path=%2Fetc",
    ],
)
async def test_bad_file_paths_are_400(
    http: aiohttp.ClientSession, base_url: str, raw_path: str
) -> None:
    sep = "&" if "?" in raw_path else "?"
    url = URL(f"{base_url}{raw_path}{sep}api-version=2025-10-02-preview", encoded=True)
    async with http.get(url) as resp:
        assert_error(resp.status, await resp.json(), resp.headers, 400)


async def test_upload_cap(http: aiohttp.ClientSession) -> None:
    name = unique("big") + ".bin"
    head, headers = multipart(name, b"")
    preamble, epilogue = head.split(b"\r\n--", 1)[0], b"\r\n--" + head.split(b"\r\n--", 1)[1]

    async def stream(size: int) -> AsyncIterator[bytes]:
        # Chunked, no Content-Length: the server must count while it writes.
        yield preamble
        chunk = b"\0" * MIB
        for _ in range(size // MIB):
            yield chunk
        yield b"\0" * (size % MIB)
        yield epilogue

    async with http.post(
        "/files/upload", params=LEGACY, data=stream(128 * MIB + 1), headers=headers
    ) as resp:
        assert_error(resp.status, await resp.json(), resp.headers, 413)
    async with http.get("/files", params=NEW) as resp:
        names = [e["name"] for e in (await resp.json())["value"]]
    assert name not in names
    assert not [n for n in names if n.startswith(".upload-")]

    async with http.post(
        "/files/upload", params=LEGACY, data=stream(128 * MIB), headers=headers
    ) as resp:
        assert resp.status == 200
        assert (await resp.json())["value"][0]["properties"]["size"] == 128 * MIB
    async with http.delete(f"/files/{name}", params=NEW) as resp:
        assert resp.status == 204


async def test_upload_without_file_part_is_400(http: aiohttp.ClientSession) -> None:
    form = aiohttp.FormData()
    form.add_field("not_a_file", "value")
    async with http.post("/files", params=NEW, data=form) as resp:
        assert_error(resp.status, await resp.json(), resp.headers, 400)
    async with http.post("/files", params=NEW, json={"file": "x"}) as resp:
        assert_error(resp.status, await resp.json(), resp.headers, 400)
