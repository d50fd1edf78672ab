"""Entry point: `python3 -m session_server` (settings from the environment)."""

from __future__ import annotations

import logging

from aiohttp import web

from .app import create_app
from .settings import Settings


def main() -> None:
    """Serve until SIGINT/SIGTERM."""
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    settings = Settings.from_env()
    web.run_app(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        access_log=None,
        print=None,
        # Let a running execution's response be written before the kernel is stopped.
        shutdown_timeout=5.0,
    )


if __name__ == "__main__":
    main()
