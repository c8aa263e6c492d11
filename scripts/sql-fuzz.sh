#!/usr/bin/env bash
# The differential SQL fuzzer at length (a nightly job): STRATA_SQL_FUZZ_CASES random
# queries (default 10000) from a fresh seed (or STRATA_SQL_FUZZ_SEED), through a sidecar, a
# platform, in-process DataFusion and PostgreSQL, with the TLP and NoREC oracles. CI runs
# the same test with a fixed seed and 150 cases. The seed is printed first: a failure is
# reproduced by running this script again with it.
set -euo pipefail
cd "$(dirname "$0")/.."

export STRATA_SQL_FUZZ_CASES="${STRATA_SQL_FUZZ_CASES:-10000}"
export STRATA_SQL_FUZZ_SEED="${STRATA_SQL_FUZZ_SEED:-$(date +%s)}"
echo "differential SQL fuzzing: $STRATA_SQL_FUZZ_CASES cases, seed $STRATA_SQL_FUZZ_SEED"
cargo build --workspace --all-targets
cargo test -p strata-integration-tests --test main -- --exact sql_fuzz::random_queries_agree_across_the_tiers_datafusion_and_postgres --nocapture
