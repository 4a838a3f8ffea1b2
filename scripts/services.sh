#!/usr/bin/env bash
# Test services for the integration tests and the benchmark: a PostgreSQL
# with wal_level=logical, a MariaDB with a ROW/FULL binlog, a Redis (the
# benchmark's peer), each private (own port and data directory), Debian's
# Chromium (the status page's browser test), and Apache Kafka (one KRaft
# node, its jars resolved from Maven Central once by scripts/kafka.sh;
# Kafka Connect with Debezium's jars too, for the tests that run it), started
# only when not already up. Idempotent.
#
#   scripts/services.sh start   # start what is missing, print `export ...` lines
#   scripts/services.sh stop    # stop what this script started (by PID)
#   scripts/services.sh env     # print the `export ...` lines only
#   scripts/services.sh cluster start|stop|env
#                               # a 3-node KRaft cluster (replication factor 3,
#                               # min.insync.replicas 2) on its own ports
#                               # and directories, for runs that need
#                               # replication (the long chaos run)
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
# The cluster's nodes listen on CLUSTER_PORT + 100 * n (n = 1, 2, 3), their
# controllers one port above.
CLUSTER_PORT="${FABRIC_KAFKA_CLUSTER_PORT:-19092}"
KAFKA_SH="$(cd "$(dirname "$0")" && pwd)/kafka.sh"
# Kafka Connect with Debezium's PostgreSQL connector, for the tests of the
# debezium_kafka source: its jars are resolved at start, run by the tests.
DEBEZIUM_CONNECT_SH="$(cd "$(dirname "$0")" && pwd)/debezium_connect.sh"
REDIS_PORT="${FABRIC_REDIS_PORT:-16379}"

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

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

kafka_ready() { port_open "$KAFKA_PORT"; }

# Waits (up to 60 s) for a node started into $1 to log that it serves.
wait_kafka_started() {
  for _ in $(seq 1 600); do
    grep -q 'Kafka Server started' "$1/broker.log" 2>/dev/null && return 0
    sleep 0.1
  done
  return 1
}

# One node (broker and controller) for the tests, its storage new at each
# start (tests make topics of their own); a running one is reused.
start_kafka() {
  KAFKA="127.0.0.1:$KAFKA_PORT"
  "$KAFKA_SH" libs >/dev/null
  "$DEBEZIUM_CONNECT_SH" libs >/dev/null
  if kafka_ready; then
    return
  fi
  log "starting Apache Kafka on $KAFKA_PORT"
  rm -rf "$BASE/kafka"
  mkdir -p "$BASE/kafka"
  local cport=$((KAFKA_PORT + 1))
  setsid "$KAFKA_SH" node "$BASE/kafka" 1 "$KAFKA_PORT" "$cport" "1@127.0.0.1:$cport" \
    "$("$KAFKA_SH" cluster-id)" >"$BASE/kafka/broker.log" 2>&1 < /dev/null &
  echo $! > "$BASE/kafka.pid"
  wait_kafka_started "$BASE/kafka" || { log "Kafka did not start; see $BASE/kafka/broker.log"; exit 1; }
  touch "$BASE/kafka.started-by-us"
}

cluster_bootstrap() {
  echo "127.0.0.1:$((CLUSTER_PORT + 100)),127.0.0.1:$((CLUSTER_PORT + 200)),127.0.0.1:$((CLUSTER_PORT + 300))"
}

# Three nodes, each broker and controller (a quorum of 3 voters survives one
# node's loss). Kept across starts: a stopped cluster comes back with its
# topics; `cluster stop` then `rm -rf $BASE/kafka-cluster` starts anew.
start_cluster() {
  "$KAFKA_SH" libs >/dev/null
  local voters="" n cid
  for n in 1 2 3; do
    voters="${voters:+$voters,}$n@127.0.0.1:$((CLUSTER_PORT + 100 * n + 1))"
  done
  mkdir -p "$BASE/kafka-cluster"
  [ -f "$BASE/kafka-cluster/cluster.id" ] || "$KAFKA_SH" cluster-id > "$BASE/kafka-cluster/cluster.id"
  cid="$(cat "$BASE/kafka-cluster/cluster.id")"
  for n in 1 2 3; do
    local port=$((CLUSTER_PORT + 100 * n)) dir="$BASE/kafka-cluster/$n"
    port_open "$port" && continue
    mkdir -p "$dir"
    log "starting Kafka cluster node $n on $port"
    : > "$dir/broker.log"
    setsid "$KAFKA_SH" node "$dir" "$n" "$port" "$((port + 1))" "$voters" "$cid" 384m \
      >"$dir/broker.log" 2>&1 < /dev/null &
    echo $! > "$dir/pid"
  done
  for n in 1 2 3; do
    wait_kafka_started "$BASE/kafka-cluster/$n" \
      || { log "Kafka cluster node $n did not start; see $BASE/kafka-cluster/$n/broker.log"; exit 1; }
  done
}

stop_cluster() {
  local n pid
  for n in 1 2 3; do
    [ -f "$BASE/kafka-cluster/$n/pid" ] || continue
    pid="$(cat "$BASE/kafka-cluster/$n/pid")"
    log "stopping Kafka cluster node $n (pid $pid)"
    kill -TERM "$pid" 2>/dev/null || true
    rm -f "$BASE/kafka-cluster/$n/pid"
  done
}

