#!/usr/bin/env bash
# The compose demo's smoke and fault test, run by CI: builds the images offline, brings the
# demo up from nothing, checks a query at every tier against PostgreSQL and runs every fault
# step (platform kill and restart, edge partition with writes, edge restart offline, SIGTERM
# drain), checks Prometheus scrapes every tier and one query's trace reaches the collector
# stand-in from every tier it crossed, then tears everything down and checks nothing of the
# project is left.
#
#   deploy/compose/smoke.sh [--profile dev|release]
#
# Fails (never skips) when Docker is missing. Uses its own project name and ports, so a demo
# started with up.sh can keep running beside it.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
profile=dev
[ "${1:-}" = "--profile" ] && profile="${2:?--profile needs dev or release}"

if ! command -v docker >/dev/null || ! docker info >/dev/null 2>&1; then
  echo "error: the compose smoke test needs a running Docker engine (docker info failed); it does not skip" >&2
  exit 1
fi
if docker compose version >/dev/null 2>&1; then compose=(docker compose); elif command -v docker-compose >/dev/null; then
  compose=(docker-compose); else echo "error: neither docker compose nor docker-compose is installed" >&2; exit 1; fi

export COMPOSE_PROJECT_NAME="strata-smoke-$$"
export STRATA_IMAGE="strata:$profile"
export PLATFORM_EU_HTTP_PORT=28081 PLATFORM_EU_FLIGHT_PORT=25051 PLATFORM_US_HTTP_PORT=28082 PLATFORM_US_FLIGHT_PORT=25052
export SIDECAR_HTTP_PORT=28083 SIDECAR_FLIGHT_PORT=25053 EDGE_HTTP_PORT=28084 EDGE_FLIGHT_PORT=25054
export PROMETHEUS_PORT=29090 COLLECTOR_HTTP_PORT=26686
compose+=(--project-directory "$here" -f "$here/docker-compose.yml")
# up.sh copies the demo CA's certificate here; the smoke's HTTPS clients trust it.
scratch="$(mktemp -d)"
export STRATA_DEMO_CA="$scratch/demo-ca.pem"

teardown() {
  local status=$?
  if [ "$status" -ne 0 ]; then
    echo "--- last log lines of every service (smoke failed) ---" >&2
    "${compose[@]}" logs --no-color --tail 40 >&2 2>&1 || true
  fi
  "${compose[@]}" down -v --remove-orphans >/dev/null 2>&1 || true
  rm -rf "$scratch"
}
trap teardown EXIT

started=$SECONDS
"$here/up.sh" --profile "$profile"
SMOKE_COMPOSE="$(IFS=$'\x1f'; echo "${compose[*]}")" SMOKE_PROJECT="$COMPOSE_PROJECT_NAME" SMOKE_CA="$STRATA_DEMO_CA" \
  python3 "$here/smoke.py"

"${compose[@]}" down -v --remove-orphans
rm -rf "$scratch"
trap - EXIT
label="com.docker.compose.project=$COMPOSE_PROJECT_NAME"
left="$(docker ps -aq --filter "label=$label"; docker volume ls -q --filter "label=$label"; docker network ls -q --filter "label=$label")"
if [ -n "$left" ]; then
  echo "error: down -v left resources of $COMPOSE_PROJECT_NAME behind: $left" >&2
  exit 1
fi
echo "compose smoke passed in $((SECONDS - started)) s; down -v left no container, volume or network"
