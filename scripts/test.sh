#!/usr/bin/env bash
# Runs every check and test of Entity Fabric: formatting, lints, unit tests,
# the integration tests that start the real `fabric` binary, and a brief
# run of each fuzz target (scripts/fuzz.sh; FABRIC_FUZZ_SECONDS each).
#
# Idempotent and self-contained: scripts/services.sh starts a private
# PostgreSQL (logical decoding) and MariaDB (ROW binlog) when none is up, and
# stops them again at the end (FABRIC_KEEP_SERVICES=1 keeps them for the next
# run); the tests create their own databases, slots, SQLite files, data
# directories and loopback ports. Builds go to a target directory shared
# between checkouts (override with CARGO_TARGET_DIR), so a fresh clone on a
# machine that built before does not rebuild every dependency.
set -euo pipefail
cd "$(dirname "$0")/.."

export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/entity-fabric/target}"
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"
mkdir -p "$CARGO_TARGET_DIR"

for tool in cargo rustfmt cargo-clippy; do
  if ! command -v "$tool" >/dev/null 2>&1; then
    echo "error: $tool is not installed (install the Rust toolchain with rustfmt and clippy)" >&2
    exit 1
  fi
done

echo "== test services"
# An assignment, so that a service that fails to start fails the run here
# (an `eval "$(…)"` alone would go on without its variables).
services_env="$(scripts/services.sh start)"
eval "$services_env"
if [ "${FABRIC_KEEP_SERVICES:-0}" != 1 ]; then
  trap 'scripts/services.sh stop' EXIT
fi

echo "== cargo fmt --check"
cargo fmt --check

echo "== cargo clippy --all-targets -- -D warnings"
cargo clippy --all-targets --locked -- -D warnings

echo "== cargo test"
cargo test --locked -- --test-threads="${FABRIC_TEST_THREADS:-2}"

echo "== fuzzing (each target ${FABRIC_FUZZ_SECONDS:-20}s)"
scripts/fuzz.sh --time "${FABRIC_FUZZ_SECONDS:-20}"
