#!/bin/sh
# PID 1 of strata-postgres: initialize $PGDATA on first start (scram passwords for network
# clients, trust on the local socket), run /docker-entrypoint-initdb.d/*.sql once (with the
# psql variable strata_password set from $STRATA_DB_PASSWORD, for the role the tiers read
# with), then become the postgres server (exec: it receives the stop signal itself).
set -eu
PGDATA="${PGDATA:-/var/lib/postgresql/data}"
PGBIN=/usr/lib/postgresql/15/bin
export PGDATA
mkdir -p /run/postgresql "$PGDATA"
chown postgres:postgres /run/postgresql "$PGDATA"
chmod 700 "$PGDATA"
if [ ! -s "$PGDATA/PG_VERSION" ]; then
  : "${POSTGRES_PASSWORD:?POSTGRES_PASSWORD must be set for the first start}"
  pwfile="$(mktemp)"
  printf '%s\n' "$POSTGRES_PASSWORD" > "$pwfile"
  chown postgres "$pwfile"
  runuser -u postgres -- "$PGBIN/initdb" -D "$PGDATA" -U postgres --pwfile="$pwfile" \
    --auth-local=trust --auth-host=scram-sha-256 --encoding=UTF8 >/dev/null
  rm -f "$pwfile"
  echo "listen_addresses = '*'" >> "$PGDATA/postgresql.conf"
  echo "host all all 0.0.0.0/0 scram-sha-256" >> "$PGDATA/pg_hba.conf"
  # Run the init scripts against a server that listens on the socket only.
  runuser -u postgres -- "$PGBIN/pg_ctl" -D "$PGDATA" -o "-c listen_addresses=''" -w start >/dev/null
  for f in /docker-entrypoint-initdb.d/*.sql; do
    [ -e "$f" ] || continue
    echo "entrypoint: running $f"
    runuser -u postgres -- psql -v ON_ERROR_STOP=1 -v strata_password="${STRATA_DB_PASSWORD:-}" -q -d postgres -f "$f"
  done
  runuser -u postgres -- "$PGBIN/pg_ctl" -D "$PGDATA" -m fast -w stop >/dev/null
  echo "entrypoint: database initialized"
fi
# setpriv execs (runuser would stay as PID 1 and, having no handler, never pass the stop
# signal on: the container was killed after its grace period instead of shutting down).
exec setpriv --reuid=postgres --regid=postgres --init-groups -- "$PGBIN/postgres" -D "$PGDATA" "$@"
