#!/usr/bin/env bash
# Kafka Connect (standalone) running Debezium's PostgreSQL connector, for the
# tests of the `debezium_kafka` source: the worker's and the connector's jars
# resolved by Maven from Maven Central into a cache outside the repository
# (once), every jar on the classpath (no plugin.path), Debezium's change
# topics written to an Apache Kafka broker (e.g. scripts/kafka.sh's).
#
#   scripts/debezium_connect.sh libs
#       Resolve the jars when missing; print the directory holding them.
#   scripts/debezium_connect.sh run DIR BROKERS PG_HOST PG_PORT PG_DB TOPIC_PREFIX SLOT [SCHEMAS] [TRANSACTIONS]
#       Write DIR/worker.properties and DIR/postgres.properties, then exec
#       ConnectStandalone in the foreground: the caller's PID is the JVM's, to
#       stop (SIGTERM stops it cleanly, SIGKILL is a crash). It logs to
#       stdout. BROKERS is bootstrap.servers (e.g. 127.0.0.1:19092).
#       SCHEMAS (true|false, default true) is the JsonConverter's
#       schemas.enable for keys and values: true wraps every key and value in
#       {"schema":...,"payload":...}, false writes the payload alone.
#       TRANSACTIONS (true|false, default false) is Debezium's
#       provide.transaction.metadata: BEGIN/END records on the topic
#       TOPIC_PREFIX.transaction and a "transaction" block in every event.
#       Change events go to TOPIC_PREFIX.SCHEMA.TABLE, key = the primary key;
#       a delete is followed by a tombstone (same key, null value).
#       The connector uses pgoutput, the replication slot SLOT (made when
#       missing, kept at stop: the caller drops it) and the publication
#       SLOT_pub (made when missing), snapshot.mode=initial. The source
#       offsets live in DIR/offsets.dat: a restart on the same DIR resumes
#       where the last flush (every second) left off.
#       Readiness: wait for Debezium's log line
#           INFO Processing messages (io.debezium.connector.postgresql.PostgresStreamingChangeEventSource)
#       logged once the replication stream is open, after the initial
#       snapshot ("Snapshot completed", then "Starting streaming"). It comes
#       again after each reconnect. Changes committed after the slot was made
#       ("Creating replication slot", on the first start) are captured even
#       before it. The REST server's line is
#           REST server listening at http://127.0.0.1:PORT/
#       If PostgreSQL goes away, the task retries without end, reconnecting
#       every 2 s (retriable.restart.connector.wait.ms) from its last offset.
#
# Environment, all optional:
#   FABRIC_DEBEZIUM_CONNECT_HOME  the cache directory (default below)
#   FABRIC_CONNECT_VERSION        Kafka Connect's release (default below)
#   FABRIC_CONNECT_REST_PORT      the worker's REST port (default 0: any free)
#   FABRIC_CONNECT_HEAP           the JVM's -Xmx (default 512m)
#   FABRIC_CONNECT_NAME           the connector's name (default dbz-TOPIC_PREFIX)
#   FABRIC_DBZ_PG_USER / FABRIC_DBZ_PG_PASSWORD  (default postgres / empty)
#   FABRIC_DBZ_TABLES             table.include.list, e.g. public.items,public.b;
#                                 with it the publication holds those tables
#                                 only (publication.autocreate.mode=filtered),
#                                 without it every table (all_tables)
#   FABRIC_DBZ_EXTRA              more connector properties, one key=value a
#                                 line, appended last (so they win)
#   FABRIC_CONNECT_EXTRA          the same for the worker
set -euo pipefail

# Debezium 3.6.1 is built against Kafka 4.3.0 (its build parent's
# version.kafka) and Kafka 4.4.0 moved a class it calls
# (org.apache.kafka.common.utils.Sanitizer, now in utils.internals): on a
# 4.4.0 worker the task dies at start with NoClassDefFoundError. So the
# worker is the newest 4.3 (it talks to a 4.4 broker as to any other).
CONNECT_VERSION="${FABRIC_CONNECT_VERSION:-4.3.2}"
DEBEZIUM_VERSION="3.6.1.Final"
# connect-runtime's slf4j-api resolves at 1.7.36 (Debezium's own is
# "provided", so it adds none), so the log4j binding is the 1.7 one
# (log4j-slf4j-impl, as kafka.sh's); the slf4j2 binding would leave the
# worker silent.
LOG4J_VERSION="2.25.3"
# Debezium asks for jackson-datatype-jsr310 2.21.2; the rest of Jackson
# resolves at connect-json's version: one version for all of Jackson.
JACKSON_VERSION="2.21.7"
DBZ_HOME="${FABRIC_DEBEZIUM_CONNECT_HOME:-$HOME/.cache/entity-fabric/debezium-connect-${DEBEZIUM_VERSION%.Final}}"
LIBS="$DBZ_HOME/libs"

