#!/usr/bin/env bash
# Run by build.sh before `docker build`: the wheelhouse this image installs with --no-index.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
exec bash "$here/../app-build.sh" "$here/wheels"