# A Python with confluent-kafka (Confluent's client on its own librdkafka):
# the tests' stock consumer of the entities topic, code that is not the
# fabric's. In a venv of its own, made once.
PY_VENV="${FABRIC_PY_VENV:-$HOME/.cache/entity-fabric/py-venv}"
CONFLUENT_KAFKA_VERSION=2.16.0

python_env() {
  if [ -x "$PY_VENV/bin/python" ] &&
    "$PY_VENV/bin/python" -c "import confluent_kafka, sys; sys.exit(confluent_kafka.__version__ != '$CONFLUENT_KAFKA_VERSION')" 2>/dev/null; then
    return
  fi
  log "installing confluent-kafka $CONFLUENT_KAFKA_VERSION into $PY_VENV (once)"
  python3 -m venv "$PY_VENV" >&2
  "$PY_VENV/bin/pip" install -q --disable-pip-version-check "confluent-kafka==$CONFLUENT_KAFKA_VERSION" >&2
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
  # Tests that run (and kill) brokers of their own start them with this.
  echo "export FABRIC_TEST_KAFKA_SH=$KAFKA_SH"
  echo "export FABRIC_TEST_PYTHON=$PY_VENV/bin/python"
  echo "export FABRIC_TEST_DEBEZIUM_CONNECT=$DEBEZIUM_CONNECT_SH"
  echo "export FABRIC_TEST_PG_URL=${PG_URL}"
  echo "export FABRIC_TEST_MYSQL_URL=${MY_URL}"
  echo "export FABRIC_TEST_REDIS_URL=redis://127.0.0.1:$REDIS_PORT"
  echo "export FABRIC_TEST_CHROMIUM=$(command -v chromium || true)"
  # Tests that restart a database mid-stream use these.
  echo "export FABRIC_TEST_PG_RESTART='${PG_RESTART:-}'"
  echo "export FABRIC_TEST_PG_CRASH='${PG_CRASH:-}'"
  echo "export FABRIC_TEST_MYSQL_RESTART='${MY_RESTART:-}'"
}

# Waits for process $1 to exit (up to 60 s, then SIGKILL): a start right
# after a stop must not find the old process still writing its data
# directory (seen: Kafka's removed under it, "Directory not empty").
wait_exit() {
  local pid=$1 i=0
  while kill -0 "$pid" 2>/dev/null; do
    if [ "$i" -eq 600 ]; then
      log "pid $pid still running after 60 s: SIGKILL"
      kill -KILL "$pid" 2>/dev/null || true
    fi
    [ "$i" -gt 650 ] && return
    sleep 0.1
    i=$((i + 1))
  done
}

stop() {
  local pids=()
  if [ -f "$BASE/redis.started-by-us" ] && [ -f "$BASE/redis/redis.pid" ]; then
    local rpid; rpid="$(cat "$BASE/redis/redis.pid")"
    log "stopping Redis (pid $rpid)"
    kill -TERM "$rpid" 2>/dev/null && pids+=("$rpid")
    rm -f "$BASE/redis.started-by-us"
  fi
  if [ -f "$BASE/kafka.started-by-us" ] && [ -f "$BASE/kafka.pid" ]; then
    local kpid; kpid="$(cat "$BASE/kafka.pid")"
    log "stopping Kafka (pid $kpid)"
    kill -TERM "$kpid" 2>/dev/null && pids+=("$kpid")
    rm -f "$BASE/kafka.started-by-us"
  fi
  if [ -f "$BASE/pg.started-by-us" ] && [ -f "$PG_DIR/postmaster.pid" ]; then
    local pid; pid="$(head -n1 "$PG_DIR/postmaster.pid")"
    log "stopping PostgreSQL (pid $pid)"
    kill -INT "$pid" 2>/dev/null && pids+=("$pid")
    rm -f "$BASE/pg.started-by-us"
  fi
  if [ -f "$BASE/mariadb.started-by-us" ] && [ -f "$MY_DIR/mariadb.pid" ]; then
    local pid; pid="$(cat "$MY_DIR/mariadb.pid")"
    log "stopping MariaDB (pid $pid)"
    kill -TERM "$pid" 2>/dev/null && pids+=("$pid")
    rm -f "$BASE/mariadb.started-by-us"
  fi
  local p
  for p in "${pids[@]}"; do
    wait_exit "$p"
  done
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
  start) install_packages; python_env; start_pg; start_mariadb; start_redis; start_kafka; print_env ;;
  env) PG_URL="$(pg_url_on "$PG_PORT")"; MY_URL="mysql://root@127.0.0.1:$MY_PORT"; print_env ;;
  stop) stop ;;
  cluster)
    case "${2:-start}" in
      start) start_cluster; echo "export FABRIC_TEST_KAFKA_CLUSTER=$(cluster_bootstrap)" ;;
      stop) stop_cluster ;;
      env) echo "export FABRIC_TEST_KAFKA_CLUSTER=$(cluster_bootstrap)" ;;
      *) echo "usage: $0 cluster start|stop|env" >&2; exit 2 ;;
    esac ;;
  *) echo "usage: $0 start|stop|env|cluster start|stop|env" >&2; exit 2 ;;
esac
