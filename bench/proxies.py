"""Starting the things under test: upstreams, the router, the bare proxy, nginx and CHP.

Each starter returns a `Proc` (whose CPU seconds are the proxy's) and the URL to load.
"""

from __future__ import annotations

import textwrap
import time
from pathlib import Path

from bench.common import BENCH, Proc, python, spawn, wait_port, which
from sessionpool.testing import unused_port, unused_ports

NGINX_MISSING = "nginx is not installed (apt-get install -y nginx-light)"
CHP = BENCH / "node_modules" / ".bin" / "configurable-http-proxy"


def _nginx_conf(workdir: Path, port: int, body: str) -> Path:
    for sub in ("client", "proxy", "fastcgi", "uwsgi", "scgi"):
        (workdir / sub).mkdir(parents=True, exist_ok=True)
    conf = workdir / "nginx.conf"
    conf.write_text(
        textwrap.dedent(f"""\
        daemon off;
        master_process on;
        worker_processes 1;
        user root;
        pid {workdir}/nginx.pid;
        error_log {workdir}/error.log error;
        events {{ worker_connections 20000; }}
        http {{
          access_log off;
          client_body_temp_path {workdir}/client;
          proxy_temp_path {workdir}/proxy;
          fastcgi_temp_path {workdir}/fastcgi;
          uwsgi_temp_path {workdir}/uwsgi;
          scgi_temp_path {workdir}/scgi;
          keepalive_requests 10000000;
          client_max_body_size 0;
          server {{
            listen 127.0.0.1:{port} reuseport;
        {textwrap.indent(body, "    ")}
          }}
        }}
        """)
    )
    return conf


def _nginx(name: str, workdir: Path, port: int, body: str) -> Proc:
    exe = which("nginx")
    if exe is None:
        raise FileNotFoundError(NGINX_MISSING)
    conf = _nginx_conf(workdir, port, body)
    proc = spawn(name, [exe, "-c", str(conf), "-p", str(workdir)])
    wait_port(port)
    return proc


def nginx_upstream(workdir: Path) -> tuple[Proc, str]:
    """nginx, one worker, answering every request with a 40-byte body."""
    port = unused_port()
    body = (
        "location / { default_type text/plain; "
        'return 200 "0123456789012345678901234567890123456789"; }'
    )
    return _nginx("nginx-upstream", workdir, port, body), f"127.0.0.1:{port}"


def nginx_proxy(workdir: Path, upstream: str) -> tuple[Proc, str]:
    """nginx proxy_pass, one worker, with upstream keep-alive."""
    port = unused_port()
    body = textwrap.dedent("""\
        location / {
          proxy_pass http://backend;
          proxy_http_version 1.1;
          proxy_set_header Connection "";
        }""")
    return _nginx_with_upstream(workdir, port, body, upstream), f"http://127.0.0.1:{port}"


def _nginx_with_upstream(workdir: Path, port: int, body: str, upstream: str) -> Proc:
    exe = which("nginx")
    if exe is None:
        raise FileNotFoundError(NGINX_MISSING)
    conf = _nginx_conf(workdir, port, body)
    text = conf.read_text().replace(
        "http {\n",
        f"http {{\n  upstream backend {{ server {upstream}; keepalive 512; "
        "keepalive_requests 10000000; }\n",
        1,
    )
    conf.write_text(text)
    proc = spawn("nginx-proxy", [exe, "-c", str(conf), "-p", str(workdir)])
    wait_port(port)
    return proc


def python_upstream(count: int, workdir: Path, log: Path | None = None) -> tuple[Proc, list[int]]:
    """bench/upstream.py on `count` ports (an aiohttp app: what a Python sandbox would be)."""
    workdir.mkdir(parents=True, exist_ok=True)
    ports_file = workdir / f"upstream-ports-{time.monotonic_ns()}"
    proc = spawn(
        "py-upstream", [python(), str(BENCH / "upstream.py"), str(count), str(ports_file)], log=log
    )
    deadline = time.monotonic() + 30
    while not ports_file.exists():
        if proc.popen.poll() is not None or time.monotonic() > deadline:
            proc.stop()
            raise RuntimeError(f"bench/upstream.py did not start (see {log})")
        time.sleep(0.02)
    return proc, [int(p) for p in ports_file.read_text().split()]


def echo_app(log: Path | None = None) -> tuple[Proc, str]:
    """sessionpool/demo/echo.py on the host: the session image's own app."""
    port = unused_port()
    proc = spawn(
        "echo-app",
        [python(), "sessionpool/demo/echo.py"],
        env={"HOST": "127.0.0.1", "PORT": str(port)},
        log=log,
    )
    wait_port(port)
    return proc, f"127.0.0.1:{port}"


def bare_proxy(upstream: str) -> tuple[Proc, str]:
    port = unused_port()
    proc = spawn("bare-aiohttp", [python(), str(BENCH / "bare_proxy.py"), str(port), upstream])
    wait_port(port)
    return proc, f"http://127.0.0.1:{port}"


def router(
    redis_url: str, prefix: str, log: Path | None = None, env: dict[str, str] | None = None
) -> tuple[Proc, str]:
    """The sessionpool router as a real process (`sessionpool router`, one process)."""
    port = unused_port()
    proc = spawn(
        "router",
        [
            python(),
            "-m",
            "sessionpool.cli",
            "router",
            "--port",
            str(port),
            "--redis-url",
            redis_url,
            "--key-prefix",
            prefix,
            "--auth",
            "none",
            "--log-level",
            "WARNING",
        ],
        env={"SESSIONPOOL_AUTH": "none", **(env or {})},
        log=log,
    )
    wait_port(port, timeout_s=30)
    return proc, f"http://127.0.0.1:{port}"


def chp_available() -> str | None:
    """None when configurable-http-proxy can run, else why not."""
    if which("node") is None:
        return "node is not installed"
    if not CHP.exists():
        return "not installed: npm install --prefix bench (see bench/README.md)"
    return None


def chp(upstream: str) -> tuple[Proc, str]:
    """configurable-http-proxy (Node, one process) with a default target."""
    port, api = unused_ports(2)
    proc = spawn(
        "chp",
        [
            str(CHP),
            "--ip",
            "127.0.0.1",
            "--port",
            str(port),
            "--api-ip",
            "127.0.0.1",
            "--api-port",
            str(api),
            "--default-target",
            f"http://{upstream}",
            "--log-level",
            "error",
            "--no-x-forward",
        ],
        env={"CONFIGPROXY_AUTH_TOKEN": "bench"},
    )
    wait_port(port)
    return proc, f"http://127.0.0.1:{port}"
