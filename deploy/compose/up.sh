#!/usr/bin/env bash
# Brings the three-tier demo up from nothing: builds the images offline when needed, removes
# any earlier run of the demo (`down -v`: compose 1.29 cannot recreate containers on newer
# engines), starts every service, waits until each is healthy and prints the endpoints.
#
#   deploy/compose/up.sh [--profile dev|release]    (stop with deploy/compose/down.sh)
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
profile=dev
[ "${1:-}" = "--profile" ] && profile="${2:?--profile needs dev or release}"
export STRATA_IMAGE="strata:$profile"
export COMPOSE_PROJECT_NAME="${COMPOSE_PROJECT_NAME:-strata-demo}"

if docker compose version >/dev/null 2>&1; then compose=(docker compose); else compose=(docker-compose); fi
compose+=(--project-directory "$here" -f "$here/docker-compose.yml")

"$here/../docker/build-images.sh" --profile "$profile"
"${compose[@]}" down -v --remove-orphans >/dev/null 2>&1 || true
started=$SECONDS
"${compose[@]}" up -d
# `up --wait` is v2-only: poll each container's health instead.
services=(postgres platform-eu platform-us sidecar edge)
deadline=$((SECONDS + ${STRATA_UP_TIMEOUT:-180}))
for service in "${services[@]}"; do
  while :; do
    id="$("${compose[@]}" ps -q "$service")"
    status="$(docker inspect -f '{{if .State.Health}}{{.State.Health.Status}}{{else}}{{.State.Status}}{{end}}' "$id" 2>/dev/null || echo missing)"
    [ "$status" = healthy ] && break
    if [ "$status" = missing ] || [ "$status" = exited ] || [ "$SECONDS" -gt "$deadline" ]; then
      echo "error: $service is $status; its last log lines:" >&2
      "${compose[@]}" logs --tail 30 "$service" >&2 || true
      exit 1
    fi
    sleep 1
  done
done
echo "all healthy in $((SECONDS - started)) s"
# The demo CA's certificate, for clients on this host (the platforms serve TLS).
ca="${STRATA_DEMO_CA:-$here/demo-ca.pem}"
docker cp "$("${compose[@]}" ps -q platform-eu)":/etc/strata/tls/ca.pem "$ca"
cat <<EOT

Endpoints (HTTP /v1/sql takes a SQL body; Flight SQL on the grpc ports):
  sidecar     (eu, the app's)  http://127.0.0.1:${SIDECAR_HTTP_PORT:-18083}      grpc://127.0.0.1:${SIDECAR_FLIGHT_PORT:-15053}
  edge        (eu)             http://127.0.0.1:${EDGE_HTTP_PORT:-18084}      grpc://127.0.0.1:${EDGE_FLIGHT_PORT:-15054}
  platform-eu                  https://127.0.0.1:${PLATFORM_EU_HTTP_PORT:-18081}     grpc+tls://127.0.0.1:${PLATFORM_EU_FLIGHT_PORT:-15051}
  platform-us                  https://127.0.0.1:${PLATFORM_US_HTTP_PORT:-18082}     grpc+tls://127.0.0.1:${PLATFORM_US_FLIGHT_PORT:-15052}
  (the platforms: TLS from the demo CA, $ca; an app key from .env; their gRPC port wants a
   client certificate of that CA: it is the tiers' port)
  prometheus                   http://127.0.0.1:${PROMETHEUS_PORT:-19090}      (every tier's /metrics; dashboard: deploy/monitoring/)
  traces                       http://127.0.0.1:${COLLECTOR_HTTP_PORT:-16686}/v1/spans?trace_id=...

Try:  curl -si -d 'SELECT status, count(*) FROM orders GROUP BY status' http://127.0.0.1:${SIDECAR_HTTP_PORT:-18083}/v1/sql
      curl -si --cacert $ca -H "authorization: Bearer \$STRATA_APP_KEY" -d 'SELECT count(*) FROM orders' https://127.0.0.1:${PLATFORM_EU_HTTP_PORT:-18081}/v1/sql
      ${compose[*]} logs -f app        (each answer's route, versions and latency)
      strata sql --endpoint http://127.0.0.1:${SIDECAR_FLIGHT_PORT:-15053} --http http://127.0.0.1:${SIDECAR_HTTP_PORT:-18083}
Stop: ${compose[*]} down -v
EOT
