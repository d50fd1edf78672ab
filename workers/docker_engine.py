"""The Docker engine connection shared by the docker runtime's modules: client and errors."""

from __future__ import annotations

import contextlib
from typing import Any

import docker
from docker.errors import APIError, DockerException

from router.errors import SandboxRuntimeError

# requests' connection errors (engine down) are OSErrors, not DockerExceptions.
ENGINE_ERRORS = (DockerException, OSError)
# Kept-alive connections to the engine: parallel creates and destroys each hold one (the SDK's
# default of 10 would make the rest open and drop a connection per call).
ENGINE_CONNECTIONS = 32


def connect(base_url: str | None) -> Any:
    """A blocking SDK client (making one asks the engine for its version): run it in a thread.

    Raises:
        SandboxRuntimeError: the engine is unreachable.
    """
    try:
        if base_url:
            return docker.DockerClient(base_url=base_url, max_pool_size=ENGINE_CONNECTIONS)
        return docker.from_env(max_pool_size=ENGINE_CONNECTIONS)
    except ENGINE_ERRORS as exc:
        raise SandboxRuntimeError(f"docker engine unreachable: {explain(exc)}") from exc


def is_local(client: Any) -> bool:
    """Whether the engine listens on this host's unix socket (so its iptables are ours)."""
    return str(getattr(client.api, "base_url", "")).startswith("http+docker://")


def close_stream(stream: Any) -> None:
    with contextlib.suppress(*ENGINE_ERRORS, AttributeError):
        stream.close()


def explain(exc: BaseException) -> str:
    """The engine's own explanation of an error, else the exception's text."""
    if isinstance(exc, APIError) and exc.explanation:
        return str(exc.explanation)
    return str(exc) or type(exc).__name__
