"""The platform MCP endpoint's tools: environments are the pool's sessions, reached through the
router's own allocation, activity and limits.

An environment is what `launchShell` names: an identifier of the pool, recorded in the store as
"new" and allocated lazily, on its first command, as ACA does. From then on it is "live" for as
long as its session is: once the session ends (stopped, idle past its cooldown, deleted), the
environment is gone and calls naming it are refused rather than silently given a fresh session.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson
from mcp_types import (
    INTERNAL_ERROR,
    INVALID_PARAMS,
    CallToolResult,
    ImageContent,
    TextContent,
    Tool,
    ToolAnnotations,
)

from router.errors import (
    NoReadySessionError,
    SessionLimitError,
    SessionUnreachableError,
)
from router.identifiers import IDENTIFIER, session_key
from router.pools import Pool
from router.routing import Routing

# An unused environment lives one cooldown; a live one as long as its session, and its record
# is refreshed on every call (a day covers the gap between two calls many times over).
LIVE_ENV_TTL_S = 86_400
# Environments launched and not used yet, per pool (or maxConcurrentSessions, if more): each is
# a Redis record for one cooldown, so a caller looping on launchShell is refused past this
# instead of filling Redis.
MAX_UNUSED_ENVIRONMENTS = 1000
EXECUTIONS_API_VERSION = "2025-02-02-preview"
# Above the session's own execution cap (220 s), so the session reports a timeout itself.
EXECUTION_TIMEOUT_S = 240.0
MAX_CODE_CHARS = 1 << 20
# An answer is stdout, stderr and a result, each already cut short by the session's server;
# a hostile session that sends more costs the router no more than this.
MAX_ANSWER_BYTES = 64 << 20
# Implementation-defined JSON-RPC server errors (MCP leaves -32000..-32019 to servers).
ENVIRONMENT_GONE = -32001
SESSION_UNAVAILABLE = -32002

_ENV_ID = {"type": "string", "description": "The environmentId that launchShell returned."}
_OUTPUT = {"stdout": {"type": "string"}, "stderr": {"type": "string"}}

LAUNCH = Tool(
    name="launchShell",
    title="Launch an environment",
    description=(
        "Create a new sandboxed environment and return its environmentId. Pass that id to the "
        "other tools; the environment keeps its state (files, variables) between calls until "
        "it has been idle for the pool's cooldown."
    ),
    input_schema={"type": "object", "properties": {}, "additionalProperties": False},
    output_schema={
        "type": "object",
        "properties": {"environmentId": {"type": "string"}},
        "required": ["environmentId"],
    },
    annotations=ToolAnnotations(destructive_hint=False, open_world_hint=False),
)


def _run_tool(
    name: str,
    title: str,
    description: str,
    argument: tuple[str, str],
    output: dict[str, Any],
    required_output: str,
) -> Tool:
    """A tool that runs one string `argument` (name, description) in an environment."""
    arg, arg_doc = argument
    return Tool(
        name=name,
        title=title,
        description=description,
        input_schema={
            "type": "object",
            "properties": {
                "environmentId": _ENV_ID,
                arg: {"type": "string", "description": arg_doc},
            },
            "required": ["environmentId", arg],
            "additionalProperties": False,
        },
        output_schema={
            "type": "object",
            "properties": {**_OUTPUT, **output},
            "required": ["stdout", "stderr", required_output],
        },
        annotations=ToolAnnotations(destructive_hint=True, open_world_hint=True),
    )


RUN_PYTHON = _run_tool(
    "runPythonCodeInRemoteEnvironment",
    "Run Python code",
    "Run Python code in an environment's Jupyter kernel (variables persist between calls). "
    "Returns stdout, stderr and the value of the last expression; a matplotlib figure left "
    "open comes back as a PNG image.",
    ("pythonCode", "The Python code to run."),
    {"result": {}, "status": {"type": "string"}},
    "status",
)
RUN_SHELL = _run_tool(
    "runShellCommandInRemoteEnvironment",
    "Run a shell command",
    "Run a command with bash in an environment (working directory /mnt/data). Returns "
    "stdout, stderr and the exit code.",
    ("shellCommand", "The command line to run."),
    {"exitCode": {"type": ["integer", "null"]}},
    "exitCode",
)


class ToolError(Exception):
    """A tool call that gets a JSON-RPC error instead of a result."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def tools_for(pool: Pool) -> list[Tool]:
    """Shell pools offer `launchShell` and the shell tool only."""
    if pool.container_type == "PythonLTS":
        return [LAUNCH, RUN_PYTHON, RUN_SHELL]
    return [LAUNCH, RUN_SHELL]


