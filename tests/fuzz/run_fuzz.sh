#!/usr/bin/env bash
# Runs every libFuzzer binary $BUILD/fuzz/fuzz_* (built by `make fuzz`) for
# SECONDS seconds each, seeded from tests/fuzz/corpus/<target>/ (and
# tests/fuzz/<target>.dict when present).  New inputs go to a temporary
# directory, so the committed corpus is only read.  Fails if any fuzzer
# crashes; the crashing input is kept under $BUILD/fuzz/artifacts/.
# Usage: tests/fuzz/run_fuzz.sh [SECONDS]   (default 5)
set -u
cd "$(dirname "$0")/../.."
seconds=${1:-5}
build=${BUILD:-build}
case "$seconds" in ''|*[!0-9]*) echo "run_fuzz.sh: SECONDS must be a number, got '$seconds'" >&2; exit 2;; esac

shopt -s nullglob
targets=("$build"/fuzz/fuzz_*)
if [ ${#targets[@]} -eq 0 ]; then
    echo "run_fuzz.sh: no fuzz targets in $build/fuzz (run make fuzz)" >&2
    exit 1
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
artifacts="$build/fuzz/artifacts"
mkdir -p "$artifacts"
# UBSan reports are failures, not warnings.
export UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1
export ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=1}

failed=()
for bin in "${targets[@]}"; do
    [ -x "$bin" ] && [ -f "$bin" ] || continue
    name=$(basename "$bin")
    seeds="tests/fuzz/corpus/$name"
    new="$work/$name"
    mkdir -p "$new"
    args=(-max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 -max_len=65536
          -print_final_stats=1 -artifact_prefix="$artifacts/$name-")
    [ -f "tests/fuzz/$name.dict" ] && args+=(-dict="tests/fuzz/$name.dict")
    dirs=("$new")
    [ -d "$seeds" ] && dirs+=("$seeds")
    echo "== $name: ${seconds}s"
    if "$bin" "${args[@]}" "${dirs[@]}" >"$work/$name.log" 2>&1; then
        grep -E '^(stat::number_of_executed_units|Done )' "$work/$name.log" | sed 's/^/   /'
    else
        echo "FAIL $name (log tail below; crashing input in $artifacts/)"
        tail -n 40 "$work/$name.log" | sed 's/^/    | /'
        failed+=("$name")
    fi
done
if [ ${#failed[@]} -gt 0 ]; then
    echo "fuzzers that crashed: ${failed[*]}"
    exit 1
fi
echo "all ${#targets[@]} fuzz target(s) ran ${seconds}s without a crash"
