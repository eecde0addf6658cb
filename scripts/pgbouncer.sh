#!/usr/bin/env bash
# Start or stop a PgBouncer in transaction-pooling mode in front of the test PostgreSQL.
#
#   scripts/pgbouncer.sh start    # idempotent: does nothing if it already answers
#   scripts/pgbouncer.sh stop     # idempotent: does nothing if it is not running
#   scripts/pgbouncer.sh status   # exit 0 if it answers
#
# Settings (environment):
#   SQLA_CONTEXT_PGBOUNCER_PORT      listen port                     (6432)
#   SQLA_CONTEXT_PGBOUNCER_LISTEN    listen address, "" = socket only (127.0.0.1)
#   SQLA_CONTEXT_PGBOUNCER_UPSTREAM  PostgreSQL host:port            (127.0.0.1:5432)
#   SQLA_CONTEXT_PGBOUNCER_POOL      server connections per database/user pair (2)
#   SQLA_CONTEXT_PGBOUNCER_DIR       config, pid, log and socket     (/tmp/sqla-context-pgbouncer-PORT)
#
# The pool is deliberately small (2 server connections per database and user) so that
# consecutive transactions of one client connection land on different server connections
# and share them with other clients: a driver that relies on session state (prepared
# statements, SET) fails here as it would under production load.
# PgBouncer refuses to run as root; as root it is started with -u postgres.
set -euo pipefail

port=${SQLA_CONTEXT_PGBOUNCER_PORT:-6432}
listen=${SQLA_CONTEXT_PGBOUNCER_LISTEN-127.0.0.1}
upstream=${SQLA_CONTEXT_PGBOUNCER_UPSTREAM:-127.0.0.1:5432}
pool=${SQLA_CONTEXT_PGBOUNCER_POOL:-2}
dir=${SQLA_CONTEXT_PGBOUNCER_DIR:-/tmp/sqla-context-pgbouncer-$port}
pidfile=$dir/pgbouncer.pid

running() { [[ -f $pidfile ]] && kill -0 "$(cat "$pidfile")" 2>/dev/null; }
answers() {
    if [[ -n $listen ]]; then pg_isready -q -h "$listen" -p "$port" -t 1
    else pg_isready -q -h "$dir" -p "$port" -t 1; fi
}

start() {
    if running && answers; then
        echo "pgbouncer: already running on port $port (pid $(cat "$pidfile"))"
        return 0
    fi
    command -v pgbouncer >/dev/null || {
        echo "pgbouncer: not installed (Debian: apt-get install pgbouncer)" >&2; return 1; }
    local user_opt=() owner
    owner=$(id -un)
    if [[ $(id -u) == 0 ]]; then owner=postgres; user_opt=(-u postgres); fi
    mkdir -p "$dir"
    # Every user the tests connect as; auth_type=trust still needs the name listed.
    printf '"postgres" ""\n"root" ""\n"%s" ""\n' "$owner" >"$dir/userlist.txt"
    cat >"$dir/pgbouncer.ini" <<INI
[databases]
* = host=${upstream%:*} port=${upstream##*:}

[pgbouncer]
pool_mode = transaction
listen_addr = $listen
listen_port = $port
unix_socket_dir = $dir
auth_type = trust
auth_file = $dir/userlist.txt
admin_users = postgres
default_pool_size = $pool
min_pool_size = 0
reserve_pool_size = 0
max_client_conn = 1000
max_db_connections = 0
; a client that waits longer than this for a server connection gets an error, not a hang
query_wait_timeout = 30
; after a server restart, retry connecting soon (default 15 s)
server_login_retry = ${SQLA_CONTEXT_PGBOUNCER_LOGIN_RETRY:-0.1}
logfile = $dir/pgbouncer.log
pidfile = $pidfile
INI
    chown -R "$owner" "$dir"
    rm -f "$pidfile"
    pgbouncer -d "${user_opt[@]}" "$dir/pgbouncer.ini"
    for _ in $(seq 1 50); do
        if answers; then echo "pgbouncer: running on port $port -> $upstream"; return 0; fi
        sleep 0.1
    done
    echo "pgbouncer: did not start; see $dir/pgbouncer.log" >&2
    tail -n 20 "$dir/pgbouncer.log" >&2 || true
    return 1
}

stop() {
    if ! running; then echo "pgbouncer: not running on port $port"; return 0; fi
    local pid
    pid=$(cat "$pidfile")
    kill -TERM "$pid"
    for _ in $(seq 1 50); do
        kill -0 "$pid" 2>/dev/null || { echo "pgbouncer: stopped"; return 0; }
        sleep 0.1
    done
    echo "pgbouncer: pid $pid did not stop" >&2
    return 1
}

case ${1:-} in
    start) start ;;
    stop) stop ;;
    status) running && answers ;;
    *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
