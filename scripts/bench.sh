#!/usr/bin/env bash
# Runs the benchmark harness on release builds: every scenario against its baseline, in one
# run on this machine. `scripts/bench.sh` writes docs/performance.json (compare it between
# commits) and prints the tables for docs/performance.md; extra arguments go to strata-bench
# (`--quick`, `--only lookup,tpch`).
set -euo pipefail
cd "$(dirname "$0")/.."

target_dir="${CARGO_TARGET_DIR:-target}"
venv="$target_dir/bench-venv"
# DuckDB is TPC-H's peer column; the harness leaves the column out if it cannot be installed.
if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -c "import duckdb, pyarrow" 2>/dev/null; then
  python3 -m venv "$venv" && "$venv/bin/pip" install --quiet --disable-pip-version-check duckdb pyarrow || true
fi
export STRATA_BENCH_PYTHON="$(cd "$venv" && pwd)/bin/python"

cargo build --release --workspace --bins
"$target_dir/release/strata-bench" --json docs/performance.json "$@"
