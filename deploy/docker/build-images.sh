#!/usr/bin/env bash
# Builds Strata's container images with no image registry: Debian root filesystems made here
# by mmdebstrap are imported as base images, and the `strata` binary built on this host is
# copied in. Nothing is pulled.
#
#   deploy/docker/build-images.sh [--profile dev|release]
#
# Images (tags):
#   strata-base:bookworm    Debian bookworm, essential packages, ca-certificates, tzdata,
#                           user strata (uid 10001); cached by its inputs' hash
#   strata-postgres:15      the same plus PostgreSQL 15, the demo's sample data
#                           (postgres/demo-data.sql) and an entrypoint that initializes $PGDATA
#                           and runs /docker-entrypoint-initdb.d/*.sql once
#   strata-prometheus:2     the same plus Debian's prometheus package (the compose demo's
#                           metrics; its scrape config is mounted by the compose file)
#   strata:<profile>        strata-base + the `strata` binary (every tier is a subcommand)
#
# A base image is rebuilt only when its inputs (this script's recipe, the entrypoint) change;
# the strata image is rebuilt every time (it is one COPY). Sizes are printed at the end.
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
profile=dev
while [ $# -gt 0 ]; do
  case "$1" in
    --profile) profile="$2"; shift 2 ;;
    --profile=*) profile="${1#--profile=}"; shift ;;
    *) echo "usage: $0 [--profile dev|release]" >&2; exit 64 ;;
  esac
done
# dev builds what the test suite builds (`--workspace --all-targets`: another package set would
# resolve other dependency features and rebuild them), so after the tests it is a no-op.
case "$profile" in dev) target_subdir=debug; cargo_flags=(--workspace --all-targets) ;;
  release) target_subdir=release; cargo_flags=(--release -p strata-cli --bin strata) ;;
  *) echo "error: --profile must be dev or release, not '$profile'" >&2; exit 64 ;; esac

export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/strata-target}"
cache="${STRATA_IMAGE_CACHE:-$HOME/.cache/strata-images}"
mkdir -p "$cache"

command -v docker >/dev/null || { echo "error: docker is not installed" >&2; exit 1; }
docker info >/dev/null 2>&1 || { echo "error: the docker engine is not reachable (docker info failed)" >&2; exit 1; }

