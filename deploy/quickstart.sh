#!/usr/bin/env bash
# The README's two commands on a fresh Debian/Ubuntu machine with Python >= 3.11:
#
#   bash deploy/quickstart.sh up      # the whole stack with a demo pool, in the foreground
#   bash deploy/quickstart.sh test    # the test suite (real Redis, real Docker)
#
# Installs what is missing (Redis, a Docker engine, mmdebstrap) when run as root, makes a
# virtual environment in .venv with sessionpool and its dev dependencies, starts dockerd if
# no engine answers, builds the session images without any registry, then runs the command.
# Extra arguments go to `sessionpool up` or to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
cmd="${1:-}"; shift || true
case "$cmd" in up|test|setup) ;; *) echo "usage: $0 up|test|setup [args...]" >&2; exit 2 ;; esac

need=()
command -v redis-server >/dev/null || need+=(redis-server)
command -v redis-cli >/dev/null || need+=(redis-tools)  # test_redis_cluster makes a cluster
command -v dockerd >/dev/null || need+=(docker.io)
command -v mmdebstrap >/dev/null || need+=(mmdebstrap)
command -v iptables >/dev/null || need+=(iptables)
command -v bwrap >/dev/null || need+=(bubblewrap)
if [[ $cmd == test ]]; then  # the deployment test and the benchmark smoke run
  command -v docker-compose >/dev/null || need+=(docker-compose)
  command -v wrk >/dev/null || need+=(wrk)
  command -v ip >/dev/null || need+=(iproute2)  # the containment tests' outside host (netns)
  command -v nginx >/dev/null || need+=(nginx-light)
fi
python3 -c 'import venv, ensurepip' 2>/dev/null || need+=(python3-venv)
if [[ ${#need[@]} -gt 0 ]]; then
  if [[ $(id -u) -eq 0 ]]; then
    echo "quickstart: installing ${need[*]}" >&2
    apt-get update -q >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${need[@]}" >/dev/null
  else
    echo "quickstart: missing ${need[*]}; run as root or install them" >&2
  fi
fi

if [[ ! -x .venv/bin/python ]]; then
  python3 -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip >/dev/null
extras=dev
[[ $cmd == test ]] && extras=dev,clients  # the client libraries the tests drive
.venv/bin/python -m pip install -q -e ".[$extras]"

if [[ $cmd == test ]] && command -v npm >/dev/null && [[ ! -d bench/node_modules ]]; then
  # configurable-http-proxy, an anchor of the benchmarks (they say "not run" without it)
  (cd bench && npm install --no-audit --no-fund --silent >/dev/null 2>&1) \
    || echo "quickstart: npm install in bench/ failed; the CHP benchmark will not run" >&2
fi

if ! docker info >/dev/null 2>&1; then
  if [[ $(id -u) -eq 0 ]] && command -v dockerd >/dev/null; then
    echo "quickstart: starting dockerd" >&2
    nohup dockerd >/var/log/sessionpool-dockerd.log 2>&1 &
    for _ in $(seq 1 60); do docker info >/dev/null 2>&1 && break; sleep 0.5; done
  fi
fi
if docker info >/dev/null 2>&1; then
  # `up` needs only the demo's echo image; the tests use every image.
  if [[ $cmd == up ]]; then bash deploy/images/build.sh echo; else bash deploy/images/build.sh; fi
else
  echo "quickstart: no Docker engine; only the process runtime is available" >&2
fi

case "$cmd" in
  up) exec .venv/bin/sessionpool up "$@" ;;
  test) exec .venv/bin/python -m pytest "$@" ;;
  setup) ;;
esac
