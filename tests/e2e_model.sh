#!/usr/bin/env bash
# End to end, without MPI: every model under tests/models/ is converted by
# $BIN/tpconvert (tp 2 and 4, one at tp 1, some --vocab-parallel), every
# rank is loaded by the real loader (checksums verified) and run as threads
# of one process by $BUILD/tests/test_model --converted, whose logits and
# greedy tokens must match the model's reference.json (transformers, fp32).
# This checks that the converter's cut and the runtime's reading of it agree.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-bin}
BUILD=${BUILD:-build}
for exe in "$BIN/tpconvert" "$BUILD/tests/test_model"; do
    [ -x "$exe" ] || { echo "e2e_model: $exe is missing (build first)" >&2; exit 1; }
done
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

runs=0
check() { # model tp [tpconvert options...]
    local name=$1 tp=$2; shift 2
    local out="$tmp/$name-tp$tp$(printf '%s' "$@" | tr -c 'a-z0-9' '-')"
    "$BIN/tpconvert" --tp "$tp" "tests/models/$name" "$out" --quiet "$@"
    "$BUILD/tests/test_model" --converted "$out" --reference "tests/models/$name/reference.json" \
        | tail -n 1
    rm -rf "$out"
    runs=$((runs + 1))
}

n_models=0
for dir in tests/models/*/; do
    name=$(basename "$dir")
    [ -f "$dir/reference.json" ] || continue
    n_models=$((n_models + 1))
    check "$name" 2
    check "$name" 4
done
[ "$n_models" -gt 0 ] || { echo "e2e_model: no model with a reference.json under tests/models" >&2; exit 1; }
check qwen3-tiny 1
check qwen3-tiny 2 --vocab-parallel            # tied: the embedding slice is the lm_head slice
check llama-tiny 4 --vocab-parallel --compress none
echo "e2e_model: $runs conversions checked against transformers"
