#!/usr/bin/env bash
# Runs the whole test suite on a fresh machine that has the Rust toolchain, Python 3,
# PostgreSQL 15's binaries, kubectl and a Docker engine with docker-compose: sets up the Python
# Flight SQL clients (and the manifest validators) in a virtual environment under the target
# directory, builds the binaries the integration tests start, runs every test, then validates
# the deployment files and runs the compose demo's smoke and fault test (which fails, never
# skips, without Docker). Arguments go to `cargo test`.
set -euo pipefail
cd "$(dirname "$0")/.."

target_dir="${CARGO_TARGET_DIR:-target}"
venv="$target_dir/py-venv"
if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -c 'import adbc_driver_flightsql, pyarrow, pytest, grpc_reflection, kubernetes_validate, yamllint, yaml, prometheus_client, pexpect' 2>/dev/null; then
  echo "setting up Python clients in $venv"
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check -r integration-tests/python/requirements.txt
fi
export STRATA_PYTHON="$(cd "$venv" && pwd)/bin/python"

# Integration tests start the real binaries, so build them first (all targets: the same
# feature set as `cargo test` and `cargo clippy --all-targets`, so nothing is rebuilt twice).
cargo build --workspace --all-targets
status=0
cargo test --workspace --no-fail-fast "$@" || status=$?

# The deployment: manifests and configs against the binary, then the compose demo in containers.
bash deploy/validate.sh "$STRATA_PYTHON" || status=$?
bash deploy/compose/smoke.sh || status=$?
exit "$status"
