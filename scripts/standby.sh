#!/usr/bin/env bash
# A hot standby of the test PostgreSQL cluster, for tests/test_replicas.py.
#
#   scripts/standby.sh start      create it if needed (pg_basebackup -R) and start it; idempotent
#   scripts/standby.sh stop       stop it, keep its data (the tests stop and start it)
#   scripts/standby.sh teardown   stop it, drop the cluster and its replication slot
#   scripts/standby.sh status     exit 0 when it accepts connections
#
# The standby is a Debian cluster "sqla_standby" of the primary's major version, on port
# SQLA_CONTEXT_STANDBY_PORT (default 5433), streaming from 127.0.0.1:5432 through the
# physical replication slot "sqla_context_standby" (so a standby that was stopped for a
# while can still catch up). The only change to the primary is one pg_hba.conf line that
# lets 127.0.0.1 replicate, applied with a reload (no restart, running sessions unaffected).
set -euo pipefail

PORT=${SQLA_CONTEXT_STANDBY_PORT:-5433}
PRIMARY_PORT=${SQLA_CONTEXT_PRIMARY_PORT:-5432}
NAME=sqla_standby
SLOT=sqla_context_standby
VERSION=$(pg_lsclusters -h | awk -v p="$PRIMARY_PORT" '$3 == p {print $1; exit}')
PRIMARY=$(pg_lsclusters -h | awk -v p="$PRIMARY_PORT" '$3 == p {print $2; exit}')
if [ -z "$VERSION" ]; then
    echo "standby: no PostgreSQL cluster listens on port $PRIMARY_PORT" >&2
    exit 1
fi
DATA=/var/lib/postgresql/$VERSION/$NAME

psql_primary() { psql -X -q -At -h 127.0.0.1 -p "$PRIMARY_PORT" -U postgres -d postgres "$@"; }
exists() { pg_lsclusters -h 2>/dev/null | awk -v v="$VERSION" -v n="$NAME" '$1 == v && $2 == n' | grep -q .; }
is_up() { pg_isready -q -h 127.0.0.1 -p "$PORT"; }

allow_replication() {
    local hba
    hba=$(psql_primary -c "SHOW hba_file")
    if ! grep -Eq '^host[[:space:]]+replication[[:space:]]+all[[:space:]]+127\.0\.0\.1/32' "$hba"; then
        echo "host replication all 127.0.0.1/32 trust  # scripts/standby.sh" >>"$hba"
        psql_primary -c "SELECT pg_reload_conf()" >/dev/null
    fi
}

create() {
    allow_replication
    # A slot left by a standby that is gone would keep WAL on the primary forever.
    psql_primary -c "SELECT pg_drop_replication_slot('$SLOT') FROM pg_replication_slots
                     WHERE slot_name = '$SLOT' AND NOT active" >/dev/null
    pg_createcluster "$VERSION" "$NAME" -p "$PORT" --start-conf=manual >/dev/null
    # The tests connect as the primary's tests do (trust from 127.0.0.1).
    cp "$(psql_primary -c "SHOW hba_file")" "/etc/postgresql/$VERSION/$NAME/pg_hba.conf"
    find "$DATA" -mindepth 1 -delete  # the directory stays: postgres may not create it
    # -C -S: create the slot; -R: write standby.signal and primary_conninfo.
    su postgres -c "pg_basebackup -h 127.0.0.1 -p $PRIMARY_PORT -U postgres -D '$DATA' \
        -X stream -c fast -R -C -S $SLOT" >/dev/null
    echo "standby: created $VERSION/$NAME on port $PORT (replica of $VERSION/$PRIMARY)"
}

start() {
    if exists && [ ! -f "$DATA/standby.signal" ]; then  # an earlier create() was cut short
        pg_dropcluster --stop "$VERSION" "$NAME"
    fi
    exists || create
    if ! is_up; then
        pg_ctlcluster --skip-systemctl-redirect "$VERSION" "$NAME" start
    fi
    for _ in $(seq 1 120); do
        if is_up; then
            echo "standby: up on port $PORT"
            return 0
        fi
        sleep 0.25
    done
    echo "standby: did not come up on port $PORT" >&2
    return 1
}

stop() {
    if exists && is_up; then
        pg_ctlcluster --skip-systemctl-redirect "$VERSION" "$NAME" stop -m fast
    fi
}

teardown() {
    if exists; then
        pg_dropcluster --stop "$VERSION" "$NAME"
    fi
    psql_primary -c "SELECT pg_drop_replication_slot('$SLOT') FROM pg_replication_slots
                     WHERE slot_name = '$SLOT'" >/dev/null
    echo "standby: removed"
}

case "${1:-}" in
    start) start ;;
    stop) stop ;;
    teardown) teardown ;;
    status) is_up ;;
    *)
        echo "usage: $0 start|stop|teardown|status" >&2
        exit 2
        ;;
esac
