#!/usr/bin/env bash
# Runs every unit test program (build/tests/test_*) and every end-to-end
# script (tests/e2e_*.sh).  Prints a line per test and closes with
# "N passed, M failed, K skipped".  A test that exits 77 was skipped (it
# says why, e.g. no GPU): it is counted as skipped, never as passed.
# BUILD and BIN may point at another build tree.
set -u
cd "$(dirname "$0")/.."
export BUILD=${BUILD:-build} BIN=${BIN:-bin}
export BUILD=$(cd "$BUILD" && pwd) BIN=$(cd "$BIN" && pwd)
filter=${1:-}
pass=0; fail=0; skip=0; failed=()
logdir=$(mktemp -d)
run_one() { # name, command...
    local name=$1; shift
    [ -n "$filter" ] && [[ "$name" != *"$filter"* ]] && return
    local t0=$SECONDS
    "$@" >"$logdir/$name.log" 2>&1
    local rc=$?
    if [ $rc -eq 0 ]; then
        pass=$((pass+1)); printf 'PASS %-40s %3ds\n' "$name" $((SECONDS-t0))
    elif [ $rc -eq 77 ]; then
        skip=$((skip+1)); printf 'SKIP %-40s %s\n' "$name" "$(tail -n 1 "$logdir/$name.log")"
    else
        fail=$((fail+1)); failed+=("$name"); printf 'FAIL %-40s %3ds\n' "$name" $((SECONDS-t0))
        tail -n 40 "$logdir/$name.log" | sed 's/^/    | /'
    fi
}
for t in "$BUILD"/tests/test_*; do
    [ -x "$t" ] || continue
    run_one "$(basename "$t")" "$t"
done
for t in tests/e2e_*.sh; do
    [ -f "$t" ] || continue
    run_one "$(basename "$t" .sh)" bash "$t"
done
rm -rf "$logdir"
[ ${#failed[@]} -gt 0 ] && echo "failed: ${failed[*]}"
echo "$pass passed, $fail failed, $skip skipped"
[ "$fail" -eq 0 ] && [ "$pass" -gt 0 ]
