"""The echo app (sessionpool/demo/echo.py) as a process-runtime sandbox. Every process shares
the host's name, so this one answers with its pid as `hostname` (`pid-<pid>`)."""

from __future__ import annotations

import os

from sessionpool.demo import echo

if __name__ == "__main__":
    echo.HOSTNAME = f"pid-{os.getpid()}"
    echo.main()
