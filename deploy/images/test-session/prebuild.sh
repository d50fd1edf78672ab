#!/usr/bin/env bash
# Run by build.sh before `docker build`: the echo app lives in the package (sessionpool/demo/,
# so `sessionpool up --runtime process` finds it in a wheel); copy it into the build context.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
cp "$here/../../../sessionpool/demo/echo.py" "$here/echo.py"
