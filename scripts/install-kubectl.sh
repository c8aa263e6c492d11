#!/usr/bin/env bash
# Installs kubectl (with its built-in kustomize) from Debian's package archive, for machines
# whose only registries are Debian's, PyPI and crates.io. Bookworm's own kubernetes-client
# (1.20) carries kustomize 2, which cannot read our overlays' `patches:` and `labels:`; the
# next stable release's kubectl package (1.32) needs only libc6 >= 2.34, which bookworm has.
# The package is looked up in that release's index (so a point release's new version is
# found), checked against the index's SHA256, and installed with dpkg. Needs root.
#   scripts/install-kubectl.sh [SUITE]    (default: trixie)
set -euo pipefail

suite="${1:-trixie}"
mirror="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
arch="$(dpkg --print-architecture)"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

curl -fsS --retry 3 -o "$work/Packages.xz" "$mirror/dists/$suite/main/binary-$arch/Packages.xz"
# The index's kubectl stanza: its pool path and checksum.
read -r filename sha256 < <(xz -dc "$work/Packages.xz" | awk '
  /^Package: / { in_kubectl = ($2 == "kubectl") }
  in_kubectl && /^Filename: / { file = $2 }
  in_kubectl && /^SHA256: / { sum = $2 }
  /^$/ && file != "" && sum != "" { exit }
  END { if (file != "" && sum != "") print file, sum }')
if [ -z "${filename:-}" ] || [ -z "${sha256:-}" ]; then
  echo "error: no kubectl package in $mirror $suite ($arch)" >&2
  exit 1
fi

curl -fsS --retry 3 -o "$work/kubectl.deb" "$mirror/$filename"
echo "$sha256  $work/kubectl.deb" | sha256sum --check --quiet
dpkg -i "$work/kubectl.deb" >/dev/null
kubectl version --client
