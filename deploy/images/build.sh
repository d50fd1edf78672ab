#!/usr/bin/env bash
# Build sessionpool's images with no registry: a Debian root filesystem made by mmdebstrap from
# this machine's own apt sources is imported as the base image, and each image's Dockerfile is
# built on top of it.
#
#   deploy/images/build.sh [IMAGE ...]      (default: every image of every Dockerfile)
#
# An image directory may hold `debian-packages` (one Debian package per line, # comments allowed):
# its base then becomes sessionpool/base-<image>, a rootfs with python3 plus those packages.
# Without that file the image is built on sessionpool/base (python3 + python3-aiohttp).
# SESSIONPOOL_BASE_IMAGE=<image> skips mmdebstrap and uses a public image as base instead
# (the Dockerfiles install what they need with apt when python3 is missing).
# Set SESSIONPOOL_REBUILD_BASE=1 to rebuild base images that already exist.
# An image directory may also hold `prebuild.sh`: it runs on the host (BASE=<base image> in its
# environment) right before `docker build`, to put into the build context what the build must
# not fetch itself (the router and worker images' wheelhouse, see app-build.sh); it runs once
# per build.sh run however many images the directory makes.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
suite="${SESSIONPOOL_DEBIAN_SUITE:-bookworm}"
tag="${SESSIONPOOL_IMAGE_TAG:-dev}"

sources_file() {
  # The machine's apt sources: a deb822 file if there is one, else the one-line list.
  local f
  for f in /etc/apt/sources.list.d/debian.sources /etc/apt/sources.list.d/*.sources; do
    [[ -s "$f" ]] && { echo "$f"; return; }
  done
  [[ -s /etc/apt/sources.list ]] && { echo /etc/apt/sources.list; return; }
  echo "build.sh: no apt sources found on this machine" >&2
  exit 1
}

make_base() {  # make_base NAME PACKAGES(comma separated)
  local name="$1" pkgs="$2"
  if [[ -z "${SESSIONPOOL_REBUILD_BASE:-}" ]] && docker image inspect "$name" >/dev/null 2>&1; then
    return
  fi
  local tmp
  tmp="$(mktemp -d)"
  echo "build.sh: mmdebstrap $name ($pkgs)" >&2
  mmdebstrap --quiet --variant=minbase --include="$pkgs" \
    --aptopt='APT::Install-Recommends "false"' \
    --customize-hook='rm -rf "$1"/var/lib/apt/lists/* "$1"/var/cache/apt/*.bin' \
    "$suite" "$tmp/rootfs.tar" "$(sources_file)"
  docker import --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'CMD ["/bin/bash"]' "$tmp/rootfs.tar" "$name" >/dev/null
  rm -rf "$tmp"
}

# An image directory may also hold `targets` (one name per line): its Dockerfile then makes one
# image per name, sessionpool/<name>, built with --target <name> (router and worker share app/).
targets_of() {  # targets_of DIR: the image names DIR builds
  if [[ -f "$1/targets" ]]; then grep -v '^\s*#' "$1/targets" | grep -v '^\s*$'; else basename "$1"; fi
}

dir_of() {  # dir_of IMAGE: the directory whose Dockerfile builds IMAGE
  local d
  [[ -f "$here/$1/Dockerfile" && ! -f "$here/$1/targets" ]] && { echo "$here/$1"; return; }
  for d in "$here"/*/; do
    d="${d%/}"
    [[ -f "$d/targets" ]] && targets_of "$d" | grep -qx "$1" && { echo "$d"; return; }
  done
  echo "build.sh: no Dockerfile builds $1" >&2
  exit 1
}

images=("$@")
if [[ ${#images[@]} -eq 0 ]]; then
  for d in "$here"/*/; do
    [[ -f "$d/Dockerfile" ]] && mapfile -t -O "${#images[@]}" images < <(targets_of "${d%/}")
  done
fi

declare -A prebuilt=()
for image in "${images[@]}"; do
  dir="$(dir_of "$image")"
  name="$(basename "$dir")"
  target=()
  [[ -f "$dir/targets" ]] && target=(--target "$image")
  if [[ -n "${SESSIONPOOL_BASE_IMAGE:-}" ]]; then
    base="$SESSIONPOOL_BASE_IMAGE"
  elif [[ -f "$dir/debian-packages" ]]; then
    base="sessionpool/base-$name"
    extra="$(grep -v '^\s*#' "$dir/debian-packages" | tr -s ' \n' ',' | sed 's/^,//;s/,$//')"
    make_base "$base" "python3,ca-certificates${extra:+,$extra}"
  else
    base="sessionpool/base"
    make_base "$base" "python3,python3-aiohttp,ca-certificates"
  fi
  if [[ -f "$dir/prebuild.sh" && -z "${prebuilt[$dir]:-}" ]]; then
    echo "build.sh: $name/prebuild.sh" >&2
    BASE="$base" bash "$dir/prebuild.sh"
    prebuilt[$dir]=1
  fi
  echo "build.sh: docker build sessionpool/$image:$tag (FROM $base)" >&2
  docker build --quiet --build-arg "BASE=$base" "${target[@]}" -t "sessionpool/$image:$tag" \
    "$dir" >/dev/null
done
