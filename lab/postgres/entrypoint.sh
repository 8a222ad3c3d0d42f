#!/bin/sh
# The lab's PostgreSQL image: PostgreSQL 15 from Debian's packages, its
# cluster in $PGDATA (on the service's volume). The first start makes it;
# every start then runs postgres as PID 1, so the container's stop signal
# (SIGINT: a fast shutdown) reaches it.
set -eu
PGDATA=${PGDATA:-/data/pg}
bin=/usr/lib/postgresql/15/bin
mkdir -p "$PGDATA" /run/postgresql
chown postgres:postgres "$PGDATA" /run/postgresql
chmod 0700 "$PGDATA"
if [ ! -s "$PGDATA/PG_VERSION" ]; then
  setpriv --reuid postgres --regid postgres --init-groups "$bin/initdb" -D "$PGDATA" -U postgres --auth=trust --no-sync >/dev/null
  echo "host all all 0.0.0.0/0 trust" >>"$PGDATA/pg_hba.conf"
fi
# The server's log goes to $PGDATA/log/postgresql.log: on the volume, so
# it moves with the data and tells, on the final owner, how every start
# and stop went. Written by the server itself (no logging collector, whose
# last lines die with the container), so "database system is shut down"
# is on disk before the container stops.
mkdir -p "$PGDATA/log"
chown postgres:postgres "$PGDATA/log"
exec setpriv --reuid postgres --regid postgres --init-groups "$bin/postgres" -D "$PGDATA" \
  -c listen_addresses='*' -c logging_collector=off 2>>"$PGDATA/log/postgresql.log"
