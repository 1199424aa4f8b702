#!/usr/bin/env bash
# e2e_synth.sh - the tpsynth and tpcodecbench command lines: flags, exit
# codes, messages that name the flag, the files written, and a codec
# comparison that reads back what tpsynth wrote.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-bin}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
fail() { echo "e2e_synth: $*" >&2; exit 1; }

# expect_fail CODE NEEDLE CMD...: CMD exits CODE and says NEEDLE on stderr.
expect_fail() {
    local code=$1 needle=$2 rc=0; shift 2
    "$@" >"$tmp/out" 2>"$tmp/err" || rc=$?
    [ $rc -eq "$code" ] || fail "$*: exit $rc, want $code ($(cat "$tmp/err"))"
    grep -qF -- "$needle" "$tmp/err" || fail "$*: stderr lacks '$needle': $(cat "$tmp/err")"
}

"$BIN/tpsynth" --help | grep -q -- '--preset' || fail "--help does not list --preset"
expect_fail 2 "--bogus" "$BIN/tpsynth" --bogus "$tmp/x"
expect_fail 2 "--hidden abc" "$BIN/tpsynth" --hidden abc "$tmp/x"
expect_fail 2 "--preset huge" "$BIN/tpsynth" --preset huge "$tmp/x"
expect_fail 2 "--shard-size 12Q" "$BIN/tpsynth" --shard-size 12Q "$tmp/x"
expect_fail 2 "missing OUT_DIR" "$BIN/tpsynth"
expect_fail 1 "--arch gpt2" "$BIN/tpsynth" --arch gpt2 "$tmp/x"
expect_fail 1 "--heads 3" "$BIN/tpsynth" --heads 3 "$tmp/x"
[ ! -e "$tmp/x" ] || fail "a refused request left $tmp/x"

# A sharded llama with the flags overriding the preset.
"$BIN/tpsynth" --arch llama --no-tie --layers 3 --intermediate 96 --seed 3 --shard-size 40K \
    --quiet "$tmp/llama"
[ -f "$tmp/llama/model.safetensors.index.json" ] || fail "no index for --shard-size"
n_files=$(ls "$tmp/llama"/model-*-of-*.safetensors | wc -l)
[ "$n_files" -ge 3 ] || fail "--shard-size 40K gave $n_files files"
grep -q '"model_type":[[:space:]]*"llama"' "$tmp/llama/config.json" || fail "model_type not llama"
grep -q '"num_hidden_layers":[[:space:]]*3' "$tmp/llama/config.json" || fail "--layers 3 not in config"
grep -q '"intermediate_size":[[:space:]]*96' "$tmp/llama/config.json" || fail "--intermediate not in config"
grep -q '"lm_head.weight"' "$tmp/llama/model.safetensors.index.json" || fail "untied model has no lm_head"
expect_fail 1 "not empty" "$BIN/tpsynth" --quiet "$tmp/llama"

# The summary line, and the same seed giving the same bytes.
"$BIN/tpsynth" --seed 9 "$tmp/a" | grep -q "qwen3, 0.1M parameters" || fail "no summary line"
"$BIN/tpsynth" --seed 9 --threads 1 --quiet "$tmp/b"
cmp -s "$tmp/a/model.safetensors" "$tmp/b/model.safetensors" || fail "same seed, different bytes"

# tpcodecbench on a directory and on a file: byte planes must beat plain
# zstd on bf16 weights (the exponent byte compresses, the mantissa does not).
"$BIN/tpcodecbench" "$tmp/llama" >"$tmp/codec"
kv=$(tail -n 1 "$tmp/codec")
planes=$(sed -n 's/.*planes_ratio=\([0-9.]*\).*/\1/p' <<<"$kv")
plain=$(sed -n 's/.*plain_ratio=\([0-9.]*\).*/\1/p' <<<"$kv")
[ -n "$planes" ] && [ -n "$plain" ] || fail "tpcodecbench printed no ratios: $kv"
awk -v a="$planes" -v b="$plain" 'BEGIN {exit !(a > b && b > 1)}' ||
    fail "planes ratio $planes, plain ratio $plain: expected planes > plain > 1"
"$BIN/tpcodecbench" --level 1 --max-bytes 64K "$tmp/a/model.safetensors" | tail -n 1 |
    grep -q 'raw_bytes=65536 ' || fail "--max-bytes 64K not honoured"
expect_fail 2 "--level 99" "$BIN/tpcodecbench" --level 99 "$tmp/a"
expect_fail 1 "$tmp/nope" "$BIN/tpcodecbench" "$tmp/nope"
echo "e2e_synth: ok"
