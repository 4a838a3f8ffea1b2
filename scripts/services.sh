#!/usr/bin/env bash
# Test services for the integration tests and the benchmark: a PostgreSQL
# with wal_level=logical, a MariaDB with a ROW/FULL binlog, a Redis (the
# benchmark's peer), each private (own port and data directory), Debian's
# Chromium (the status page's browser test), and a
# Kafka-protocol broker (tansu, built once into a cache outside the
# repository), started only when not already up. Idempotent.
#
#   scripts/services.sh start   # start what is missing, print `export ...` lines
#   scripts/services.sh stop    # stop what this script started (by PID)
#   scripts/services.sh env     # print the `export ...` lines only
#
# A server already running on the standard port is reused only when it is
# configured for change data capture; these machines' defaults are not, so
# the private instances are the usual case.
set -euo pipefail

BASE="${FABRIC_SERVICES_DIR:-/var/tmp/entity-fabric}"
PG_PORT="${FABRIC_PG_PORT:-55432}"
MY_PORT="${FABRIC_MYSQL_PORT:-33306}"
PG_BIN="$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n1 || true)"
PG_DIR="$BASE/pg"
MY_DIR="$BASE/mariadb"
KAFKA_PORT="${FABRIC_KAFKA_PORT:-19092}"
REDIS_PORT="${FABRIC_REDIS_PORT:-16379}"
# tansu (a Kafka-protocol broker in Rust) is built once into this cache, with
# the in-memory storage and the SQLite storage (the tests that kill and
# restart a broker of their own need one that survives). An optimised build:
# a debug one (quicker to build) answered a cluster test's four fabrics
# slowly enough for a joining process to time out connecting in CI.
TANSU_ROOT="${FABRIC_TANSU_ROOT:-$HOME/.cache/entity-fabric/tansu-0.6.0-sqlite-release}"

log() { echo "services: $*" >&2; }

# Runs the check "$@" every 0.1 s until it passes, for at most 10 s.
wait_until() {
  for _ in $(seq 1 100); do
    "$@" && return 0
    sleep 0.1
  done
  return 1
}