@dataclass(frozen=True, slots=True)
class Environments:
    """Runs the tools of one pool for one caller (`principal`, for tenant binding)."""

    routing: Routing
    client: aiohttp.ClientSession
    pool: Pool
    principal: str

    async def call(self, name: str, arguments: dict[str, Any]) -> CallToolResult:
        """Run tool `name`.

        Raises:
            ToolError: unknown tool, bad arguments, unknown or ended environment, or no
                session to run on (pool at its limit, none ready, unreachable).
        """
        if name not in {t.name for t in tools_for(self.pool)}:
            raise ToolError(INVALID_PARAMS, f"Unknown tool: {name!r}.")
        if name == LAUNCH.name:
            _check_arguments(arguments, set())
            return await self._launch()
        if name == RUN_PYTHON.name:
            env, code = _check_arguments(arguments, {"environmentId", "pythonCode"})
            body = {"codeInputType": "Inline", "executionType": "Synchronous", "code": code}
            return _python_result(await self._execute(env, body))
        env, command = _check_arguments(arguments, {"environmentId", "shellCommand"})
        return _shell_result(await self._execute(env, {"shellCommand": command}))

    async def _launch(self) -> CallToolResult:
        env = str(uuid.uuid4())
        pool = self.pool
        cap = max(MAX_UNUSED_ENVIRONMENTS, pool.max_sessions)
        if not await self.routing.store.launch_mcp_env(pool.name, env, pool.cooldown_s, cap):
            raise ToolError(
                SESSION_UNAVAILABLE,
                f"Pool {pool.name!r} has {cap} environments launched and not used yet: run a "
                f"command in one of them, or launch again once unused ones have expired "
                f"({pool.cooldown_s} s after their launch).",
            )
        return CallToolResult(
            content=[TextContent(text=orjson.dumps({"environmentId": env}).decode())],
            structured_content={"environmentId": env},
        )

    async def _execute(self, env: str, body: dict[str, Any]) -> dict[str, Any]:
        store, pool = self.routing.store, self.pool
        state = await store.mcp_env(pool.name, env)
        if state is None:
            raise ToolError(
                ENVIRONMENT_GONE,
                f"Unknown environment {env!r}: it was never launched, or it expired unused. "
                "Call launchShell for a new one.",
            )
        owner = self.principal if pool.tenant_binding else None
        if state == "live" and await store.get_session(pool.name, session_key(env, owner)) is None:
            await store.delete_mcp_env(pool.name, env)
            raise ToolError(
                ENVIRONMENT_GONE,
                f"Environment {env!r} has ended (stopped, or idle past the pool's cooldown); "
                "its state is gone. Call launchShell for a new one.",
            )
        try:
            async with self.routing.lease(pool, env, self.principal) as lease:
                await store.set_mcp_env_live(pool.name, env, LIVE_ENV_TTL_S)
                raw, status = await self._post(lease.session.addr, env, body)
        except (SessionLimitError, NoReadySessionError, SessionUnreachableError) as exc:
            raise ToolError(SESSION_UNAVAILABLE, exc.message) from None
        try:
            answer = orjson.loads(raw)
        except orjson.JSONDecodeError:
            answer = None
        if not isinstance(answer, dict):
            raise ToolError(INTERNAL_ERROR, f"The session answered {status} without a result.")
        if status != 200:
            error = answer.get("error")
            message = error.get("message") if isinstance(error, dict) else None
            raise ToolError(INVALID_PARAMS, f"The session refused the call: {message or status}")
        return answer

    async def _post(self, addr: str, env: str, body: dict[str, Any]) -> tuple[bytes, int]:
        """One execution on the session's own executions API.

        Raises:
            SessionUnreachableError: the sandbox refused, dropped or did not answer (the lease
                then forgets its route).
        """
        try:
            async with self.client.post(
                f"http://{addr}/executions",
                params={"api-version": EXECUTIONS_API_VERSION, "identifier": env},
                json=body,
                headers={"Accept-Encoding": "identity"},
                timeout=aiohttp.ClientTimeout(total=EXECUTION_TIMEOUT_S),
            ) as resp:
                raw = bytearray()
                async for chunk in resp.content.iter_any():
                    raw += chunk
                    if len(raw) > MAX_ANSWER_BYTES:  # the session's code is not trusted
                        raise ToolError(
                            INTERNAL_ERROR,
                            f"The session's answer is larger than {MAX_ANSWER_BYTES} bytes.",
                        )
                return bytes(raw), resp.status
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise SessionUnreachableError(
                f"The environment's session did not answer: {type(exc).__name__}"
            ) from None


