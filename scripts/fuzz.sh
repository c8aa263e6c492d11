#!/usr/bin/env bash
# Coverage-guided fuzzing (libFuzzer through cargo-fuzz) of every target in strata-fuzzing,
# or of the targets named as arguments, FUZZ_SECONDS each (default 60; a nightly job runs
# longer). CI runs the same targets over the committed corpora without coverage feedback
# (`cargo test -p strata-fuzzing`); this is where new inputs are found.
#
# A crash stops its target and leaves the input under fuzz/artifacts/<target>/: fix the
# bug, then copy the input into fuzz/corpus/<target>/ (named for what it found) so CI
# replays it from then on. New interesting inputs go to a working corpus under the build
# directory; `cargo fuzz cmin` them into fuzz/corpus/ when they are worth keeping.
set -euo pipefail
cd "$(dirname "$0")/.."

export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$PWD/target}"
seconds="${FUZZ_SECONDS:-60}"
all=(config flight_sql statement_handle ingest ingest_log tier_protocol shipped_plan)
targets=("${@:-${all[@]}}")

command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
# AddressSanitizer needs a nightly compiler; with only a stable one, fuzz uninstrumented
# for memory errors (our code forbids `unsafe`; the coverage guidance still works).
if rustup run nightly rustc --version >/dev/null 2>&1; then
  fuzz=(cargo +nightly fuzz)
  sanitizer=address
else
  fuzz=(cargo fuzz)
  sanitizer=none
fi

cargo run --quiet -p strata-fuzzing --example write_seeds
[ -f fuzz/Cargo.lock ] || cp Cargo.lock fuzz/Cargo.lock
"${fuzz[@]}" build --sanitizer "$sanitizer"

work="$CARGO_TARGET_DIR/fuzz-corpus"
for target in "${targets[@]}"; do
  mkdir -p "$work/$target"
  echo "== $target: ${seconds}s"
  "${fuzz[@]}" run --sanitizer "$sanitizer" "$target" "$work/$target" "fuzz/corpus/$target" -- \
    -max_total_time="$seconds" -timeout=30 -rss_limit_mb=4096 -print_final_stats=1
done
