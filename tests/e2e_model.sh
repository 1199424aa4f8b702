#!/usr/bin/env bash
# End to end, without MPI: every model under tests/models/ is converted by
# $BIN/tpconvert (tp 2 and 4, one at tp 1, some --replicate-embedding), every
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
# the loop above ran the default (the embedding cut by vocabulary rows; tied:
# the embedding slice is the lm_head slice); these keep it whole
check qwen3-tiny 2 --replicate-embedding       # tied: the lm_head is a slice of the whole table
check llama-tiny 4 --replicate-embedding --compress none
echo "e2e_model: $runs conversions checked against transformers"

# Ids the model has but the tokenizer lacks: the demo model's vocabulary is
# Qwen3's 151,936, the tokenizer's 151,669 entries.  Sampling can draw a
# padding id (seed 4 and 15 of the demo prompt do at tp 1); tprun must decode
# it as nothing, keep it in --json's generated_ids, and never fail on it.
[ -x "$BIN/tprun" ] && [ -x "$BIN/tpsynth" ] || { echo "e2e_model: $BIN/tprun or $BIN/tpsynth missing" >&2; exit 1; }
"$BIN/tpsynth" --preset demo --seed 1 --quiet --tokenizer tests/data/qwen3-tokenizer/tokenizer.json.zst "$tmp/demo"
"$BIN/tpconvert" --tp 1 "$tmp/demo" "$tmp/demo-tp1" --quiet
demo_args=(--prompt "Tensor parallelism splits every layer across ranks, so" --max-new-tokens 32 --temperature 0.8)
padding_seen=0
for seed in $(seq 1 20); do
    "$BIN/tprun" "$tmp/demo-tp1" "${demo_args[@]}" --seed "$seed" --json >"$tmp/pad.json" 2>"$tmp/pad.err" ||
        { echo "e2e_model: tprun --json failed at seed $seed:" >&2; cat "$tmp/pad.err" >&2; exit 1; }
    grep -q '"generated_ids":\[' "$tmp/pad.json" || { echo "e2e_model: seed $seed: no generated_ids" >&2; exit 1; }
    n_pad=$(grep -o '"generated_ids":\[[^]]*\]' "$tmp/pad.json" | grep -oE '[0-9]+' |
            awk '$1 >= 151669 && $1 < 151936 {n++} END {print n + 0}')
    padding_seen=$((padding_seen + n_pad))
    # the streaming decoder of text mode, on the seeds that drew one
    [ "$n_pad" -eq 0 ] || "$BIN/tprun" "$tmp/demo-tp1" "${demo_args[@]}" --seed "$seed" >/dev/null 2>"$tmp/pad.err" ||
        { echo "e2e_model: tprun text mode failed at seed $seed:" >&2; cat "$tmp/pad.err" >&2; exit 1; }
done
# Without a padding id drawn the loop above proved nothing.
[ "$padding_seen" -gt 0 ] || { echo "e2e_model: no seed drew a padding id: the check did not run" >&2; exit 1; }

# --repetition-penalty (transformers' RepetitionPenaltyLogitsProcessor; the
# arithmetic is checked in test_sampling): 1.0 must give the tokens of no
# penalty; a large one must break the random model's repetitive greedy output;
# --logits stay the model's own; generation_config.json's value is the default.
greedy=(--prompt "Tensor parallelism splits every layer across ranks, so" --max-new-tokens 16 --temperature 0
        --ignore-eos --json)
gen_ids() { grep -o '"generated_ids":\[[^]]*\]' "$1"; }
distinct() { gen_ids "$1" | grep -oE '[0-9]+' | sort -u | wc -l; }
"$BIN/tprun" "$tmp/demo-tp1" "${greedy[@]}" --logits >"$tmp/rp-none.json"
"$BIN/tprun" "$tmp/demo-tp1" "${greedy[@]}" --repetition-penalty 1.0 >"$tmp/rp-1.json"
"$BIN/tprun" "$tmp/demo-tp1" "${greedy[@]}" --repetition-penalty 5 --logits >"$tmp/rp-5.json"
[ "$(gen_ids "$tmp/rp-none.json")" = "$(gen_ids "$tmp/rp-1.json")" ] ||
    { echo "e2e_model: --repetition-penalty 1.0 changed the tokens" >&2; exit 1; }
[ "$(distinct "$tmp/rp-none.json")" -le 4 ] ||
    { echo "e2e_model: the greedy baseline is not repetitive: the penalty check proves nothing" >&2; exit 1; }
[ "$(distinct "$tmp/rp-5.json")" -ge 12 ] ||
    { echo "e2e_model: --repetition-penalty 5 still repeats: $(gen_ids "$tmp/rp-5.json")" >&2; exit 1; }
cmp -s <(grep -o '"logits":.*' "$tmp/rp-none.json") <(grep -o '"logits":.*' "$tmp/rp-5.json") ||
    { echo "e2e_model: the repetition penalty changed --logits (the model's own logits)" >&2; exit 1; }
cp -r "$tmp/demo" "$tmp/demo-rp"
sed -i 's/"bos_token_id"/"repetition_penalty": 5, "bos_token_id"/' "$tmp/demo-rp/generation_config.json"
"$BIN/tpconvert" --tp 1 "$tmp/demo-rp" "$tmp/demo-rp-tp1" --quiet
"$BIN/tprun" "$tmp/demo-rp-tp1" "${greedy[@]}" >"$tmp/rp-config.json"
[ "$(gen_ids "$tmp/rp-config.json")" = "$(gen_ids "$tmp/rp-5.json")" ] ||
    { echo "e2e_model: generation_config.json's repetition_penalty 5 was not applied" >&2; exit 1; }
"$BIN/tprun" "$tmp/demo-rp-tp1" "${greedy[@]}" --repetition-penalty 1 >"$tmp/rp-flag.json"
[ "$(gen_ids "$tmp/rp-flag.json")" = "$(gen_ids "$tmp/rp-none.json")" ] ||
    { echo "e2e_model: --repetition-penalty 1 did not override generation_config.json" >&2; exit 1; }
echo "e2e_model: --repetition-penalty 1 / 5 / generation_config checked"
# A negative max_new_tokens in generation_config.json is refused, naming the key.
sed -i 's/"repetition_penalty": 5/"max_new_tokens": -3/' "$tmp/demo-rp/generation_config.json"
rm -rf "$tmp/demo-rp-tp1"
"$BIN/tpconvert" --tp 1 "$tmp/demo-rp" "$tmp/demo-rp-tp1" --quiet
if "$BIN/tprun" "$tmp/demo-rp-tp1" "${greedy[@]}" >/dev/null 2>"$tmp/neg.err" ||
        ! grep -q "generation_config.json: max_new_tokens -3" "$tmp/neg.err"; then
    echo "e2e_model: max_new_tokens -3 in generation_config.json was not refused: $(cat "$tmp/neg.err")" >&2; exit 1
fi

SEED=4 DEMO_LAUNCHER=tcp BIN="$BIN" bash tools/demo.sh >"$tmp/demo.log" 2>&1 ||
    { echo "e2e_model: SEED=4 tools/demo.sh failed:" >&2; tail -n 5 "$tmp/demo.log" >&2; exit 1; }
echo "e2e_model: 20 seeds of the demo model ($padding_seen padding ids drawn) and SEED=4 demo.sh ran"
