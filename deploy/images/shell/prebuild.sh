#!/usr/bin/env bash
# Run by build.sh before `docker build`: the build context gets a copy of the code
# interpreter's session_server package, which this image runs in its shell-only mode (one
# server, two images).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
rm -rf "$here/session_server"
cp -r "$here/../code-interpreter/session_server" "$here/session_server"
find "$here/session_server" -name __pycache__ -prune -exec rm -rf {} +
