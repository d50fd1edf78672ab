"""Sandbox limits: what a pool gets when it names none, and what no pool may exceed.

Every sandbox has a CPU, memory, pids and writable-storage limit, always. A pool's
`resources.cpu`, `resources.memory`, `resources.ephemeralStorage` and
`sandboxConfiguration.pidsLimit` are optional: what a pool leaves out is the operator's
default (`sandbox_default_*`), and what a pool asks for may not exceed the operator's maximum
(`sandbox_max_*`; a definition above it is refused with 400 naming the field). The defaults
let a shared 2-core host survive a hostile session; ACA's own ranges for custom containers are
0.25-2 CPU and 0.5-4 GiB of memory.

When the runtime backs writable storage with tmpfs (see `workers/docker_storage.py`), what a
session writes counts toward its memory limit too: a pool that names no storage gets at most
half its memory, so a full disk is ENOSPC before it is an OOM kill.
"""

from __future__ import annotations

from dataclasses import dataclass

from router.errors import InvalidPoolError
from router.pools import Pool
from router.settings import GiB, MiB, Settings

CONTAINER = "properties.customContainerTemplate.containers[0]"


@dataclass(frozen=True, slots=True)
class Limits:
    """The limits of one sandbox."""

    cpu: float
    memory_bytes: int
    pids: int
    storage_bytes: int


DEFAULT = Limits(cpu=1.0, memory_bytes=1 * GiB, pids=256, storage_bytes=512 * MiB)
MAXIMUM = Limits(cpu=2.0, memory_bytes=4 * GiB, pids=4096, storage_bytes=4 * GiB)


@dataclass(frozen=True, slots=True)
class LimitPolicy:
    """The operator's defaults and maximums (`sandbox_default_*`, `sandbox_max_*`)."""

    default: Limits = DEFAULT
    maximum: Limits = MAXIMUM

    def __post_init__(self) -> None:
        for name in Limits.__slots__:
            default, maximum = getattr(self.default, name), getattr(self.maximum, name)
            if not 0 < default <= maximum:
                raise ValueError(
                    f"sandbox_default_{name}: must be positive and at most "
                    f"sandbox_max_{name} ({maximum})"
                )

    @classmethod
    def from_settings(cls, settings: Settings) -> LimitPolicy:
        return cls(
            default=Limits(
                cpu=settings.sandbox_default_cpu,
                memory_bytes=settings.sandbox_default_memory_bytes,
                pids=settings.sandbox_default_pids,
                storage_bytes=settings.sandbox_default_storage_bytes,
            ),
            maximum=Limits(
                cpu=settings.sandbox_max_cpu,
                memory_bytes=settings.sandbox_max_memory_bytes,
                pids=settings.sandbox_max_pids,
                storage_bytes=settings.sandbox_max_storage_bytes,
            ),
        )

    def check(self, pool: Pool) -> None:
        """Refuse a pool that asks for more than this deployment allows.

        Raises:
            InvalidPoolError: names the field, the value and the maximum.
        """
        asked = (
            ("cpu", pool.cpu, f"{CONTAINER}.resources.cpu"),
            ("memory_bytes", pool.memory_bytes, f"{CONTAINER}.resources.memory"),
            ("storage_bytes", pool.storage_bytes, f"{CONTAINER}.resources.ephemeralStorage"),
            ("pids", pool.pids_limit, "properties.sandboxConfiguration.pidsLimit"),
        )
        for name, value, field in asked:
            most = getattr(self.maximum, name)
            if value is not None and value > most:
                raise InvalidPoolError(
                    f"{field}: {_show(name, value)} is above this deployment's maximum "
                    f"{_show(name, most)} (sandbox_max_{name})"
                )

    def resolve(self, pool: Pool) -> Limits:
        """The limits a sandbox of `pool` runs with: its own, else the defaults, never above
        the maximums (a pool stored before the operator lowered a maximum is held to it)."""
        memory = pool.memory_bytes or self.default.memory_bytes
        storage = pool.storage_bytes or min(self.default.storage_bytes, memory // 2)
        return Limits(
            cpu=min(pool.cpu or self.default.cpu, self.maximum.cpu),
            memory_bytes=min(memory, self.maximum.memory_bytes),
            pids=min(pool.pids_limit or self.default.pids, self.maximum.pids),
            storage_bytes=min(storage, self.maximum.storage_bytes),
        )


def _show(name: str, value: float) -> str:
    if name.endswith("_bytes"):
        return f"{value / MiB:g}Mi"
    return f"{value:g}"
