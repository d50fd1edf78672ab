#!/usr/bin/env bash
# The wheelhouse of the router and worker images, made on the host so that `docker build` needs
# no network: sessionpool's own wheel, every dependency as a binary wheel for the image's
# Python (version, machine and glibc read from the base image), and pip's wheel to install them.
#
#   deploy/images/app-build.sh DEST      (run by app/prebuild.sh)
#
# BASE=<image> names the base the wheels must fit (default: this host's Python). The package
# index is whatever pip on this host is configured to use. SESSIONPOOL_PYTHON picks the Python
# whose pip is used (default: the repository's .venv, else python3, else a throwaway venv).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
dest="${1:?usage: app-build.sh DEST}"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

python=""
for candidate in "${SESSIONPOOL_PYTHON:-}" "$root/.venv/bin/python" python3; do
  if [[ -n "$candidate" ]] && "$candidate" -m pip --version >/dev/null 2>&1; then
    python="$candidate"
    break
  fi
done
if [[ -z "$python" ]]; then  # e.g. Debian's python3 without python3-pip
  python3 -m venv "$tmp/venv"
  python="$tmp/venv/bin/python"
fi

# The target interpreter: the base image's python3 when it has one, else this host's.
probe='import platform, sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}", platform.machine(), platform.libc_ver()[1])'
target=""
if [[ -n "${BASE:-}" ]]; then
  target="$(docker run --rm --network none --entrypoint python3 "$BASE" -c "$probe" 2>/dev/null)" || target=""
fi
[[ -n "$target" ]] || target="$(python3 -c "$probe")"
read -r pyver machine glibc <<<"$target"
# Every manylinux tag the target's glibc accepts (older pips do not expand one tag themselves).
platforms=()
for ((minor = ${glibc#*.}; minor >= 5; minor--)); do
  platforms+=(--platform "manylinux_2_${minor}_${machine}")
done
platforms+=(--platform "manylinux2014_${machine}" --platform "manylinux2010_${machine}"
  --platform "manylinux1_${machine}")
echo "app-build.sh: wheels for CPython $pyver, $machine, glibc $glibc" >&2

# Build from a copy: setuptools would leave build/ and *.egg-info in the work tree.
tar -C "$root" --exclude=__pycache__ -cf - pyproject.toml README.md router workers sessionpool \
  | tar -C "$tmp" -xf -
mkdir -p "$tmp/wheels"
"$python" -m pip wheel --quiet --no-deps --wheel-dir "$tmp/wheels" "$tmp"
"$python" -m pip download --quiet --dest "$tmp/wheels" --only-binary=:all: \
  --implementation cp --python-version "$pyver" "${platforms[@]}" \
  "$tmp"/wheels/sessionpool-*.whl pip

# pip evaluates markers with this host's Python (python_full_version < "3.11.3" and the like),
# so ask the target itself, offline, what is still missing, and fetch that too.
if [[ -n "${BASE:-}" ]]; then
  for _ in 1 2 3 4 5; do
    missing="$(docker run --rm --network none -v "$tmp/wheels:/wheels:ro" --entrypoint sh "$BASE" \
      -c 'python3 -m venv --without-pip /tmp/v 2>/dev/null || exit 0
          /tmp/v/bin/python "$(ls /wheels/pip-*.whl)/pip" install --dry-run --quiet --no-index \
            --disable-pip-version-check --find-links /wheels sessionpool 2>&1 || true' \
      | sed -n 's/.*No matching distribution found for \([^ ]*\).*/\1/p')"
    [[ -n "$missing" ]] || break
    echo "app-build.sh: the target also needs $missing" >&2
    "$python" -m pip download --quiet --dest "$tmp/wheels" --only-binary=:all: \
      --implementation cp --python-version "$pyver" "${platforms[@]}" "$missing"
  done
fi

rm -rf "$dest"
mkdir -p "$dest"
cp "$tmp"/wheels/*.whl "$dest"/
echo "app-build.sh: $(find "$dest" -name '*.whl' | wc -l) wheels in $dest" >&2
