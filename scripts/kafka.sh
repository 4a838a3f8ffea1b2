#!/usr/bin/env bash
# Apache Kafka for the tests and the benchmark: the broker's jars resolved by
# Maven from Maven Central into a cache outside the repository (once), and
# KRaft nodes started from them on loopback. No tarball, no ZooKeeper.
#
#   scripts/kafka.sh libs
#       Resolve the jars when missing; print the directory holding them.
#   scripts/kafka.sh node DIR NODE_ID PORT CONTROLLER_PORT VOTERS CLUSTER_ID [HEAP]
#       Write DIR/server.properties, format DIR once (a formatted DIR is kept:
#       a restart keeps every topic and offset), then exec the broker in the
#       foreground: the caller's PID is the broker's, to stop (or SIGKILL).
#       VOTERS is KRaft's controller.quorum.voters, e.g. 1@127.0.0.1:19093.
#       Every node of a cluster gets the same CLUSTER_ID (`cluster-id`).
#       The broker logs to stdout; "Kafka Server started" marks it ready.
#   scripts/kafka.sh run PROPERTIES CLUSTER_ID [HEAP]
#       The same with a server.properties of the caller's (its log.dirs is
#       formatted once), e.g. one made from deploy/compose.yaml's settings.
#   scripts/kafka.sh cluster-id
#       Print a new cluster id (22 characters of base64url, as Kafka's own).
#
# FABRIC_KAFKA_VERSION picks the release (default below: the newest 4.x that
# resolved on Maven Central here); FABRIC_KAFKA_HOME the cache directory.
set -euo pipefail

KAFKA_VERSION="${FABRIC_KAFKA_VERSION:-4.4.0}"
# The broker's slf4j-api resolves at 1.7.x, so the log4j binding is the 1.7
# one (log4j-slf4j-impl); the slf4j2 binding would leave the broker silent.
LOG4J_VERSION="2.25.3"
KAFKA_HOME="${FABRIC_KAFKA_HOME:-$HOME/.cache/entity-fabric/kafka-$KAFKA_VERSION}"
LIBS="$KAFKA_HOME/libs"

log() { echo "kafka.sh: $*" >&2; }

