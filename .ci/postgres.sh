# Source me: starts a throwaway PostgreSQL server on loopback for the scale-out tests and exports
#   LSTM_LAB_TEST_POSTGRES   an SQLAlchemy URL (user lstm, password auth) of the database lstm_lab
#   LSTM_LAB_TEST_PGCTL      the pg_ctl command line for this server (the tests restart it)
# The server and its data directory go away when the sourcing shell exits.
# Needs PostgreSQL's server binaries (Debian: postgresql-15); installs them with apt-get when missing.
#
#   source .ci/postgres.sh && pytest tests/test_scaleout.py

_pg_bin() {
    local d
    for d in "$(dirname "$(readlink -f "$(command -v initdb 2>/dev/null || echo /nonexistent/x)")")" /usr/lib/postgresql/*/bin; do
        if [ -x "$d/initdb" ] && [ -x "$d/pg_ctl" ]; then echo "$d"; return 0; fi
    done
    return 1
}

if ! PG_BIN="$(_pg_bin)"; then
    echo "postgres.sh: installing PostgreSQL 15 (Debian packages)" >&2
    if [ "$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq postgresql-15 >/dev/null
    else sudo apt-get update -qq && sudo apt-get install -y -qq postgresql-15 >/dev/null; fi
    PG_BIN="$(_pg_bin)"
fi

PG_DIR="$(mktemp -d /tmp/lstm_lab_pg.XXXXXX)"
PG_PORT="$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
PG_PASSWORD="lstm-ci-$(python3 -c 'import secrets; print(secrets.token_hex(6))')"
if [ "$(id -u)" = 0 ]; then  # initdb refuses to run as root: run the server as the postgres user
    PG_AS="runuser -u postgres --"
    chown postgres "$PG_DIR"
else
    PG_AS=""
fi
echo "$PG_PASSWORD" > "$PG_DIR/pwfile"
[ -n "$PG_AS" ] && chown postgres "$PG_DIR/pwfile"
$PG_AS "$PG_BIN/initdb" -D "$PG_DIR/data" -U lstm --pwfile="$PG_DIR/pwfile" --auth-local=trust \
    --auth-host=scram-sha-256 >/dev/null
LSTM_LAB_TEST_PGCTL="$PG_AS $PG_BIN/pg_ctl -D $PG_DIR/data -l $PG_DIR/log -w -o '-p $PG_PORT -k $PG_DIR -c listen_addresses=127.0.0.1 -c max_connections=200'"
eval "$LSTM_LAB_TEST_PGCTL start" >/dev/null
PGPASSWORD="$PG_PASSWORD" "$PG_BIN/psql" -q -h 127.0.0.1 -p "$PG_PORT" -U lstm -d postgres \
    -c "CREATE DATABASE lstm_lab" >/dev/null
export LSTM_LAB_TEST_POSTGRES="postgresql://lstm:$PG_PASSWORD@127.0.0.1:$PG_PORT/lstm_lab"
export LSTM_LAB_TEST_PGCTL
_pg_stop() { eval "$LSTM_LAB_TEST_PGCTL stop -m immediate" >/dev/null 2>&1 || true; rm -rf "$PG_DIR"; }
trap _pg_stop EXIT
echo "postgres.sh: PostgreSQL $("$PG_BIN/postgres" --version | awk '{print $3}') on 127.0.0.1:$PG_PORT" >&2