log() { echo "debezium_connect.sh: $*" >&2; }

resolve_libs() {
  [ -f "$LIBS/debezium-connector-postgres-$DEBEZIUM_VERSION.jar" ] \
    && [ -f "$LIBS/connect-runtime-$CONNECT_VERSION.jar" ] \
    && [ -f "$DBZ_HOME/log4j2.properties" ] && return
  command -v mvn >/dev/null 2>&1 || { log "error: Maven (mvn) is not installed; apt-get install maven"; exit 1; }
  command -v java >/dev/null 2>&1 || { log "error: no java on PATH; Kafka Connect needs Java 17 or newer"; exit 1; }
  log "resolving Kafka Connect $CONNECT_VERSION and Debezium $DEBEZIUM_VERSION from Maven Central into $LIBS (once)"
  mkdir -p "${DBZ_HOME%/*}"
  local work; work="$(mktemp -d "${DBZ_HOME%/*}/.debezium-connect-resolve.XXXXXX")"
  # The runtime comes first and Kafka's own artifacts are pinned as well, so
  # that the runtime's version wins over any kafka-clients/connect-api a
  # Debezium module might name (3.6.1 names them "provided": none comes now).
  cat > "$work/pom.xml" <<POM
<project xmlns="http://maven.apache.org/POM/4.0.0">
  <modelVersion>4.0.0</modelVersion>
  <groupId>entity-fabric</groupId><artifactId>debezium-connect</artifactId><version>1</version>
  <dependencyManagement>
    <dependencies>
      <dependency><groupId>org.apache.kafka</groupId><artifactId>kafka-clients</artifactId><version>$CONNECT_VERSION</version></dependency>
      <dependency><groupId>org.apache.kafka</groupId><artifactId>connect-api</artifactId><version>$CONNECT_VERSION</version></dependency>
      <dependency><groupId>org.apache.kafka</groupId><artifactId>connect-transforms</artifactId><version>$CONNECT_VERSION</version></dependency>
      <dependency><groupId>org.apache.kafka</groupId><artifactId>connect-json</artifactId><version>$CONNECT_VERSION</version></dependency>
      <dependency><groupId>com.fasterxml.jackson.datatype</groupId><artifactId>jackson-datatype-jsr310</artifactId><version>$JACKSON_VERSION</version></dependency>
    </dependencies>
  </dependencyManagement>
  <dependencies>
    <dependency><groupId>org.apache.kafka</groupId><artifactId>connect-runtime</artifactId><version>$CONNECT_VERSION</version></dependency>
    <dependency><groupId>org.apache.kafka</groupId><artifactId>connect-json</artifactId><version>$CONNECT_VERSION</version></dependency>
    <dependency><groupId>io.debezium</groupId><artifactId>debezium-connector-postgres</artifactId><version>$DEBEZIUM_VERSION</version></dependency>
    <dependency><groupId>org.apache.logging.log4j</groupId><artifactId>log4j-slf4j-impl</artifactId><version>$LOG4J_VERSION</version></dependency>
  </dependencies>
</project>
POM
  if ! mvn -q -B -f "$work/pom.xml" dependency:copy-dependencies -DincludeScope=runtime \
      -DoutputDirectory="$work/libs" >"$work/mvn.log" 2>&1; then
    log "error: Maven could not resolve Kafka Connect $CONNECT_VERSION / Debezium $DEBEZIUM_VERSION; its log:"
    tail -n 30 "$work/mvn.log" >&2
    exit 1
  fi
  # One version of each artifact on the classpath, or stop here.
  local dup
  dup="$(ls "$work/libs" | sed -E 's/-[0-9][^-]*(-[A-Za-z0-9.]+)*\.jar$//' | sort | uniq -d)"
  if [ -n "$dup" ]; then
    log "error: more than one version of: $dup"
    exit 1
  fi
  cat > "$work/log4j2.properties" <<'LOG'
# The worker's and the connector's log, to stdout (the caller sends it to a file).
status = warn
appender.out.type = Console
appender.out.name = out
appender.out.layout.type = PatternLayout
appender.out.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = info
rootLogger.appenderRef.out.ref = out
logger.debezium.name = io.debezium
logger.debezium.level = info
# Per-client and config chatter: warnings only.
logger.network.name = org.apache.kafka.clients.NetworkClient
logger.network.level = warn
logger.appinfo.name = org.apache.kafka.common.utils.AppInfoParser
logger.appinfo.level = warn
logger.config.name = org.apache.kafka.common.config.AbstractConfig
logger.config.level = warn
logger.reflections.name = org.reflections
logger.reflections.level = error
logger.jetty.name = org.eclipse.jetty
logger.jetty.level = warn
LOG
  mkdir -p "$DBZ_HOME"
  rm -rf "$LIBS"
  mv "$work/libs" "$LIBS"
  mv "$work/log4j2.properties" "$DBZ_HOME/log4j2.properties"
  rm -rf "$work"
  log "resolved $(ls "$LIBS" | wc -l) jars"
}

bool() {
  case "$2" in
    true|false) echo "$2" ;;
    *) log "error: $1 must be true or false, not '$2'"; exit 2 ;;
  esac
}

run() {
  local dir="$1" brokers="$2" host="$3" port="$4" db="$5" prefix="$6" slot="$7"
  local schemas transactions
  schemas="$(bool SCHEMAS "${8:-true}")"
  transactions="$(bool TRANSACTIONS "${9:-false}")"
  resolve_libs
  mkdir -p "$dir"
  dir="$(cd "$dir" && pwd)"
  local rest_port="${FABRIC_CONNECT_REST_PORT:-0}"
  local name="${FABRIC_CONNECT_NAME:-dbz-$prefix}"
  local tables="${FABRIC_DBZ_TABLES:-}" pubmode=all_tables
  [ -n "$tables" ] && pubmode=filtered

  cat > "$dir/worker.properties" <<PROPS
bootstrap.servers=$brokers
key.converter=org.apache.kafka.connect.json.JsonConverter
value.converter=org.apache.kafka.connect.json.JsonConverter
key.converter.schemas.enable=$schemas
value.converter.schemas.enable=$schemas
offset.storage.file.filename=$dir/offsets.dat
offset.flush.interval.ms=1000
# Every jar is on the classpath: no plugin.path, and the plugins are found
# through their ServiceLoader manifests (no reflective scan of the classpath).
plugin.discovery=service_load
# Port 0: any free port; the log says which ("REST server listening at").
listeners=http://127.0.0.1:$rest_port
rest.advertised.host.name=127.0.0.1
PROPS
  if [ -n "${FABRIC_CONNECT_EXTRA:-}" ]; then printf '%s\n' "$FABRIC_CONNECT_EXTRA" >> "$dir/worker.properties"; fi

  cat > "$dir/postgres.properties" <<PROPS
name=$name
connector.class=io.debezium.connector.postgresql.PostgresConnector
tasks.max=1
plugin.name=pgoutput
database.hostname=$host
database.port=$port
database.user=${FABRIC_DBZ_PG_USER:-postgres}
database.password=${FABRIC_DBZ_PG_PASSWORD:-}
database.dbname=$db
topic.prefix=$prefix
slot.name=$slot
publication.name=${slot}_pub
publication.autocreate.mode=$pubmode
${tables:+table.include.list=$tables}
provide.transaction.metadata=$transactions
tombstones.on.delete=true
snapshot.mode=initial
# A lost connection to PostgreSQL (a restart) is retried without end; wait
# 2 s between tries rather than Debezium's 10 s.
retriable.restart.connector.wait.ms=2000
# Topics made by Connect with the broker's defaults (partitions, replication).
topic.creation.default.partitions=-1
topic.creation.default.replication.factor=-1
PROPS
  if [ -n "${FABRIC_DBZ_EXTRA:-}" ]; then printf '%s\n' "$FABRIC_DBZ_EXTRA" >> "$dir/postgres.properties"; fi

  exec java -Xmx"${FABRIC_CONNECT_HEAP:-512m}" -XX:+UseG1GC -XX:MaxGCPauseMillis=20 \
    -Djava.awt.headless=true -Dlog4j2.configurationFile="$DBZ_HOME/log4j2.properties" \
    -cp "$LIBS/*" org.apache.kafka.connect.cli.ConnectStandalone \
    "$dir/worker.properties" "$dir/postgres.properties"
}

case "${1:-}" in
  libs) resolve_libs; echo "$LIBS" ;;
  run) shift; [ $# -ge 7 ] || { log "usage: $0 run DIR BROKERS PG_HOST PG_PORT PG_DB TOPIC_PREFIX SLOT [SCHEMAS] [TRANSACTIONS]"; exit 2; }; run "$@" ;;
  *) echo "usage: $0 libs | run DIR BROKERS PG_HOST PG_PORT PG_DB TOPIC_PREFIX SLOT [true|false schemas] [true|false transactions]" >&2; exit 2 ;;
esac
