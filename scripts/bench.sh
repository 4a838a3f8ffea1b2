#!/usr/bin/env bash
# The benchmark: the fabric side by side with Redis, PostgreSQL, the Kafka
# broker and (with --debezium) Debezium, in one run on this machine, over
# loopback. See BENCHMARKS.md.
#
#   scripts/bench.sh                      # every part at full size
#   scripts/bench.sh --debezium           # … with Debezium as the CDC peer
#   scripts/bench.sh --only reads --duration 5s
#   scripts/bench.sh --help               # every option
#
# Starts what it needs through scripts/services.sh (private PostgreSQL,
# MariaDB, Redis and Apache Kafka; stopped again at the end unless
# FABRIC_KEEP_SERVICES=1), builds the release binary and runs
# `fabric bench`, whose tables go to stdout (progress to stderr).
set -euo pipefail
cd "$(dirname "$0")/.."

export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/entity-fabric/target}"
eval "$(scripts/services.sh start)"
if [ "${FABRIC_KEEP_SERVICES:-0}" != 1 ]; then
  trap 'scripts/services.sh stop' EXIT
fi
cargo build --release --locked --bin fabric >&2
"$CARGO_TARGET_DIR/release/fabric" bench "$@"
