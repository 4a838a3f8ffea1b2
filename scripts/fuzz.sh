#!/usr/bin/env bash
# Coverage-guided fuzzing (libFuzzer through cargo-fuzz) of every decoder of
# bytes from outside: pgoutput, binlog events, Debezium JSON, snapshot files,
# the config loader (targets in fuzz/, entry points in src/fuzzing.rs).
#
#   scripts/fuzz.sh [--time SECONDS] [TARGET ...]   # each target SECONDS (default 60)
#
# Built without a sanitizer (`--sanitizer none`: the stable toolchain; the
# code has no unsafe of its own) into the shared target directory, so a
# second run builds nothing. Each target's corpus grows in the cache
# (~/.cache/entity-fabric/fuzz-corpus/TARGET) from the committed seeds
# (fuzz/seeds/TARGET). A crash, a timeout (10 s on one input) or an input
# that makes the process exceed 2 GiB fails the run; the input is written to
# fuzz/artifacts/TARGET/ -- copy it into fuzz/regressions/TARGET/ with the
# fix, where tests/fuzz_regressions.rs replays it on every test run.
set -euo pipefail
cd "$(dirname "$0")/.."

SECONDS_EACH=60
TARGETS=()
while [ $# -gt 0 ]; do
  case "$1" in
    --time) SECONDS_EACH="$2"; shift 2 ;;
    -h|--help) sed -n '2,16p' "$0"; exit 0 ;;
    *) TARGETS+=("$1"); shift ;;
  esac
done
ALL=(pgoutput binlog debezium snapshot config)
[ ${#TARGETS[@]} -gt 0 ] || TARGETS=("${ALL[@]}")

export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/entity-fabric/target}"
CORPUS_ROOT="${FABRIC_FUZZ_CORPUS:-$HOME/.cache/entity-fabric/fuzz-corpus}"
CARGO_FUZZ_VERSION=0.13.2

if ! cargo fuzz --version 2>/dev/null | grep -q "$CARGO_FUZZ_VERSION"; then
  echo "fuzz: installing cargo-fuzz $CARGO_FUZZ_VERSION (once)" >&2
  cargo install --locked --quiet cargo-fuzz --version "$CARGO_FUZZ_VERSION"
fi

for t in "${TARGETS[@]}"; do
  case " ${ALL[*]} " in *" $t "*) ;; *) echo "fuzz: no target $t (${ALL[*]})" >&2; exit 2 ;; esac
done

echo "fuzz: building ${TARGETS[*]}" >&2
for t in "${TARGETS[@]}"; do
  cargo fuzz build --sanitizer none --release "$t"
done
for t in "${TARGETS[@]}"; do
  mkdir -p "$CORPUS_ROOT/$t" "fuzz/artifacts/$t"
  extra=()
  [ "$t" = config ] && extra=(config)
  log="$CORPUS_ROOT/$t.log"
  echo "fuzz: $t for ${SECONDS_EACH}s (log: $log)" >&2
  status=0
  cargo fuzz run --sanitizer none --release "$t" \
    "$CORPUS_ROOT/$t" "fuzz/seeds/$t" "${extra[@]}" -- \
    -max_total_time="$SECONDS_EACH" -timeout=10 -rss_limit_mb=2048 \
    -max_len=65536 -artifact_prefix="fuzz/artifacts/$t/" -print_final_stats=1 \
    >"$log" 2>&1 || status=$?
  grep -E '^stat::(number_of_executed_units|new_units_added|peak_rss_mb)' "$log" |
    sed "s/^/fuzz: $t: /" >&2 || true
  if [ "$status" -ne 0 ]; then
    tail -n 40 "$log" >&2
    echo "fuzz: $t FAILED (exit $status); the input is in fuzz/artifacts/$t/" >&2
    exit 1
  fi
done
echo "fuzz: ${TARGETS[*]}: no crash in ${SECONDS_EACH}s each" >&2