resolve_libs() {
  [ -f "$LIBS/kafka_2.13-$KAFKA_VERSION.jar" ] && [ -f "$KAFKA_HOME/log4j2.properties" ] && return
  command -v mvn >/dev/null 2>&1 || { log "error: Maven (mvn) is not installed; apt-get install maven"; exit 1; }
  command -v java >/dev/null 2>&1 || { log "error: no java on PATH; Kafka needs Java 17 or newer"; exit 1; }
  log "resolving Apache Kafka $KAFKA_VERSION from Maven Central into $LIBS (once)"
  mkdir -p "${KAFKA_HOME%/*}"
  local work; work="$(mktemp -d "${KAFKA_HOME%/*}/.kafka-resolve.XXXXXX")"
  cat > "$work/pom.xml" <<POM
<project xmlns="http://maven.apache.org/POM/4.0.0">
  <modelVersion>4.0.0</modelVersion>
  <groupId>entity-fabric</groupId><artifactId>kafka-broker</artifactId><version>1</version>
  <dependencies>
    <dependency><groupId>org.apache.kafka</groupId><artifactId>kafka_2.13</artifactId><version>$KAFKA_VERSION</version></dependency>
    <dependency><groupId>org.apache.logging.log4j</groupId><artifactId>log4j-slf4j-impl</artifactId><version>$LOG4J_VERSION</version></dependency>
  </dependencies>
</project>
POM
  if ! mvn -q -B -f "$work/pom.xml" dependency:copy-dependencies -DincludeScope=runtime \
      -DoutputDirectory="$work/libs" >"$work/mvn.log" 2>&1; then
    log "error: Maven could not resolve kafka_2.13 $KAFKA_VERSION; its log:"
    tail -n 30 "$work/mvn.log" >&2
    exit 1
  fi
  cat > "$work/log4j2.properties" <<'LOG'
# The broker's log, to stdout (the caller sends it to a file).
status = warn
appender.out.type = Console
appender.out.name = out
appender.out.layout.type = PatternLayout
appender.out.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = info
rootLogger.appenderRef.out.ref = out
logger.kafka.name = kafka
logger.kafka.level = info
# Per-request and per-client chatter: warnings only.
logger.request.name = kafka.request.logger
logger.request.level = warn
logger.network.name = org.apache.kafka.clients.NetworkClient
logger.network.level = warn
logger.controller.name = kafka.controller
logger.controller.level = warn
logger.appinfo.name = org.apache.kafka.common.utils.AppInfoParser
logger.appinfo.level = warn
logger.config.name = org.apache.kafka.common.config.AbstractConfig
logger.config.level = warn
LOG
  mkdir -p "$KAFKA_HOME"
  rm -rf "$LIBS"
  mv "$work/libs" "$LIBS"
  mv "$work/log4j2.properties" "$KAFKA_HOME/log4j2.properties"
  rm -rf "$work"
  log "resolved $(ls "$LIBS" | wc -l) jars"
}

# 16 random bytes in unpadded base64url, never starting with "-" (the
# storage tool would take it for an option; Kafka's own ids never do).
cluster_id() {
  local id
  while :; do
    id="$(head -c 16 /dev/urandom | base64 | tr '+/' '-_' | tr -d '=\n')"
    [ "${id:0:1}" != "-" ] && break
  done
  echo -n "$id"
}

node() {
  local dir="$1" id="$2" port="$3" cport="$4" voters="$5" cid="$6" heap="${7:-512m}"
  resolve_libs
  mkdir -p "$dir/data"
  # One node of the cluster: broker and controller in one process. Small
  # internal topics for one node; a cluster (3 voters) replicates them 3
  # times with min ISR 2, as production does.
  local n rf isr
  n="$(tr ',' '\n' <<<"$voters" | grep -c @)"
  if [ "$n" -ge 3 ]; then rf=3; isr=2; else rf=1; isr=1; fi
  cat > "$dir/server.properties" <<PROPS
process.roles=broker,controller
node.id=$id
listeners=PLAINTEXT://127.0.0.1:$port,CONTROLLER://127.0.0.1:$cport
advertised.listeners=PLAINTEXT://127.0.0.1:$port
controller.listener.names=CONTROLLER
inter.broker.listener.name=PLAINTEXT
listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT
controller.quorum.voters=$voters
log.dirs=$dir/data
num.partitions=1
default.replication.factor=$rf
min.insync.replicas=$isr
offsets.topic.replication.factor=$rf
offsets.topic.num.partitions=4
transaction.state.log.replication.factor=$rf
transaction.state.log.min.isr=$isr
transaction.state.log.num.partitions=4
share.coordinator.state.topic.replication.factor=$rf
share.coordinator.state.topic.min.isr=$isr
# Tests start groups often: no wait for more members, and the new group
# protocol (KIP-848) allowed short sessions (its minimum is 45 s by default).
group.initial.rebalance.delay.ms=0
group.consumer.min.session.timeout.ms=2000
group.consumer.session.timeout.ms=10000
group.consumer.min.heartbeat.interval.ms=500
group.consumer.heartbeat.interval.ms=1000
group.share.min.session.timeout.ms=2000
group.share.min.heartbeat.interval.ms=500
# A node SIGKILLed and restarted registers again once its old session has
# expired (9 s by default); a dead leader is fenced as soon.
broker.session.timeout.ms=3000
broker.heartbeat.interval.ms=500
# The log cleaner's buffer is allocated at start: small, for a small heap.
log.cleaner.dedupe.buffer.size=8388608
PROPS
  run "$dir/server.properties" "$cid" "$heap"
}

run() {
  local props="$1" cid="$2" heap="${3:-512m}" logdir
  resolve_libs
  logdir="$(sed -n -E 's/^log\.dirs?=([^,]*).*/\1/p' "$props" | tail -n1)"
  [ -n "$logdir" ] || { log "error: $props sets no log.dirs"; exit 1; }
  if [ ! -f "$logdir/meta.properties" ]; then
    java -Xmx256m -Dlog4j2.configurationFile="$KAFKA_HOME/log4j2.properties" -cp "$LIBS/*" \
      kafka.tools.StorageTool format -t "$cid" -c "$props" --ignore-formatted >&2
  fi
  exec java -Xmx"$heap" -XX:+UseG1GC -XX:MaxGCPauseMillis=20 \
    -XX:InitiatingHeapOccupancyPercent=35 -XX:+ExplicitGCInvokesConcurrent \
    -Djava.awt.headless=true -Dlog4j2.configurationFile="$KAFKA_HOME/log4j2.properties" \
    -cp "$LIBS/*" kafka.Kafka "$props"
}

case "${1:-}" in
  libs) resolve_libs; echo "$LIBS" ;;
  node) shift; [ $# -ge 6 ] || { log "usage: $0 node DIR NODE_ID PORT CONTROLLER_PORT VOTERS CLUSTER_ID [HEAP]"; exit 2; }; node "$@" ;;
  run) shift; [ $# -ge 2 ] || { log "usage: $0 run PROPERTIES CLUSTER_ID [HEAP]"; exit 2; }; run "$@" ;;
  cluster-id) cluster_id; echo ;;
  *) echo "usage: $0 libs | node DIR NODE_ID PORT CONTROLLER_PORT VOTERS CLUSTER_ID [HEAP] | run PROPERTIES CLUSTER_ID [HEAP] | cluster-id" >&2; exit 2 ;;
esac
