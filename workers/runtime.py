"""The small interface every runtime (docker, process) implements for the workers."""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import Protocol

from router.pools import Pool

# Labels every sandbox container carries; `scope` is the deployment's key prefix, so two
# deployments (or two tests) sharing one engine never touch each other's sandboxes.
LABEL_PREFIX = "io.sessionpool."
LABEL_SCOPE = LABEL_PREFIX + "scope"
LABEL_POOL = LABEL_PREFIX + "pool"
LABEL_SANDBOX = LABEL_PREFIX + "sandbox"
LABEL_VERSION = LABEL_PREFIX + "version"


@dataclass(frozen=True, slots=True)
class SandboxSpec:
    """What to start: the pool's template, resolved secrets, and identity labels."""

    scope: str
    pool: Pool
    sandbox_id: str
    env: dict[str, str] = field(default_factory=dict)  # secretRefs already resolved

    @property
    def labels(self) -> dict[str, str]:
        """The identity labels its container (or pod) carries."""
        return {
            LABEL_SCOPE: self.scope,
            LABEL_POOL: self.pool.name,
            LABEL_SANDBOX: self.sandbox_id,
            LABEL_VERSION: self.pool.version,
        }

    def owns(self, labels: Mapping[str, str]) -> bool:
        """Whether a container with these labels is this sandbox (a retried create's)."""
        return (
            labels.get(LABEL_SCOPE) == self.scope and labels.get(LABEL_SANDBOX) == self.sandbox_id
        )


@dataclass(frozen=True, slots=True)
class Handle:
    """A started sandbox: its container id and the host:port the router dials."""

    container: str
    addr: str


@dataclass(frozen=True, slots=True)
class Observed:
    """A sandbox as the runtime sees it (for reconciliation)."""

    container: str
    pool: str
    sandbox_id: str
    version: str
    running: bool  # not exited: created, running, paused and restarting all count
    created_s: float  # unix time

    @classmethod
    def of(
        cls, container: str, labels: Mapping[str, str], *, running: bool, created_s: float
    ) -> Observed:
        """A sandbox read back from its identity labels."""
        return cls(
            container=container,
            pool=labels.get(LABEL_POOL, ""),
            sandbox_id=labels.get(LABEL_SANDBOX, ""),
            version=labels.get(LABEL_VERSION, ""),
            running=running,
            created_s=created_s,
        )


@dataclass(frozen=True, slots=True)
class Exit:
    """A sandbox container stopped on its own (or was killed from outside)."""

    container: str
    pool: str
    sandbox_id: str

    @classmethod
    def of(cls, container: str, labels: Mapping[str, str]) -> Exit:
        """The exit of the sandbox these identity labels name."""
        return cls(container, labels.get(LABEL_POOL, ""), labels.get(LABEL_SANDBOX, ""))


class Runtime(Protocol):
    """Where sandboxes run. Every method is safe to call concurrently and idempotent."""

    name: str

    async def create(self, spec: SandboxSpec) -> Handle:
        """Create and start a sandbox; return once it is started (not yet probed).

        Raises:
            SandboxRuntimeError: the image is missing, the engine refused, ...
        """
        ...

    async def destroy(self, container: str) -> None:
        """Stop and remove a sandbox; a sandbox that is already gone is not an error."""
        ...

    async def list(self, scope: str) -> list[Observed]:
        """Every sandbox of this scope, running or not."""
        ...

    def exits(self, scope: str) -> AsyncIterator[Exit]:
        """Sandboxes of this scope that stop, as they stop (ends when the runtime closes)."""
        ...

    async def engine_id(self) -> str:
        """Which engine this runtime's sandboxes live on, stable across restarts (written into
        each sandbox record, so reconciliation never takes another engine's sandbox for lost).

        Raises:
            SandboxRuntimeError: the engine is unreachable.
        """
        ...

    async def close(self) -> None: ...
