"""Settings of the code interpreter server, read once from the environment."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

MIB = 1024 * 1024


@dataclass(frozen=True)
class Settings:
    """Everything the server can be configured with.

    Only `Settings.from_env()` reads the environment; the rest of the server is handed an
    instance.
    """

    # "python": the code interpreter (a Jupyter kernel, and shell commands too); "shell": a
    # Shell session, shell commands and files only, no kernel (the shell image has none).
    mode: str = "python"
    host: str = "0.0.0.0"
    port: int = 6000
    data_dir: Path = Path("/mnt/data")
    max_upload_bytes: int = 128 * MIB
    max_json_body_bytes: int = 16 * MIB
    default_timeout_s: int = 60
    max_timeout_s: int = 220
    default_output_length: int = 4096
    max_output_length: int = 16 * MIB
    # How long an interrupted kernel may take to stop before it is restarted (state lost).
    interrupt_grace_s: float = 5.0
    kernel_start_timeout_s: float = 60.0
    # Imported once when the kernel starts so that the first `import pandas` is instant.
    preload_modules: tuple[str, ...] = ("numpy", "pandas", "matplotlib.pyplot")
    # Finished executions kept for `GET /executions/{id}`; running ones are never dropped.
    retained_executions: int = 256
    session_guid: str = field(default_factory=lambda: os.uname().nodename)

    def __post_init__(self) -> None:
        if self.mode not in ("python", "shell"):
            raise ValueError(f"mode must be python or shell: {self.mode!r}")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port out of range: {self.port}")
        if self.max_upload_bytes <= 0 or self.max_json_body_bytes <= 0:
            raise ValueError("body limits must be positive")
        if not 1 <= self.default_timeout_s <= self.max_timeout_s:
            raise ValueError("default_timeout_s must be within 1..max_timeout_s")
        if not 1 <= self.default_output_length <= self.max_output_length:
            raise ValueError("default_output_length must be within 1..max_output_length")
        if self.interrupt_grace_s <= 0 or self.kernel_start_timeout_s <= 0:
            raise ValueError("grace and start timeouts must be positive")
        if self.retained_executions < 1:
            raise ValueError("retained_executions must be at least 1")

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        """Build settings from `PORT`, `HOST` and `CODE_INTERPRETER_*` variables
        (`CODE_INTERPRETER_MODE=shell` for a Shell session).

        Raises:
            ValueError: a variable does not parse or is out of range.
        """
        env = os.environ if env is None else env
        defaults = cls()
        prefix = "CODE_INTERPRETER_"

        def get(name: str, default: str) -> str:
            return env.get(prefix + name, default)

        preload = get("PRELOAD_MODULES", ",".join(defaults.preload_modules))
        return cls(
            mode=get("MODE", defaults.mode),
            host=env.get("HOST", defaults.host),
            port=int(env.get("PORT", str(defaults.port))),
            data_dir=Path(get("DATA_DIR", str(defaults.data_dir))),
            max_upload_bytes=int(get("MAX_UPLOAD_BYTES", str(defaults.max_upload_bytes))),
            default_timeout_s=int(get("DEFAULT_TIMEOUT_S", str(defaults.default_timeout_s))),
            max_timeout_s=int(get("MAX_TIMEOUT_S", str(defaults.max_timeout_s))),
            default_output_length=int(
                get("DEFAULT_OUTPUT_LENGTH", str(defaults.default_output_length))
            ),
            interrupt_grace_s=float(get("INTERRUPT_GRACE_S", str(defaults.interrupt_grace_s))),
            preload_modules=tuple(m.strip() for m in preload.split(",") if m.strip()),
        )
