"""The events of a pool's work stream (`P:events:{p}`, field `data`), typed, with encode/decode.

The Lua scripts write `allocated`, `pool-empty` and `teardown` themselves (same shapes);
Python writes through `encode`. Workers read them with `decode`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, ClassVar

import orjson


@dataclass(frozen=True, slots=True)
class Teardown:
    """A sandbox must be destroyed and its record forgotten."""

    kind: ClassVar[str] = "teardown"
    sandbox: str
    reason: str
    container: str = ""  # empty: look it up (record, then the runtime)
    identifier: str = ""  # the session it served, if any


@dataclass(frozen=True, slots=True)
class Allocated:
    """A ready sandbox was handed to a session (the replenisher refills)."""

    kind: ClassVar[str] = "allocated"
    sandbox: str
    identifier: str


@dataclass(frozen=True, slots=True)
class PoolEmpty:
    """A request found no ready sandbox (rate-limited; the replenisher refills)."""

    kind: ClassVar[str] = "pool-empty"


@dataclass(frozen=True, slots=True)
class PoolChanged:
    """The pool definition was created or updated."""

    kind: ClassVar[str] = "pool-changed"


@dataclass(frozen=True, slots=True)
class PoolDeleted:
    """The pool definition was deleted."""

    kind: ClassVar[str] = "pool-deleted"


Event = Teardown | Allocated | PoolEmpty | PoolChanged | PoolDeleted
_KINDS: dict[str, type[Event]] = {
    cls.kind: cls for cls in (Teardown, Allocated, PoolEmpty, PoolChanged, PoolDeleted)
}


def encode(event: Event) -> bytes:
    """The `data` field of the stream entry."""
    return orjson.dumps({"kind": event.kind, **asdict(event)})


def decode(raw: bytes | str | None) -> Event | None:
    """The event in a `data` field; None when it is malformed or of a kind this version does
    not know (a newer writer), so that readers skip it instead of failing the batch."""
    if not raw:
        return None
    try:
        doc: Any = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    cls = _KINDS.get(str(doc.get("kind"))) if isinstance(doc, dict) else None
    if cls is None:
        return None
    try:
        return cls(**{k: str(v) for k, v in doc.items() if k != "kind"})
    except TypeError:  # missing or unexpected fields
        return None
