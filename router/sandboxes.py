"""Sandbox records as the Lua scripts keep them (`P:sandboxes:{p}`), typed.

A sandbox goes `warming` → `ready` → `allocated` → `stopping` (or `warming`/`ready` →
`stopping` when retired); its record is deleted once its container is gone.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any

import orjson


class SandboxState(enum.StrEnum):
    WARMING = "warming"
    READY = "ready"
    ALLOCATED = "allocated"
    STOPPING = "stopping"


@dataclass(frozen=True, slots=True)
class Sandbox:
    """One sandbox record. Times are Redis `TIME` in ms; absent ones are None."""

    id: str
    state: SandboxState
    version: str = ""
    worker: str = ""  # the replenisher that reserved it
    engine: str = ""  # which engine runs its container (set with it; empty on old records)
    container: str = ""
    addr: str = ""  # host:port the router dials
    identifier: str = ""  # the session it serves, once allocated
    reason: str = ""  # why it is stopping
    created_ms: int = 0
    ready_ms: int | None = None
    allocated_ms: int | None = None
    stopping_ms: int | None = None

    @property
    def live(self) -> bool:
        """Ready or allocated: its container should be running."""
        return self.state in (SandboxState.READY, SandboxState.ALLOCATED)

    @classmethod
    def loads(cls, sandbox_id: str, raw: bytes | str) -> Sandbox:
        """The record as stored (JSON written by the Lua scripts).

        Raises:
            ValueError: the record is not JSON or names an unknown state.
        """
        d: dict[str, Any] = orjson.loads(raw)
        return cls(
            id=sandbox_id,
            state=SandboxState(str(d.get("state"))),
            version=str(d.get("version") or ""),
            worker=str(d.get("worker") or ""),
            engine=str(d.get("engine") or ""),
            container=str(d.get("container") or ""),
            addr=str(d.get("addr") or ""),
            identifier=str(d.get("identifier") or ""),
            reason=str(d.get("reason") or ""),
            created_ms=int(d.get("createdAt") or 0),
            ready_ms=_ms(d.get("readyAt")),
            allocated_ms=_ms(d.get("allocatedAt")),
            stopping_ms=_ms(d.get("stoppingAt")),
        )


def _ms(value: Any) -> int | None:
    return None if value is None else int(value)


class MarkReady(enum.Enum):
    """What MARK_READY answered."""

    READY = 1  # in the ready set now
    GONE = 0  # no record, or not warming any more (cancelled meanwhile)
    REPLACED = -1  # the pool was deleted or its template changed: destroy and forget it