# mmdebstrap options shared by both root filesystems: the smallest Debian that runs a
# dynamically linked Rust binary, without documentation, with /usr merged by mmdebstrap's
# own hooks (the usrmerge package would pull perl in).
mm_common=(--variant=essential --include=ca-certificates,libssl3,tzdata
  --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-exclude=/usr/share/man/*'
  --dpkgopt='path-exclude=/usr/share/locale/*' --dpkgopt='path-exclude=/usr/share/info/*'
  --hook-dir=/usr/share/mmdebstrap/hooks/merged-usr)
# The essential variant has no useradd: the service user is written into the files directly.
add_user='echo "strata:x:10001:10001:strata:/var/lib/strata:/usr/sbin/nologin" >> "$1/etc/passwd";
  echo "strata:x:10001:" >> "$1/etc/group"; echo "strata:*:19000:0:99999:7:::" >> "$1/etc/shadow";
  mkdir -p "$1/var/lib/strata" && chown 10001:10001 "$1/var/lib/strata"'

# docker build, quiet unless it fails (the legacy builder warns about BuildKit on every run).
quiet_build() {
  local out
  if ! out="$(docker build -q "$@" 2>&1)"; then
    echo "$out" >&2
    echo "error: docker build $* failed" >&2
    exit 1
  fi
}

ensure_mmdebstrap() {
  command -v mmdebstrap >/dev/null && return
  echo "installing mmdebstrap (Debian package)"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq mmdebstrap >/dev/null
}

# base_image TAG EXTRA_PACKAGES EXTRA_FILES...: imports a rootfs as TAG unless an image with
# the same inputs hash exists.
base_image() {
  local tag="$1" packages="$2"; shift 2
  # The root filesystem depends on the package recipe only; the image also on the files.
  local rootfs inputs
  rootfs="$(printf '%s\n' "${mm_common[@]}" "$packages" "$add_user" | sha256sum | cut -c1-16)"
  inputs="$( { echo "$rootfs"; cat "$@" /dev/null; } | sha256sum | cut -c1-16)"
  if [ "$(docker image inspect -f '{{index .Config.Labels "strata.inputs"}}' "$tag" 2>/dev/null || true)" = "$inputs" ]; then
    echo "$tag: up to date (inputs $inputs)"
    return
  fi
  ensure_mmdebstrap
  local tar="$cache/${tag//[:\/]/_}-$rootfs.tar"
  if [ ! -s "$tar" ]; then
    echo "$tag: building the root filesystem with mmdebstrap"
    local started=$SECONDS
    local include=()
    [ -n "$packages" ] && include=(--include="$packages")
    if ! mmdebstrap --quiet --format=tar "${mm_common[@]}" "${include[@]}" --customize-hook="$add_user" \
      bookworm "$tar.part.tar" >"$cache/mmdebstrap.log" 2>&1; then
      tail -30 "$cache/mmdebstrap.log" >&2
      echo "error: mmdebstrap failed building $tag (log: $cache/mmdebstrap.log)" >&2
      exit 1
    fi
    mv "$tar.part.tar" "$tar"
    echo "$tag: root filesystem $(du -m "$tar" | cut -f1) MB in $((SECONDS - started)) s"
  fi
  local ctx; ctx="$(mktemp -d)"
  ln "$tar" "$ctx/rootfs.tar" 2>/dev/null || cp "$tar" "$ctx/rootfs.tar"
  for f in "$@"; do cp "$f" "$ctx/"; done
  printf 'FROM scratch\nADD rootfs.tar /\nLABEL strata.inputs=%s\n' "$inputs" > "$ctx/Dockerfile"
  # An image's own instructions (user, entrypoint) come from the Dockerfile.tail among its files.
  for f in "$@"; do
    if [ "$(basename "$f")" = Dockerfile.tail ]; then cat "$f" >> "$ctx/Dockerfile"; fi
  done
  quiet_build -t "$tag" "$ctx"
  rm -rf "$ctx"
  # Older rootfs tars of this tag are of no further use.
  find "$cache" -name "${tag//[:\/]/_}-*.tar" ! -name "$(basename "$tar")" -delete
}

base_image strata-base:bookworm ""
base_image strata-postgres:15 "postgresql-15" "$here/postgres/entrypoint.sh" "$here/postgres/demo-data.sql" \
  "$here/postgres/Dockerfile.tail"
base_image strata-prometheus:2 "prometheus" "$here/prometheus/Dockerfile.tail"

# The strata image: the host-built binary on strata-base. The host is Debian 12 (bookworm),
# so the binary's glibc matches the image's.
echo "strata:$profile: building the strata binary (cargo build ${cargo_flags[*]})"
(cd "$repo" && cargo build --quiet "${cargo_flags[@]}")
ctx="$(mktemp -d)"
trap 'rm -rf "$ctx"' EXIT
cp "$CARGO_TARGET_DIR/$target_subdir/strata" "$ctx/strata"
# Line tables make panics readable but are of no use in an image: strip them (and shrink it).
strip --strip-debug "$ctx/strata" 2>/dev/null || true
cp "$here/Dockerfile.runtime" "$ctx/Dockerfile"
cp -r "$repo/deploy/compose/data" "$ctx/data"
quiet_build --build-arg BASE=strata-base:bookworm -t "strata:$profile" "$ctx"

# Earlier builds of these tags are left untagged: remove them (every image built here carries
# the strata.inputs label, inherited from its base), or each run would keep another copy.
docker image prune -f --filter label=strata.inputs >/dev/null

echo "images:"
for tag in strata-base:bookworm strata-postgres:15 strata-prometheus:2 "strata:$profile"; do
  printf '  %-22s %s MB\n' "$tag" "$(( $(docker image inspect -f '{{.Size}}' "$tag") / 1000000 ))"
done