install_packages() {
  local missing=()
  [ -n "$PG_BIN" ] && [ -x "$PG_BIN/initdb" ] || missing+=(postgresql)
  command -v mariadbd >/dev/null 2>&1 || missing+=(mariadb-server mariadb-client)
  command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
  # The status page's test loads it in a real headless browser.
  command -v chromium >/dev/null 2>&1 || missing+=(chromium)
  if [ ${#missing[@]} -gt 0 ]; then
    log "installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >&2
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
    PG_BIN="$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -n1)"
  fi
}

pg_url_on() { echo "postgres://postgres@127.0.0.1:$1/postgres"; }

pg_ready() { "$PG_BIN/pg_isready" -q -h 127.0.0.1 -p "$1" 2>/dev/null; }

pg_logical() {
  [ "$(psql -h 127.0.0.1 -p "$1" -U postgres -Atc 'SHOW wal_level' 2>/dev/null)" = logical ]
}

start_pg() {
  if pg_ready 5432 && pg_logical 5432; then
    log "reusing PostgreSQL on 5432 (wal_level=logical)"
    PG_URL="$(pg_url_on 5432)"
    return
  fi
  PG_URL="$(pg_url_on "$PG_PORT")"
  PG_RESTART="runuser -u postgres -- $PG_BIN/pg_ctl -D $PG_DIR -w -m fast restart -l $PG_DIR/server.log"
  # A crash and restart: no wait for replication clients to drain (a fast
  # shutdown waits for every logical walsender to have its WAL confirmed).
  PG_CRASH="runuser -u postgres -- $PG_BIN/pg_ctl -D $PG_DIR -w -m immediate restart -l $PG_DIR/server.log"
  if pg_ready "$PG_PORT"; then
    pg_logical "$PG_PORT" || { log "PostgreSQL on $PG_PORT is not wal_level=logical"; exit 1; }
    return
  fi
  install -d -o postgres -g postgres -m 700 "$PG_DIR"
  if [ ! -f "$PG_DIR/PG_VERSION" ]; then
    log "initialising PostgreSQL in $PG_DIR"
    runuser -u postgres -- "$PG_BIN/initdb" -D "$PG_DIR" -U postgres -A trust -E UTF8 --no-sync >/dev/null
  fi
  log "starting PostgreSQL on $PG_PORT"
  runuser -u postgres -- "$PG_BIN/pg_ctl" -D "$PG_DIR" -l "$PG_DIR/server.log" -w -o \
    "-p $PG_PORT -c listen_addresses=127.0.0.1 -c unix_socket_directories=$PG_DIR -c wal_level=logical -c max_replication_slots=64 -c max_wal_senders=64 -c max_connections=300 -c fsync=off -c synchronous_commit=off -c full_page_writes=off" \
    start >/dev/null
  touch "$BASE/pg.started-by-us"
}

my_ready() { mariadb-admin -h 127.0.0.1 -P "$1" -uroot --connect-timeout=2 ping >/dev/null 2>&1; }

my_binlog_ok() {
  local v
  v="$(mariadb -h 127.0.0.1 -P "$1" -uroot -N -e "SELECT CONCAT(@@log_bin, @@binlog_format, @@binlog_row_image)" 2>/dev/null || true)"
  [ "$v" = "1ROWFULL" ] || [ "$v" = "ONROWFULL" ]
}

start_mariadb() {
  if my_ready 3306 && my_binlog_ok 3306; then
    log "reusing MariaDB on 3306 (ROW/FULL binlog)"
    MY_URL="mysql://root@127.0.0.1:3306"
    return
  fi
  MY_URL="mysql://root@127.0.0.1:$MY_PORT"
  MY_RESTART="$0 restart-mariadb"
  if my_ready "$MY_PORT"; then
    my_binlog_ok "$MY_PORT" || { log "MariaDB on $MY_PORT has no ROW/FULL binlog"; exit 1; }
    return
  fi
  mkdir -p "$MY_DIR"
  cat > "$MY_DIR/my.cnf" <<CNF
[mariadbd]
datadir=$MY_DIR/data
socket=$MY_DIR/mariadb.sock
pid-file=$MY_DIR/mariadb.pid
port=$MY_PORT
bind-address=127.0.0.1
user=mysql
log_bin=$MY_DIR/data/binlog
binlog_format=ROW
binlog_row_image=FULL
binlog_row_metadata=FULL
server_id=1
innodb_flush_log_at_trx_commit=2
sync_binlog=0
skip-name-resolve
CNF
  chown -R mysql:mysql "$MY_DIR"
  if [ ! -d "$MY_DIR/data/mysql" ]; then
    log "initialising MariaDB in $MY_DIR"
    mariadb-install-db --defaults-file="$MY_DIR/my.cnf" --auth-root-authentication-method=normal \
      --skip-test-db >/dev/null 2>&1
  fi
  log "starting MariaDB on $MY_PORT"
  setsid mariadbd --defaults-file="$MY_DIR/my.cnf" >"$MY_DIR/server.log" 2>&1 < /dev/null &
  wait_until my_ready "$MY_PORT" || { log "MariaDB did not start; see $MY_DIR/server.log"; exit 1; }
  touch "$BASE/mariadb.started-by-us"
}

kafka_ready() { (exec 3<>"/dev/tcp/127.0.0.1/$KAFKA_PORT") 2>/dev/null; }

start_kafka() {
  KAFKA="127.0.0.1:$KAFKA_PORT"
  if kafka_ready; then
    return
  fi
  if [ ! -x "$TANSU_ROOT/bin/tansu" ]; then
    log "building the tansu broker into $TANSU_ROOT (once; a few minutes)"
    # No LTO, many codegen units: most of the speed of a release build for
    # well under the time of tansu's own release profile.
    CARGO_PROFILE_RELEASE_LTO=false CARGO_PROFILE_RELEASE_CODEGEN_UNITS=16 \
      CARGO_PROFILE_RELEASE_DEBUG=0 \
      cargo install tansu --version 0.6.0 --locked --features dynostore,libsql \
      --root "$TANSU_ROOT" >&2
  fi
  log "starting tansu on $KAFKA_PORT"
  # SQLite storage, new each start (tests use topics of their own): tansu
  # 0.6's memory storage returns nothing to a fetch that starts inside a
  # record batch, which a consumer resuming from a snapshot's offset does.
  rm -rf "$BASE/tansu"
  mkdir -p "$BASE/tansu"
  (cd "$BASE/tansu" && exec setsid "$TANSU_ROOT/bin/tansu" broker \
    --listener-url "tcp://127.0.0.1:$KAFKA_PORT" \
    --advertised-listener-url "tcp://127.0.0.1:$KAFKA_PORT" \
    --storage-engine sqlite://tansu.db >"$BASE/tansu.log" 2>&1 < /dev/null) &
  echo $! > "$BASE/tansu.pid"
  wait_until kafka_ready || { log "tansu did not start; see $BASE/tansu.log"; exit 1; }
  touch "$BASE/tansu.started-by-us"
}

redis_ready() { redis-cli -h 127.0.0.1 -p "$REDIS_PORT" ping >/dev/null 2>&1; }

# Redis keeps nothing on disk here: the benchmark loads it each run.
start_redis() {
  redis_ready && return
  log "starting Redis on $REDIS_PORT"
  mkdir -p "$BASE/redis"
  redis-server --bind 127.0.0.1 --port "$REDIS_PORT" --save "" --appendonly no \
    --dir "$BASE/redis" --daemonize yes --pidfile "$BASE/redis/redis.pid" \
    --logfile "$BASE/redis/redis.log" >&2
  wait_until redis_ready || { log "Redis did not start; see $BASE/redis/redis.log"; exit 1; }
  touch "$BASE/redis.started-by-us"
}

print_env() {
  echo "export FABRIC_TEST_KAFKA=${KAFKA:-127.0.0.1:$KAFKA_PORT}"
  # The broker binary, for tests that run (and kill) a broker of their own.
  echo "export FABRIC_TEST_TANSU=$TANSU_ROOT/bin/tansu"
  echo "export FABRIC_TEST_PG_URL=${PG_URL}"
  echo "export FABRIC_TEST_MYSQL_URL=${MY_URL}"
  echo "export FABRIC_TEST_REDIS_URL=redis://127.0.0.1:$REDIS_PORT"
  echo "export FABRIC_TEST_CHROMIUM=$(command -v chromium || true)"
  # Tests that restart a database mid-stream use these.
  echo "export FABRIC_TEST_PG_RESTART='${PG_RESTART:-}'"
  echo "export FABRIC_TEST_PG_CRASH='${PG_CRASH:-}'"
  echo "export FABRIC_TEST_MYSQL_RESTART='${MY_RESTART:-}'"
}

stop() {
  if [ -f "$BASE/redis.started-by-us" ] && [ -f "$BASE/redis/redis.pid" ]; then
    local rpid; rpid="$(cat "$BASE/redis/redis.pid")"
    log "stopping Redis (pid $rpid)"
    kill -TERM "$rpid" 2>/dev/null || true
    rm -f "$BASE/redis.started-by-us"
  fi
  if [ -f "$BASE/tansu.started-by-us" ] && [ -f "$BASE/tansu.pid" ]; then
    local tpid; tpid="$(cat "$BASE/tansu.pid")"
    log "stopping tansu (pid $tpid)"
    kill -KILL "$tpid" 2>/dev/null || true
    rm -f "$BASE/tansu.started-by-us"
  fi
  if [ -f "$BASE/pg.started-by-us" ] && [ -f "$PG_DIR/postmaster.pid" ]; then
    local pid; pid="$(head -n1 "$PG_DIR/postmaster.pid")"
    log "stopping PostgreSQL (pid $pid)"
    kill -INT "$pid" 2>/dev/null || true
    rm -f "$BASE/pg.started-by-us"
  fi
  if [ -f "$BASE/mariadb.started-by-us" ] && [ -f "$MY_DIR/mariadb.pid" ]; then
    local pid; pid="$(cat "$MY_DIR/mariadb.pid")"
    log "stopping MariaDB (pid $pid)"
    kill -TERM "$pid" 2>/dev/null || true
    rm -f "$BASE/mariadb.started-by-us"
  fi
}

restart_mariadb() {
  local pid; pid="$(cat "$MY_DIR/mariadb.pid")"
  kill -TERM "$pid"
  while kill -0 "$pid" 2>/dev/null; do sleep 0.1; done
  setsid mariadbd --defaults-file="$MY_DIR/my.cnf" >>"$MY_DIR/server.log" 2>&1 < /dev/null &
  wait_until my_ready "$MY_PORT" && return
  log "MariaDB did not come back"; exit 1
}

mkdir -p "$BASE"
case "${1:-start}" in
  restart-mariadb) restart_mariadb ;;
  start) install_packages; start_pg; start_mariadb; start_redis; start_kafka; print_env ;;
  env) PG_URL="$(pg_url_on "$PG_PORT")"; MY_URL="mysql://root@127.0.0.1:$MY_PORT"; print_env ;;
  stop) stop ;;
  *) echo "usage: $0 start|stop|env" >&2; exit 2 ;;
esac