def _check_arguments(arguments: dict[str, Any], names: set[str]) -> tuple[str, str]:
    """The (environmentId, code or command) of a run call; nothing for launchShell.

    Raises:
        ToolError: a missing, extra or mistyped argument, or a malformed environment id.
    """
    extra = sorted(set(arguments) - names)
    if extra:
        raise ToolError(INVALID_PARAMS, f"Unexpected argument {extra[0]!r}.")
    if not names:
        return "", ""
    for name in sorted(names):
        if not isinstance(arguments.get(name), str):
            raise ToolError(INVALID_PARAMS, f"Argument {name!r} is required and must be a string.")
    env = arguments["environmentId"]
    if not IDENTIFIER.fullmatch(env):
        raise ToolError(INVALID_PARAMS, f"environmentId {env!r} is not an environment id.")
    (text,) = (arguments[n] for n in names if n != "environmentId")
    if not text.strip():
        raise ToolError(INVALID_PARAMS, "The code or command to run is empty.")
    if len(text) > MAX_CODE_CHARS:
        raise ToolError(INVALID_PARAMS, f"The code or command is over {MAX_CODE_CHARS} characters.")
    return env, text


def _output(answer: dict[str, Any]) -> dict[str, Any]:
    result = answer.get("result")
    result = result if isinstance(result, dict) else {}
    return {"stdout": str(result.get("stdout", "")), "stderr": str(result.get("stderr", ""))}


def _python_result(answer: dict[str, Any]) -> CallToolResult:
    out = _output(answer)
    result = answer.get("result")
    value = result.get("executionResult") if isinstance(result, dict) else None
    status = str(answer.get("status", ""))
    structured: dict[str, Any] = {**out, "result": value, "status": status}
    content: list[TextContent | ImageContent] = []
    if isinstance(value, dict) and value.get("type") == "image" and "base64_data" in value:
        content.append(ImageContent(data=str(value["base64_data"]), mime_type="image/png"))
        shown = {**structured, "result": {"type": "image", "format": "png"}}
    else:
        shown = structured
    error = answer.get("error")
    if isinstance(error, dict):
        structured["error"] = shown["error"] = error
    content.insert(0, TextContent(text=orjson.dumps(shown).decode()))
    return CallToolResult(
        content=list(content), structured_content=structured, is_error=status == "Failed"
    )


def _shell_result(answer: dict[str, Any]) -> CallToolResult:
    code = answer.get("exitCode")
    structured = {**_output(answer), "exitCode": code if isinstance(code, int) else None}
    return CallToolResult(
        content=[TextContent(text=orjson.dumps(structured).decode())],
        structured_content=structured,
    )
