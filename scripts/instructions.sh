#!/usr/bin/env bash
# Instructions one point lookup costs in Strata's engine (in-process, prepared and literal),
# counted by callgrind: stable from run to run whatever else the machine does, so two commits
# compare where timings cannot. Runs each mode with few and many lookups and prints the
# difference per lookup (start-up and loading the table cancel out).
# Each mode runs without and with an index on the key (`primary_key`), at ROWS rows
# (default 100000; e.g. ROWS=10000000 to show the cost does not grow with the table); the
# "results cache hit" mode counts a hit instead (a dashboard's aggregates, repeated); the
# three HTTP ones send an indexed literal lookup, a dashboard's cache hit, and `GET /health` as
# their floor, through the tier's HTTP stack in-process (routes, layers, handler, JSON
# answer; no sockets); the Flight SQL ones send the indexed literal lookup and the cache hit
# as GetFlightInfo and DoGet through the tier's Flight gRPC service in-process (tonic's
# codec, the Flight SQL dispatch, the Arrow IPC answer; no sockets or HTTP/2).
# Usage: [ROWS=n] [ONLY=part-of-a-mode-name] scripts/instructions.sh [lookups]   (default 200; each run takes a minute or two)
set -euo pipefail
cd "$(dirname "$0")/.."
command -v valgrind >/dev/null || { echo "valgrind is not installed" >&2; exit 1; }
target_dir="${CARGO_TARGET_DIR:-target}"
lookups="${1:-200}"
rows="${ROWS:-100000}"
# Without `-p`: the workspace's feature set, so the release build of the tiers is reused.
cargo build --release --bin strata-instructions
bin="$target_dir/release/strata-instructions"
out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT

count() { # mode lookups -> total instructions of the run
  valgrind --tool=callgrind --callgrind-out-file="$out/cg" "$bin" --rows "$rows" --lookups "$2" $1 >/dev/null 2>"$out/log" \
    || { cat "$out/log" >&2; exit 1; }
  grep -E "^(summary|totals): " "$out/cg" | head -1 | cut -d" " -f2
}
for mode in prepared literal "prepared, indexed" "literal, indexed" "results cache hit" \
  "HTTP /v1/sql, literal, indexed" "HTTP /v1/sql, results cache hit" "HTTP GET /health" \
  "Flight SQL, literal, indexed" "Flight SQL, results cache hit"; do
  case "$mode" in *${ONLY:-}*) ;; *) continue ;; esac
  flags=""
  case "$mode" in *literal*) flags="--literal" ;; esac
  case "$mode" in *indexed*) flags="$flags --indexed" ;; esac
  case "$mode" in *cache*) flags="--cached" ;; esac
  case "$mode" in HTTP*/v1/sql*) flags="$flags --http" ;; *health*) flags="--health" ;; Flight*) flags="$flags --flight-sql" ;; esac
  few=$(count "$flags" 0)
  many=$(count "$flags" "$lookups")
  echo "$mode, $rows rows: $(( (many - few) / lookups )) instructions per query ($lookups lookups; $few for start-up and warm-up)"
done
