#!/usr/bin/env bash
# Validates the deployment files offline (no cluster, no registry):
#   - `kubectl kustomize` renders every overlay;
#   - kubernetes-validate --strict checks them against Kubernetes 1.29 and 1.33 (legacy-sidecar
#     against 1.27 too), so a misspelt field fails;
#   - yamllint over deploy/;
#   - validate.py: every config loads with the real loader, and ports, probe paths and grace
#     periods agree with the binary (see its docstring).
#
#   deploy/validate.sh [PYTHON]    (PYTHON: an interpreter with kubernetes-validate, yamllint
#                                   and PyYAML; default: the test suite's virtual environment)
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
repo="$(cd "$here/.." && pwd)"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$repo/target}"
python="${1:-${STRATA_PYTHON:-$CARGO_TARGET_DIR/py-venv/bin/python}}"
bin="$(dirname "$python")"
command -v kubectl >/dev/null || { echo "error: kubectl (with kustomize) is needed to render the manifests" >&2; exit 1; }

rendered="$(mktemp -d)"
trap 'rm -rf "$rendered"' EXIT
for overlay in "$here"/k8s/overlays/*/; do
  name="$(basename "$overlay")"
  kubectl kustomize "$overlay" > "$rendered/$name.yaml"
  versions=(1.29 1.33)
  [ "$name" = legacy-sidecar ] && versions+=(1.27)
  for version in "${versions[@]}"; do
    "$bin/kubernetes-validate" --strict --quiet -k "$version" "$rendered/$name.yaml"
  done
  echo "k8s overlay $name: renders, valid (strict) for Kubernetes ${versions[*]}"
done
"$bin/yamllint" -c "$here/.yamllint.yaml" --strict "$here"
echo "yamllint: deploy/ is clean"

(cd "$repo" && cargo build --quiet --workspace --all-targets)
# The Secrets make-secrets.sh writes for a test cluster are valid too.
bash "$here/k8s/make-secrets.sh" strata-dev "$CARGO_TARGET_DIR/debug/strata" 2>/dev/null > "$rendered/secrets.yaml.txt"
"$bin/kubernetes-validate" --strict --quiet -k 1.33 "$rendered/secrets.yaml.txt"
echo "make-secrets.sh: 4 Secrets, valid (strict) for Kubernetes 1.33"
"$python" "$here/validate.py" "$CARGO_TARGET_DIR/debug/strata" "$rendered" "$here/compose/docker-compose.yml"
