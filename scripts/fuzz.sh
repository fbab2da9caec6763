#!/usr/bin/env bash
# `make fuzz`: runs each cargo-fuzz target in fuzz/ for a bounded time and reports,
# per target, how many inputs libFuzzer executed and whether it crashed. Exits
# non-zero on any crash (or build failure). Not part of `make test`.
#
#   FUZZ_SECONDS=60      time per target (default 60)
#   FUZZ_TARGETS="a b"   targets to run (default: all of `cargo fuzz list`)
#   FUZZ_SANITIZER=none  faster runs without AddressSanitizer (default: address)
#
# cargo-fuzz needs nightly compiler flags; on a stable toolchain RUSTC_BOOTSTRAP=1
# unlocks them. Seeds (fuzz/seeds/<target>, committed) are read; what libFuzzer
# discovers goes to fuzz/corpus/<target> and crashing inputs to fuzz/artifacts/<target>
# (both git-ignored), with the run's output in fuzz/artifacts/<target>.log.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
log() { echo "fuzz: $*" >&2; }
export PATH="$ROOT/.local/bin:$PATH"

SECS=${FUZZ_SECONDS:-60}
SANITIZER=${FUZZ_SANITIZER:-address}
if ! [[ "$SECS" =~ ^[1-9][0-9]*$ ]]; then
  log "FUZZ_SECONDS must be a positive number of seconds, got '$SECS'"
  exit 2
fi

# 1. cargo-fuzz, project-local (same pattern as scripts/setup.sh).
CARGO_FUZZ_VERSION=0.13.2
if [ "$(.local/bin/cargo-fuzz --version 2>/dev/null | awk '{print $2}')" != "$CARGO_FUZZ_VERSION" ]; then
  log "cargo install cargo-fuzz $CARGO_FUZZ_VERSION (about a minute, once)"
  cargo install -q --locked --root .local cargo-fuzz --version "$CARGO_FUZZ_VERSION"
fi

# 2. Build every target once (release, debug assertions on so integer overflow panics).
export RUSTC_BOOTSTRAP=1
FLAGS=(--debug-assertions --sanitizer "$SANITIZER")
mkdir -p fuzz/artifacts
log "building fuzz targets (sanitizer: $SANITIZER)"
if ! cargo fuzz build "${FLAGS[@]}" >fuzz/artifacts/build.log 2>&1; then
  tail -40 fuzz/artifacts/build.log >&2
  log "build failed (full output: fuzz/artifacts/build.log)"
  exit 1
fi
read -r -a TARGETS <<<"${FUZZ_TARGETS:-$(cargo fuzz list | tr '\n' ' ')}"

# 3. Run each target for $SECS seconds.
declare -A RUNS RESULT
failed=0
start_all=$(date +%s)
for t in "${TARGETS[@]}"; do
  mkdir -p "fuzz/corpus/$t" "fuzz/artifacts/$t"
  seeds=()
  [ -d "fuzz/seeds/$t" ] && seeds=("fuzz/seeds/$t")
  out="fuzz/artifacts/$t.log"
  log "$t: ${SECS}s (log: $out)"
  start=$(date +%s)
  rc=0
  # The first corpus dir receives new inputs; the seeds are only read.
  cargo fuzz run "${FLAGS[@]}" "$t" "fuzz/corpus/$t" "${seeds[@]}" -- \
    -max_total_time="$SECS" -timeout=30 -print_final_stats=1 >"$out" 2>&1 || rc=$?
  took=$(($(date +%s) - start))

  # "Done N runs in S second(s)" on a clean finish; the final stats also after a crash.
  runs=$(grep -oE '^Done [0-9]+ runs' "$out" | awk '{print $2}' | tail -1 || true)
  [ -n "$runs" ] || runs=$(grep -oE 'stat::number_of_executed_units: *[0-9]+' "$out" | grep -oE '[0-9]+$' | tail -1 || true)
  RUNS[$t]=${runs:-?}

  if [ "$rc" = 0 ] && grep -qE '^Done [0-9]+ runs' "$out"; then
    RESULT[$t]="no crash (${took}s)"
  else
    failed=1
    artifact=$(grep -oE 'Test unit written to \S+' "$out" | awk '{print $NF}' | tail -1 || true)
    kind=$(grep -oE 'ERROR: libFuzzer: [a-z -]+' "$out" | head -1 | sed 's/ERROR: libFuzzer: //' || true)
    RESULT[$t]="CRASH${kind:+ ($kind)} rc=$rc${artifact:+, input: $artifact}"
    log "$t crashed; from $out:"
    grep -m1 -A3 'panicked at' "$out" >&2 || tail -30 "$out" >&2
    if [ -n "$artifact" ]; then
      log "reproduce: RUSTC_BOOTSTRAP=1 cargo fuzz run ${FLAGS[*]} $t $artifact"
    fi
  fi
done

echo
printf '%-14s %14s  %s\n' target executions result
for t in "${TARGETS[@]}"; do
  printf '%-14s %14s  %s\n' "$t" "${RUNS[$t]}" "${RESULT[$t]}"
done
echo "total: $(($(date +%s) - start_all))s of fuzzing, ${SECS}s per target"
if [ "$failed" != 0 ]; then
  echo "make fuzz: crash found (inputs under fuzz/artifacts/)"
  exit 1
fi
echo "make fuzz: no crash"
