#!/usr/bin/env bash
# Instructions one point lookup costs in Strata's engine (in-process, prepared and literal),
# counted by callgrind: stable from run to run whatever else the machine does, so two commits
# compare where timings cannot. Runs each mode with few and many lookups and prints the
# difference per lookup (start-up and loading the table cancel out).
# Usage: scripts/instructions.sh [lookups]   (default 200; each run takes a minute or two)
set -euo pipefail
cd "$(dirname "$0")/.."
command -v valgrind >/dev/null || { echo "valgrind is not installed" >&2; exit 1; }
target_dir="${CARGO_TARGET_DIR:-target}"
lookups="${1:-200}"
cargo build --release --workspace --bins
bin="$target_dir/release/strata-instructions"
out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT

count() { # mode lookups -> total instructions of the run
  valgrind --tool=callgrind --callgrind-out-file="$out/cg" "$bin" --lookups "$2" $1 >/dev/null 2>"$out/log" \
    || { cat "$out/log" >&2; exit 1; }
  grep -E "^(summary|totals): " "$out/cg" | head -1 | cut -d" " -f2
}
for mode in prepared literal; do
  flag=""; [ "$mode" = literal ] && flag="--literal"
  few=$(count "$flag" 0)
  many=$(count "$flag" "$lookups")
  echo "$mode: $(( (many - few) / lookups )) instructions per lookup ($lookups lookups; $few for start-up and warm-up)"
done
