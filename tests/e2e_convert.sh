#!/usr/bin/env bash
# e2e_convert.sh - tpconvert on the reference models in tests/models and on
# synthetic ones (bin/tpsynth):
#   - every model at tp 1, 2, 4 (and 8 where the heads divide) with
#     --compress none and zstd, each checked by tpverify --against the source;
#     the embedding cut by vocabulary rows by default (per-rank bytes),
#     --replicate-embedding, --vocab-parallel as the default's alias; an
#     uneven vocabulary at tp 8 with kv=1 (every rank
#     holds the one kv head); --format safetensors (tpverify --against; the
#     slices are also checked by build/tests/test_st_export);
#   - the manifest: format, tp, codec, files, plan;
#   - a corrupted byte in a rank file is caught by tpverify;
#   - failures leave no output directory and no manifest: --tp 3 on 4 heads,
#     a truncated safetensors input, ENOSPC on a tiny tmpfs (skipped, saying
#     why, when no tmpfs can be mounted), an unknown model_type (and the same
#     with --plan succeeding as a safetensors export), an unknown style in
#     --plan, SIGINT;
#   - what tprun cannot run (convert/arch.c) is refused by tpconvert and
#     --dry-run: a missing tensor, more layers than weights, rope "proportional",
#     hidden_act "gelu", 1e12 sizes, a NUL byte, o_proj colwise in --plan;
#     a duplicate key is read last-wins by tpconvert and tprun; a qwen3
#     config without head_dim converts and runs (128);
#   - a non-empty OUT_DIR is refused without --force; --force replaces a
#     conversion (no file of the old one stays); --dry-run writes nothing;
#   - --force replaces only a conversion (another model's files, a foreign
#     file beside a conversion, a manifest not ours: refused, named), and
#     atomically (SIGINT, ENOSPC: the old conversion stays whole); leftovers
#     of a killed run are named and replaced; model files that are symlinks
#     out of the model dir are refused (a hub cache snapshot converts);
#     copied JSON must be an object; FIFOs never block; a source truncated
#     mid-conversion is an error naming it, leaving nothing;
#   - quantized checkpoints: FP8 (F32 and BF16 scales, weight and scale in
#     different files) at tp 1/2/4, --quantize fp8|int8 equal to the Python
#     reference's bytes, and every bad quantization input refused by name.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-bin}
tmp=$(mktemp -d "${TMPDIR:-/tmp}/e2e_convert.XXXXXX")
trap 'rm -rf "$tmp"' EXIT

die() { echo "e2e_convert: FAIL: $*" >&2; exit 1; }
note() { echo "e2e_convert: $*"; }
[ -x "$BIN/tpconvert" ] || die "$BIN/tpconvert is not built"
have_verify=0
if [ -x "$BIN/tpverify" ]; then have_verify=1; else note "NOTE: $BIN/tpverify not built: tpverify steps skipped"; fi

# expect_fail WANT CMD...: CMD exits non-zero and its stderr contains WANT.
expect_fail() {
    local want=$1; shift
    if "$@" >"$tmp/stdout" 2>"$tmp/stderr"; then
        die "succeeded, expected a failure with '$want': $*"
    fi
    grep -qF -- "$want" "$tmp/stderr" || die "$*: stderr lacks '$want': $(cat "$tmp/stderr")"
}
verify() { # out model
    [ $have_verify = 1 ] || return 0
    "$BIN/tpverify" "$1" --against "$2" --quiet >"$tmp/verify.log" 2>&1 \
        || die "tpverify $1 --against $2: $(tail -n 3 "$tmp/verify.log")"
}
json_num() { # file key: the first integer value of "key"
    grep -o "\"$2\"[[:space:]]*:[[:space:]]*[0-9]*" "$1" | head -n 1 | grep -o '[0-9]*$'
}
no_output() { # dir what
    [ ! -e "$1" ] || die "$2: $1 was left behind: $(ls -la "$1" 2>&1 | head -n 5)"
}

models=()
for d in tests/models/*/; do
    [ -f "$d/config.json" ] && models+=("${d%/}")
done
[ ${#models[@]} -ge 4 ] || die "expected the reference models in tests/models, found ${#models[@]}"

echo "== every model, tp 1/2/4(/8), none, zstd and exphuf, verified against the source"
for m in "${models[@]}"; do
    name=$(basename "$m")
    heads=$(json_num "$m/config.json" num_attention_heads)
    for tp in 1 2 4 8; do
        [ $((heads % tp)) -eq 0 ] || continue
        for codec in none zstd exphuf; do
            out="$tmp/$name-$tp-$codec"
            "$BIN/tpconvert" --tp $tp --compress $codec --quiet "$m" "$out" 2>"$tmp/err" \
                || die "tpconvert --tp $tp --compress $codec $m: $(cat "$tmp/err")"
            [ -f "$out/manifest.json" ] || die "$out: no manifest.json"
            n=$(ls "$out"/rank-*-of-*.tpshard | wc -l)
            [ "$n" -eq $tp ] || die "$out: $n rank files, want $tp"
            grep -q "\"codec\"[[:space:]]*:[[:space:]]*\"$codec\"" "$out/manifest.json" \
                || die "$out/manifest.json: codec is not $codec"
            cmp -s "$m/config.json" "$out/config.json" || die "$out/config.json differs from the source"
            if [ -f "$m/generation_config.json" ]; then
                cmp -s "$m/generation_config.json" "$out/generation_config.json" \
                    || die "$out: generation_config.json not copied"
            fi
            verify "$out" "$m"
        done
    done
    note "$name: ok (heads $heads)"
done

echo "== the embedding: vocab-parallel by default, --replicate-embedding, the lm_head and the rowwise bias"
# max_bytes DRY_RUN_OUTPUT: the "per rank (max over ranks)" figure
max_bytes() { sed -n 's/^per rank (max over ranks): \([0-9]*\) bytes.*/\1/p' "$1"; }
for m in tests/models/qwen3-tiny tests/models/llama-tiny; do
    for mode in default --vocab-parallel --replicate-embedding; do
        out="$tmp/emb-$(basename $m)$mode"
        flag=(); [ $mode = default ] || flag=($mode)
        "$BIN/tpconvert" --tp 4 "${flag[@]}" --quiet "$m" "$out" || die "tpconvert $mode $m"
        want=true; [ $mode = --replicate-embedding ] && want=false
        grep -q "\"vocab_parallel\"[[:space:]]*:[[:space:]]*$want" "$out/manifest.json" \
            || die "$out ($mode): manifest does not record vocab_parallel $want"
        "$BIN/tpconvert" --tp 4 "${flag[@]}" --dry-run "$m" >"$tmp/dry-$mode"
        verify "$out" "$m"
    done
    # the embedding of vocab V x hidden H in bf16: whole costs V*H*2, a
    # vocabulary slice ceil(V/4)*H*2 on the largest rank
    V=$(json_num "$m/config.json" vocab_size); H=$(json_num "$m/config.json" hidden_size)
    whole=$(max_bytes "$tmp/dry---replicate-embedding"); cut=$(max_bytes "$tmp/dry-default")
    [ "$((whole - cut))" -eq $((V * H * 2 - (V + 3) / 4 * H * 2)) ] \
        || die "$m: per-rank bytes $whole replicated, $cut vocab-parallel: not an embedding's 3/4 apart"
    [ "$(max_bytes "$tmp/dry---vocab-parallel")" = "$cut" ] || die "$m: --vocab-parallel is not the default"
done
expect_fail "--vocab-parallel and --replicate-embedding exclude each other" \
    "$BIN/tpconvert" --tp 2 --vocab-parallel --replicate-embedding tests/models/llama-tiny "$tmp/both"
no_output "$tmp/both" "both embedding flags"
echo '{"layers.*.self_attn.q_proj": "colwise", "embed_tokens": "vocab"}' >"$tmp/embplan.json"
expect_fail "--replicate-embedding: the plan ($tmp/embplan.json) cuts model.embed_tokens by vocabulary rows" \
    "$BIN/tpconvert" --tp 2 --replicate-embedding --plan "$tmp/embplan.json" tests/models/llama-tiny "$tmp/embplan"
no_output "$tmp/embplan" "--replicate-embedding against the plan"
"$BIN/tpconvert" --tp 2 --dry-run tests/models/llama-bias >"$tmp/dry"
grep -E 'model\.layers\.0\.self_attn\.o_proj\.bias +rowwise \(reduce\)' "$tmp/dry" >/dev/null \
    || die "dry run: o_proj.bias is not rowwise with reduce: $(grep o_proj.bias "$tmp/dry")"
grep -E '^lm_head\.weight +colwise_gather_output +\[512, 64\] +\[256, 64\]' "$tmp/dry" >/dev/null \
    || die "dry run: lm_head is not cut by vocabulary rows: $(grep lm_head "$tmp/dry")"
grep -E 'model\.layers\.1\.mlp\.down_proj\.weight +rowwise +\[64, 128\] +\[64, 64\]' "$tmp/dry" >/dev/null \
    || die "dry run: down_proj is not cut on dim 1"
# kv=1 at tp 4: every rank holds the one kv head
"$BIN/tpconvert" --tp 4 --dry-run tests/models/qwen3-kv1 >"$tmp/dry"
grep -E 'model\.layers\.0\.self_attn\.k_proj\.weight +colwise +\[32, 64\] +\[32, 64\]' "$tmp/dry" >/dev/null \
    || die "dry run: kv=1 k_proj at tp 4 is not replicated per rank: $(grep k_proj "$tmp/dry" | head -n 1)"

echo "== synthetic: 8 heads, 1 kv head, vocabulary 509 at tp 8; packed plan"
if [ -x "$BIN/tpsynth" ]; then
    syn="$tmp/syn"
    "$BIN/tpsynth" --preset tiny --arch llama --heads 8 --kv-heads 1 --head-dim 8 --vocab 509 \
        --no-tie --seed 3 --quiet "$syn" || die "tpsynth"
    "$BIN/tpconvert" --tp 8 --replicate-embedding --quiet "$syn" "$tmp/syn-8" \
        || die "tpconvert --tp 8 --replicate-embedding synthetic"
    verify "$tmp/syn-8" "$syn"
    "$BIN/tpconvert" --tp 8 --dry-run "$syn" >"$tmp/dry"
    grep -E '^lm_head\.weight +colwise_gather_output +\[509, 64\] +\[64, 64\] \(last \[61, 64\]\)' \
        "$tmp/dry" >/dev/null || die "uneven vocabulary: $(grep lm_head "$tmp/dry")"
    "$BIN/tpconvert" --tp 8 --compress none --quiet "$syn" "$tmp/syn-8vp" \
        || die "tpconvert --tp 8 synthetic (vocab-parallel embedding)"
    verify "$tmp/syn-8vp" "$syn"
else
    die "$BIN/tpsynth is not built"
fi

echo "== --format safetensors"
for m in tests/models/qwen2-tiny tests/models/qwen3-kv1; do
    out="$tmp/st-$(basename $m)"
    "$BIN/tpconvert" --tp 4 --format safetensors --quiet "$m" "$out" || die "--format safetensors $m"
    [ "$(ls "$out"/rank-*-of-00004.safetensors | wc -l)" -eq 4 ] || die "$out: not 4 safetensors files"
    grep -q '"format"[[:space:]]*:[[:space:]]*"safetensors"' "$out/manifest.json" || die "$out: format"
    verify "$out" "$m"
done

echo "== a corrupted byte is caught"
if [ $have_verify = 1 ]; then
    out="$tmp/qwen2-tiny-2-none"
    f="$out/rank-00001-of-00002.tpshard"
    # every 4 KiB block of the file, one at a time (padding between tensors
    # is not data: at least the blocks holding tensor bytes must fail)
    size=$(stat -c %s "$f")
    caught=0; tried=0
    for off in $(seq 4100 8192 $((size - 100))); do
        cp "$f" "$tmp/orig"
        old=$(od -An -tu1 -j "$off" -N1 "$f" | tr -d ' ')
        printf "$(printf '\\%03o' $(( (old + 1) % 256 )))" | dd of="$f" bs=1 seek="$off" conv=notrunc status=none
        tried=$((tried + 1))
        if ! "$BIN/tpverify" "$out" --quiet >/dev/null 2>&1; then caught=$((caught + 1)); fi
        cp "$tmp/orig" "$f"
    done
    [ $caught -gt 0 ] || die "no corrupted byte of $tried was caught"
    "$BIN/tpverify" "$out" --quiet >/dev/null 2>&1 || die "restored file does not verify"
    note "corruption: $caught of $tried flipped blocks caught (tpshard, none)"
fi

echo "== failures leave nothing"
expect_fail "num_attention_heads=4 cannot be split over tp=3" \
    "$BIN/tpconvert" --tp 3 tests/models/qwen3-tiny "$tmp/bad-tp3"
no_output "$tmp/bad-tp3" "--tp 3"
echo '{"layers.*.self_attn.k_proj": "colwise"}' >"$tmp/kvplan.json"
expect_fail "num_key_value_heads=2 cannot be split over tp=3" \
    "$BIN/tpconvert" --tp 3 --plan "$tmp/kvplan.json" \
    tests/models/qwen3-tiny "$tmp/bad-kv3"
no_output "$tmp/bad-kv3" "kv over tp 3"

cp -r tests/models/llama-tiny "$tmp/trunc"
size=$(stat -c %s "$tmp/trunc/model.safetensors")
truncate -s $((size - 1000)) "$tmp/trunc/model.safetensors"
expect_fail "model.safetensors" "$BIN/tpconvert" --tp 2 "$tmp/trunc" "$tmp/bad-trunc"
no_output "$tmp/bad-trunc" "truncated input"

cp -r tests/models/llama-tiny "$tmp/gpt"
sed -i 's/"model_type": "llama"/"model_type": "gpt_custom"/' "$tmp/gpt/config.json"
expect_fail "--plan FILE.json" "$BIN/tpconvert" --tp 2 "$tmp/gpt" "$tmp/bad-gpt"
no_output "$tmp/bad-gpt" "unknown model_type"
cat >"$tmp/plan.json" <<'EOF'
{"layers.*.self_attn.q_proj": "colwise", "layers.*.self_attn.k_proj": "colwise",
 "layers.*.self_attn.v_proj": "colwise", "layers.*.self_attn.o_proj": "rowwise",
 "layers.*.mlp.gate_proj": "local_colwise", "layers.*.mlp.up_proj": "colwise",
 "model.layers.*.mlp.down_proj": "local_rowwise", "lm_head": "colwise_rep"}
EOF
# tprun cannot run an unknown model_type: a tpshard conversion is refused,
# a safetensors export (for other runtimes) is made
expect_fail 'model_type "gpt_custom" is not supported by tprun' \
    "$BIN/tpconvert" --tp 2 --plan "$tmp/plan.json" "$tmp/gpt" "$tmp/gpt-tpshard"
no_output "$tmp/gpt-tpshard" "unknown model_type as tpshard"
"$BIN/tpconvert" --tp 2 --plan "$tmp/plan.json" --format safetensors --quiet "$tmp/gpt" "$tmp/gpt-out" \
    || die "--plan on an unknown model_type (--format safetensors)"
verify "$tmp/gpt-out" "$tmp/gpt"
grep -q 'colwise_gather_output' "$tmp/gpt-out/manifest.json" || die "manifest plan lacks the canonical lm_head style"

# config.json's base_model_tp_plan replaces the built-in plan (lm_head
# stays); this one leaves the MLP replicated, which is not what tprun runs:
# only a safetensors export takes it
cp -r tests/models/llama-tiny "$tmp/cfgplan"
sed -i 's/"model_type": "llama",/"model_type": "llama", "base_model_tp_plan": {"layers.*.self_attn.q_proj": "colwise", "layers.*.self_attn.k_proj": "colwise", "layers.*.self_attn.v_proj": "colwise", "layers.*.self_attn.o_proj": "rowwise"},/' "$tmp/cfgplan/config.json"
"$BIN/tpconvert" --tp 2 --format safetensors --dry-run "$tmp/cfgplan" >"$tmp/dry"
grep -q "plan: config.json base_model_tp_plan" "$tmp/dry" || die "config.json plan not used: $(head -n 3 "$tmp/dry")"
grep -E 'model\.layers\.0\.mlp\.down_proj\.weight +replicate ' "$tmp/dry" >/dev/null || die "config plan: down_proj not replicated"
grep -E '^lm_head\.weight +colwise_gather_output' "$tmp/dry" >/dev/null || die "config plan: lm_head lost"
expect_fail "model.layers.*.mlp.gate_proj: style replicate is not what tprun runs (colwise)" \
    "$BIN/tpconvert" --tp 2 --dry-run "$tmp/cfgplan"
"$BIN/tpconvert" --tp 2 --format safetensors --quiet "$tmp/cfgplan" "$tmp/cfgplan-out" \
    || die "config plan conversion"
verify "$tmp/cfgplan-out" "$tmp/cfgplan"

echo "== what tprun cannot run is refused before anything is written (one check: convert/arch.c)"
# arch_case NAME MODEL SED WANT: a copy of MODEL with SED applied to its
# config.json is refused by tpconvert and by --dry-run, naming WANT.
arch_case() {
    local d="$tmp/arch-$1"
    rm -rf "$d"; cp -r "$2" "$d"
    sed -i "$3" "$d/config.json"
    cmp -s "$2/config.json" "$d/config.json" && die "arch_case $1: sed changed nothing"
    expect_fail "$4" "$BIN/tpconvert" --tp 2 "$d" "$d-out"
    no_output "$d-out" "$1"
    expect_fail "$4" "$BIN/tpconvert" --tp 2 --dry-run "$d" "$d-dry"
    no_output "$d-dry" "$1 (--dry-run)"
}
arch_case layers tests/models/llama-tiny 's/"num_hidden_layers": 2/"num_hidden_layers": 3/' \
    "tensor model.layers.2.input_layernorm.weight is missing"
arch_case proportional tests/models/llama-tiny 's/"rope_type": "llama3"/"rope_type": "proportional"/' \
    'rope_scaling.rope_type "proportional" is not supported'
arch_case gelu tests/models/qwen3-tiny 's/"hidden_act": "silu"/"hidden_act": "gelu"/' 'hidden_act "gelu"'
arch_case huge tests/models/llama-tiny 's/"intermediate_size": 128/"intermediate_size": 1e12/' \
    'config.json: key "intermediate_size" = 1000000000000'
arch_case nul tests/models/llama-tiny 's/"model_type"/"model_\x00type"/' 'config.json: contains a NUL byte'
# a missing tensor: layer 1's k_norm renamed (same length) in the safetensors header
d="$tmp/arch-nokn"; rm -rf "$d"; cp -r tests/models/qwen3-tiny "$d"
LC_ALL=C sed -i 's/model\.layers\.1\.self_attn\.k_norm\.weight/model.layers.1.self_attn.k_norm.wxxxxx/' "$d/model.safetensors"
expect_fail "tensor model.layers.1.self_attn.k_norm.weight is missing" "$BIN/tpconvert" --tp 2 "$d" "$d-out"
no_output "$d-out" "missing tensor"
# a custom --plan with o_proj colwise: refused for tpshard, fine as a safetensors export
cat >"$tmp/oplan.json" <<'EOF'
{"layers.*.self_attn.q_proj": "colwise", "layers.*.self_attn.k_proj": "colwise",
 "layers.*.self_attn.v_proj": "colwise", "layers.*.self_attn.o_proj": "colwise",
 "layers.*.mlp.gate_proj": "colwise", "layers.*.mlp.up_proj": "colwise",
 "layers.*.mlp.down_proj": "rowwise"}
EOF
want="$tmp/oplan.json: model.layers.*.self_attn.o_proj: style colwise is not what tprun runs (rowwise)"
expect_fail "$want" "$BIN/tpconvert" --tp 2 --plan "$tmp/oplan.json" tests/models/llama-tiny "$tmp/oplan-out"
no_output "$tmp/oplan-out" "o_proj colwise"
expect_fail "$want" "$BIN/tpconvert" --tp 2 --plan "$tmp/oplan.json" --dry-run tests/models/llama-tiny "$tmp/oplan-dry"
no_output "$tmp/oplan-dry" "o_proj colwise (--dry-run)"
"$BIN/tpconvert" --tp 2 --plan "$tmp/oplan.json" --format safetensors --quiet tests/models/llama-tiny \
    "$tmp/oplan-st" || die "o_proj colwise as a safetensors export"
# a duplicate key: the last wins (as in Python) for tpconvert and for tprun
# alike; the first copy (7) would not match the embedding's 512 rows
d="$tmp/arch-dup"; rm -rf "$d"; cp -r tests/models/llama-tiny "$d"
sed -i 's/"vocab_size": 512/"vocab_size": 7, "vocab_size": 512/' "$d/config.json"
"$BIN/tpconvert" --tp 1 --quiet "$d" "$d-1" || die "duplicate vocab_size (last wins) refused: $(cat "$tmp/stderr" 2>/dev/null)"
"$BIN/tprun" "$d-1" --prompt-ids 1,2,3 --max-new-tokens 2 --ignore-eos --json >"$tmp/dup.out" 2>"$tmp/dup.err" \
    || die "tprun on the duplicate-key conversion: $(cat "$tmp/dup.err")"
# qwen3 without head_dim: transformers' default is 128 (not hidden / heads),
# for tpconvert and tprun alike
d="$tmp/arch-q3hd"
"$BIN/tpsynth" --preset tiny --arch qwen3 --heads 2 --kv-heads 1 --head-dim 128 --quiet "$d" || die "tpsynth"
sed -i '/"head_dim"/d' "$d/config.json"
grep -q head_dim "$d/config.json" && die "head_dim not removed"
"$BIN/tpconvert" --tp 2 --quiet "$d" "$d-out" 2>"$tmp/err" || die "qwen3 without head_dim: $(cat "$tmp/err")"
verify "$d-out" "$d"
"$BIN/tpconvert" --tp 1 --quiet "$d" "$d-1" || die "qwen3 without head_dim at tp 1"
"$BIN/tprun" "$d-1" --prompt-ids 1,2,3 --max-new-tokens 2 --ignore-eos --json >"$tmp/q3.out" 2>"$tmp/q3.err" \
    || die "tprun on qwen3 without head_dim: $(cat "$tmp/q3.err")"

echo '{"layers.*.mlp.up_proj": "diagonal"}' >"$tmp/badplan.json"
expect_fail 'style "diagonal"' "$BIN/tpconvert" --tp 2 --plan "$tmp/badplan.json" tests/models/llama-tiny "$tmp/bad-style"
grep -qF "layers.*.mlp.up_proj" "$tmp/stderr" || die "unknown style message does not name the key"
no_output "$tmp/bad-style" "unknown style"

expect_fail "--tp" "$BIN/tpconvert" tests/models/llama-tiny "$tmp/bad-notp"
expect_fail "--compress" "$BIN/tpconvert" --tp 2 --compress lz4 tests/models/llama-tiny "$tmp/bad-c"
expect_fail "--chunk-size" "$BIN/tpconvert" --tp 2 --chunk-size 3 tests/models/llama-tiny "$tmp/bad-c"
expect_fail "--level" "$BIN/tpconvert" --tp 2 --level 40 tests/models/llama-tiny "$tmp/bad-c"
expect_fail "--level is the zstd level: it means nothing with --compress exphuf (the default; add --compress zstd)" \
    "$BIN/tpconvert" --tp 2 --level 3 tests/models/llama-tiny "$tmp/bad-c"
no_output "$tmp/bad-c" "bad flags"

# ENOSPC: a 192 KiB tmpfs holds the first rank file of llama-tiny (no
# compression) but not all of them.
enospc_script='
set -u
mnt=$1; BIN=$2; model=$3
mount -t tmpfs -o size=192k tmpfs "$mnt" || exit 77
"$BIN/tpconvert" --tp 2 --compress none --quiet "$model" "$mnt/out" 2>"$mnt/../enospc.err"
rc=$?
left=$(ls -A "$mnt")
umount "$mnt"
[ $rc -ne 0 ] || { echo "tpconvert succeeded on a full disk"; exit 1; }
[ -z "$left" ] || { echo "left behind: $left"; exit 1; }
exit 0'
mkdir -p "$tmp/mnt"
set +e
if [ "$(id -u)" = 0 ]; then
    unshare -m bash -c "$enospc_script" _ "$tmp/mnt" "$(cd "$BIN" && pwd)" "$PWD/tests/models/llama-tiny" >"$tmp/enospc.log" 2>&1
else
    unshare -rm bash -c "$enospc_script" _ "$tmp/mnt" "$(cd "$BIN" && pwd)" "$PWD/tests/models/llama-tiny" >"$tmp/enospc.log" 2>&1
fi
rc=$?
set -e
if [ $rc -eq 0 ]; then
    grep -qi "space" "$tmp/enospc.err" || die "ENOSPC: message does not say the disk is full: $(cat "$tmp/enospc.err")"
    note "ENOSPC on a tiny tmpfs: refused and cleaned up ($(head -c 200 "$tmp/enospc.err"))"
elif grep -q "left behind\|succeeded" "$tmp/enospc.log"; then
    die "ENOSPC: $(cat "$tmp/enospc.log")"
else
    note "SKIPPED the ENOSPC check: cannot mount a tmpfs here ($(head -n 1 "$tmp/enospc.log"))"
fi

echo "== SIGINT cleans up"
big="$tmp/big"
"$BIN/tpsynth" --preset tiny --hidden 512 --heads 8 --kv-heads 8 --head-dim 64 --intermediate 2048 \
    --layers 4 --vocab 32000 --seed 5 --quiet "$big" || die "tpsynth big"
"$BIN/tpconvert" --tp 2 --compress zstd --level 19 --threads 1 --quiet "$big" "$tmp/int-out" 2>"$tmp/int.err" &
pid=$!
sleep 0.5
kill -INT $pid 2>/dev/null || true
set +e
wait $pid
rc=$?
set -e
if [ $rc -eq 0 ]; then
    note "SIGINT: the conversion finished before the signal (rc 0); checking it is complete"
    verify "$tmp/int-out" "$big"
else
    [ $rc -eq 130 ] || die "SIGINT: exit status $rc, want 130: $(cat "$tmp/int.err")"
    grep -q "interrupted" "$tmp/int.err" || die "SIGINT: message: $(cat "$tmp/int.err")"
    no_output "$tmp/int-out" "SIGINT"
fi

echo "== OUT_DIR rules"
mkdir "$tmp/nonempty"
echo keep >"$tmp/nonempty/notes.txt"
expect_fail "not empty" "$BIN/tpconvert" --tp 2 tests/models/llama-tiny "$tmp/nonempty"
[ ! -e "$tmp/nonempty/manifest.json" ] && [ -f "$tmp/nonempty/notes.txt" ] || die "non-empty dir was touched"
# an existing conversion: refused, then replaced by --force (no old rank file stays)
out="$tmp/llama-tiny-4-zstd"
expect_fail "--force" "$BIN/tpconvert" --tp 2 tests/models/llama-tiny "$out"
"$BIN/tpconvert" --tp 2 --force --quiet tests/models/llama-tiny "$out" || die "--force"
[ -z "$(ls "$out" | grep -- '-of-00004')" ] || die "--force left old rank files: $(ls "$out")"
[ "$(json_num "$out/manifest.json" tp)" = 2 ] || die "--force: manifest tp is not 2"
verify "$out" tests/models/llama-tiny
# never into the model directory, even with --force
cp -r tests/models/llama-tiny "$tmp/self"
expect_fail "is the model directory" "$BIN/tpconvert" --tp 2 --force "$tmp/self" "$tmp/self/."
cmp -s tests/models/llama-tiny/config.json "$tmp/self/config.json" || die "the source config.json was touched"
# an empty existing directory is fine
mkdir "$tmp/empty"
"$BIN/tpconvert" --tp 1 --quiet tests/models/llama-tiny "$tmp/empty" || die "empty OUT_DIR refused"

echo "== output and input safety (--force, symlinks, FIFOs, truncated source)"
# expect_fail_fast WANT CMD...: like expect_fail, within 10 s (a FIFO must
# never block: a hang is a failure, not a wait).
expect_fail_fast() {
    local want=$1 rc=0; shift
    timeout 10 "$@" >"$tmp/stdout" 2>"$tmp/stderr" || rc=$?
    [ $rc -ne 124 ] || die "$*: still running after 10 s (blocked?)"
    [ $rc -ne 0 ] || die "succeeded, expected a failure with '$want': $*"
    grep -qF -- "$want" "$tmp/stderr" || die "$*: stderr lacks '$want': $(cat "$tmp/stderr")"
}
no_work_dirs() { # parent what: no temporary sibling of tpconvert is left
    ! ls -A "$1" | grep -q '\.tpconvert-' || die "$2: temporary directory left: $(ls -A "$1")"
}
conv_id() { grep -o '"conversion_id"[^,]*' "$1/manifest.json"; }
sm="$tmp/safe-model"
cp -r tests/models/llama-tiny "$sm"
# --force replaces only a conversion: another model's files stay, named
mkdir "$tmp/foreign"
cp tests/models/llama-tiny/config.json "$tmp/foreign/config.json"
echo '{}' >"$tmp/foreign/tokenizer.json"
echo x >"$tmp/foreign/node-00000-of-00001.tar"
expect_fail "config.json" "$BIN/tpconvert" --tp 1 --force --quiet "$sm" "$tmp/foreign"
grep -qF "holds no conversion" "$tmp/stderr" || die "foreign dir: $(cat "$tmp/stderr")"
[ "$(ls "$tmp/foreign" | wc -l)" -eq 3 ] && [ ! -e "$tmp/foreign/manifest.json" ] || die "foreign dir touched: $(ls "$tmp/foreign")"
# a conversion with a file of someone else's beside it: refused, naming it
"$BIN/tpconvert" --tp 2 --compress none --quiet "$sm" "$tmp/conv" || die "convert conv"
echo mine >"$tmp/conv/notes.txt"
expect_fail "notes.txt is not part of the conversion" "$BIN/tpconvert" --tp 1 --force --quiet "$sm" "$tmp/conv"
[ -f "$tmp/conv/notes.txt" ] && verify "$tmp/conv" "$sm"
rm "$tmp/conv/notes.txt"
# a manifest.json that is not ours: refused
mkdir "$tmp/notours" && echo '{"name": "x"}' >"$tmp/notours/manifest.json"
expect_fail "manifest.json is not one" "$BIN/tpconvert" --tp 1 --force --quiet "$sm" "$tmp/notours"
# leftovers of a killed run are named as such, and --force replaces them
mkdir "$tmp/left" && echo x >"$tmp/left/rank-00000-of-00002.tpshard.tmp"
expect_fail "leftovers of an interrupted tpconvert run" "$BIN/tpconvert" --tp 1 --quiet "$sm" "$tmp/left"
"$BIN/tpconvert" --tp 1 --force --quiet "$sm" "$tmp/left" || die "--force over leftovers"
verify "$tmp/left" "$sm"
# a temporary directory of a killed run (nobody holds its lock) is removed
mkdir "$tmp/.fresh.tpconvert-abc123" && echo x >"$tmp/.fresh.tpconvert-abc123/rank-00000-of-00001.tpshard.tmp"
"$BIN/tpconvert" --tp 1 --quiet "$sm" "$tmp/fresh" || die "convert fresh"
no_work_dirs "$tmp" "stale temporary directory"
# --force is atomic: a SIGINT mid-way leaves the old conversion whole
old_id=$(conv_id "$tmp/conv")
"$BIN/tpconvert" --tp 2 --force --compress zstd --level 19 --threads 1 --quiet "$big" "$tmp/conv" 2>"$tmp/int.err" &
pid=$!
sleep 0.5
kill -INT $pid 2>/dev/null || true
rc=0; wait $pid || rc=$?
if [ $rc -eq 0 ]; then
    note "--force SIGINT: the conversion finished before the signal; checking it is complete"
    verify "$tmp/conv" "$big"
else
    [ $rc -eq 130 ] || die "--force SIGINT: exit status $rc: $(cat "$tmp/int.err")"
    grep -qF "previous conversion" "$tmp/int.err" || die "--force SIGINT: message: $(cat "$tmp/int.err")"
    [ "$(conv_id "$tmp/conv")" = "$old_id" ] || die "--force SIGINT: the old conversion was replaced"
    verify "$tmp/conv" "$sm"
fi
no_work_dirs "$tmp" "--force SIGINT"
# --force that succeeds: a new conversion id, nothing of the old one
"$BIN/tpconvert" --tp 1 --force --quiet "$sm" "$tmp/conv" || die "--force"
[ "$(conv_id "$tmp/conv")" != "$old_id" ] && [ ! -e "$tmp/conv/rank-00001-of-00002.tpshard" ] \
    || die "--force did not replace: $(ls "$tmp/conv")"
verify "$tmp/conv" "$sm"
# a symlinked OUT: the directory it names is replaced, the link stays
ln -s conv "$tmp/conv-link"
"$BIN/tpconvert" --tp 2 --force --quiet "$sm" "$tmp/conv-link" || die "--force through a symlink"
[ -L "$tmp/conv-link" ] && [ "$(json_num "$tmp/conv/manifest.json" tp)" = 2 ] || die "symlinked OUT"
# --force with ENOSPC: the old conversion stays (a tmpfs that holds one
# conversion of llama-tiny but not two)
force_enospc='
set -u
mnt=$1; BIN=$2; model=$3
mount -t tmpfs -o size=448k tmpfs "$mnt" || exit 77
"$BIN/tpconvert" --tp 1 --compress none --quiet "$model" "$mnt/out" || { echo "first conversion failed"; umount "$mnt"; exit 1; }
"$BIN/tpconvert" --tp 2 --compress none --force --quiet "$model" "$mnt/out" 2>"$mnt/../fenospc.err"
rc=$?
ok=0; "$BIN/tpverify" "$mnt/out" --quiet >/dev/null 2>&1 || ok=$?
left=$(ls -A "$mnt")
umount "$mnt"
[ $rc -ne 0 ] || { echo "--force succeeded on a full disk"; exit 1; }
[ $ok -eq 0 ] || { echo "old conversion damaged"; exit 1; }
[ "$left" = out ] || { echo "left behind: $left"; exit 1; }
exit 0'
mkdir -p "$tmp/fmnt"
rc=0
if [ "$(id -u)" = 0 ]; then
    unshare -m bash -c "$force_enospc" _ "$tmp/fmnt" "$(cd "$BIN" && pwd)" "$sm" >"$tmp/fenospc.log" 2>&1 || rc=$?
else
    unshare -rm bash -c "$force_enospc" _ "$tmp/fmnt" "$(cd "$BIN" && pwd)" "$sm" >"$tmp/fenospc.log" 2>&1 || rc=$?
fi
if [ $rc -eq 0 ]; then
    note "--force with ENOSPC: refused, old conversion intact ($(head -c 160 "$tmp/fenospc.err"))"
elif [ $rc -eq 77 ]; then
    note "SKIPPED --force with ENOSPC: cannot mount a tmpfs here ($(head -n 1 "$tmp/fenospc.log"))"
else
    die "--force with ENOSPC: $(cat "$tmp/fenospc.log")"
fi

# model files: symlinks out of the model directory are refused
echo '{"model_max_length": 8}' >"$tmp/outside.json"
cp -r "$sm" "$tmp/sl-model"
ln -s "$tmp/outside.json" "$tmp/sl-model/tokenizer_config.json"
expect_fail "tokenizer_config.json: symlink to $tmp/outside.json, outside the model directory" \
    "$BIN/tpconvert" --tp 1 --quiet "$tmp/sl-model" "$tmp/sl-out"
no_output "$tmp/sl-out" "symlinked tokenizer_config.json"
rm "$tmp/sl-model/tokenizer_config.json"
mv "$tmp/sl-model/model.safetensors" "$tmp/outside.safetensors"
ln -s "$tmp/outside.safetensors" "$tmp/sl-model/model.safetensors"
expect_fail "model.safetensors: symlink to $tmp/outside.safetensors, outside the model directory" \
    "$BIN/tpconvert" --tp 1 --quiet "$tmp/sl-model" "$tmp/sl-out"
# config.json too, and already at --dry-run (it is read before anything else)
cp -r "$sm" "$tmp/sl-cfg" && mv "$tmp/sl-cfg/config.json" "$tmp/outside-config.json"
ln -s "$tmp/outside-config.json" "$tmp/sl-cfg/config.json"
expect_fail "config.json: symlink to $tmp/outside-config.json, outside the model directory" \
    "$BIN/tpconvert" --tp 1 --dry-run "$tmp/sl-cfg"
# a symlink inside the model directory is fine
mkdir "$tmp/sl-model/w" && mv "$tmp/outside.safetensors" "$tmp/sl-model/w/m.safetensors"
ln -sf w/m.safetensors "$tmp/sl-model/model.safetensors"
"$BIN/tpconvert" --tp 1 --quiet "$tmp/sl-model" "$tmp/sl-out" || die "symlink inside the model dir refused"
# a Hugging Face hub cache snapshot (links into ../../blobs) converts
hub="$tmp/hub/models--t--llama-tiny"
mkdir -p "$hub/blobs" "$hub/snapshots/0123abc"
for f in config.json generation_config.json model.safetensors; do
    h=$(sha256sum "$sm/$f" | cut -c1-40)
    cp "$sm/$f" "$hub/blobs/$h"
    ln -s "../../blobs/$h" "$hub/snapshots/0123abc/$f"
done
"$BIN/tpconvert" --tp 2 --quiet "$hub/snapshots/0123abc" "$tmp/hub-out" || die "hub cache snapshot refused: $(cat "$tmp/stderr" 2>/dev/null)"
verify "$tmp/hub-out" "$sm"
# copied files must be JSON objects; written 0644 whatever the source's mode
cp -r "$sm" "$tmp/js-model"
echo 'not json' >"$tmp/js-model/tokenizer.json"
expect_fail "tokenizer.json: not valid JSON" "$BIN/tpconvert" --tp 1 --quiet "$tmp/js-model" "$tmp/js-out"
echo '[1, 2]' >"$tmp/js-model/tokenizer.json"
expect_fail "tokenizer.json: not a JSON object" "$BIN/tpconvert" --tp 1 --quiet "$tmp/js-model" "$tmp/js-out"
printf '{"a": 1}\0' >"$tmp/js-model/tokenizer.json"
expect_fail "tokenizer.json: contains a NUL byte" "$BIN/tpconvert" --tp 1 --quiet "$tmp/js-model" "$tmp/js-out"
no_output "$tmp/js-out" "bad tokenizer.json"
echo '{"a": 1}' >"$tmp/js-model/tokenizer.json" && chmod 0700 "$tmp/js-model/tokenizer.json"
(umask 022 && "$BIN/tpconvert" --tp 1 --quiet "$tmp/js-model" "$tmp/js-out") || die "good tokenizer.json refused"
[ "$(stat -c %a "$tmp/js-out/tokenizer.json")" = 644 ] || die "copied file mode $(stat -c %a "$tmp/js-out/tokenizer.json")"
# FIFOs in the model directory: refused at once, naming the file
for f in config.json model.safetensors tokenizer.json; do
    cp -r "$sm" "$tmp/fifo-model"
    rm -f "$tmp/fifo-model/$f" && mkfifo "$tmp/fifo-model/$f"
    expect_fail_fast "$f: not a regular file (fifo)" "$BIN/tpconvert" --tp 1 --quiet "$tmp/fifo-model" "$tmp/fifo-out"
    no_output "$tmp/fifo-out" "FIFO $f"
    rm -rf "$tmp/fifo-model"
done
# a source truncated while mapped (test hook: the first copy truncates it)
for fmt in tpshard safetensors; do
    cp -r "$sm" "$tmp/trunc-model"
    rc=0
    TPCONVERT_TEST_TRUNCATE_SOURCE=1 timeout 20 "$BIN/tpconvert" --tp 2 --format $fmt --quiet \
        "$tmp/trunc-model" "$tmp/trunc-out" 2>"$tmp/trunc.err" || rc=$?
    [ $rc -eq 1 ] || die "truncated source ($fmt): exit status $rc, want 1: $(cat "$tmp/trunc.err")"
    grep -qF "$tmp/trunc-model/model.safetensors: file changed while being read (truncated?)" "$tmp/trunc.err" \
        || die "truncated source ($fmt): message: $(cat "$tmp/trunc.err")"
    no_output "$tmp/trunc-out" "truncated source ($fmt)"
    no_work_dirs "$tmp" "truncated source ($fmt)"
    rm -rf "$tmp/trunc-model"
done

echo "== mixture of experts: both split modes, bad expert tensors and counts"
# tensor-parallel experts (default) and --expert-parallel: tpverify --against
# compares every rank's slice (an expert-parallel rank holds whole experts:
# per-expert tensors only in their owner's file).
for m in qwen3moe-tiny qwen3moe-dense mixtral-tiny; do
    for mode in "" --expert-parallel; do
        out="$tmp/moe-$m$mode"
        "$BIN/tpconvert" --tp 4 $mode --quiet tests/models/$m "$out" >/dev/null 2>"$tmp/err" ||
            die "$m $mode: $(cat "$tmp/err")"
        verify "$out" tests/models/$m
        want=false; [ -n "$mode" ] && want=true
        grep -q "\"expert_parallel\":[[:space:]]*$want" "$out/manifest.json" ||
            die "$m $mode: manifest does not say expert_parallel $want"
        if [ -n "$mode" ] && [ -x "$BIN/tpinspect" ]; then
            "$BIN/tpinspect" "$out" | grep -q "(expert parallel)" || die "$m: tpinspect does not show the mode"
        fi
        "$BIN/tpconvert" --tp 4 $mode --dry-run tests/models/$m "$tmp/moe-dry" >"$tmp/dry" ||
            die "$m $mode --dry-run"
        no_output "$tmp/moe-dry" "--dry-run"
    done
    [ $have_verify = 1 ] || continue
    # the two modes cut experts differently: one rank of each
    cnt_tp=$(grep -o '"tensors":[[:space:]]*[0-9]*' "$tmp/moe-$m/manifest.json" | head -n 1 | grep -o '[0-9]*$')
    cnt_ep=$(grep -o '"tensors":[[:space:]]*[0-9]*' "$tmp/moe-$m--expert-parallel/manifest.json" | head -n 1 | grep -o '[0-9]*$')
    [ "$cnt_ep" -lt "$cnt_tp" ] || die "$m: an expert-parallel rank holds $cnt_ep tensors, a tensor-parallel one $cnt_tp"
done
# num_experts not divisible by tp under --expert-parallel: names the flag and the key
expect_fail "--expert-parallel: num_local_experts = 4 is not a multiple of tp = 3" \
    "$BIN/tpconvert" --tp 3 --expert-parallel tests/models/mixtral-tiny "$tmp/moe-tp3"
no_output "$tmp/moe-tp3" "--expert-parallel tp 3"
expect_fail "--expert-parallel: model_type qwen3 has no experts" \
    "$BIN/tpconvert" --tp 2 --expert-parallel tests/models/qwen3-tiny "$tmp/moe-dense"
no_output "$tmp/moe-dense" "--expert-parallel on a dense model"
# an expert count that disagrees with config.json: the router's shape
arch_case moe-count tests/models/qwen3moe-tiny 's/"num_experts": 8/"num_experts": 6/' \
    "expert 6, but config.json says num_experts = 6"
# expert tensors of the wrong shape
arch_case moe-shape tests/models/mixtral-tiny 's/"intermediate_size": 128/"intermediate_size": 96/' \
    "(intermediate_size, hidden_size)"
# a missing expert tensor: renamed (same length) in the safetensors header
d="$tmp/arch-noexp"; rm -rf "$d"; cp -r tests/models/qwen3moe-tiny "$d"
LC_ALL=C sed -i 's/model\.layers\.1\.mlp\.experts\.5\.up_proj\.weight/model.layers.1.mlp.experts.5.up_proj.wxxxxx/' "$d/model.safetensors"
expect_fail "tensor model.layers.1.mlp.experts.5.up_proj.weight is missing" "$BIN/tpconvert" --tp 2 "$d" "$d-out"
no_output "$d-out" "missing expert tensor"
expect_fail "tensor model.layers.1.mlp.experts.5.up_proj.weight is missing" \
    "$BIN/tpconvert" --tp 2 --expert-parallel "$d" "$d-out"
no_output "$d-out" "missing expert tensor (--expert-parallel)"

echo "== quantized checkpoints (FP8 as Qwen's releases, our int8) and --quantize fp8|int8"
# The FP8 fixtures went through every tp and tpverify --against above (the
# BF16 scales compared after widening to F32); here: where the scales land,
# --quantize against the Python reference, and every bad input.
fp8out="$tmp/fp8-4"
"$BIN/tpconvert" --tp 4 --quiet tests/models/qwen3-fp8 "$fp8out" 2>"$tmp/err" || die "fp8 tp 4: $(cat "$tmp/err")"
# intermediate 384 at tp 4: rank 1 holds gate rows [96, 192), blocks [0, 2)
# of 128: the block cut by the 192 boundary is on ranks 1 and 2 both
"$BIN/tpinspect" "$fp8out" --json >"$tmp/fp8.json"
grep -q '"quant_method": *"fp8"' "$fp8out/config.json" || die "fp8: config.json lost quantization_config"
"$BIN/tpinspect" "$fp8out" >"$tmp/fp8.txt"
grep -q "F8_E4M3" "$tmp/fp8.txt" || die "tpinspect shows no F8_E4M3: $(cat "$tmp/fp8.txt")"
grep -q "quantization.*fp8" "$tmp/fp8.txt" || die "tpinspect shows no quantization: $(cat "$tmp/fp8.txt")"
grep -q '"quantization"' "$tmp/fp8.json" || die "tpinspect --json shows no quantization"
"$BIN/tpinspect" "$fp8out" --rank 1 >"$tmp/rank1" 2>"$tmp/err" || die "tpinspect --rank 1: $(cat "$tmp/err")"
grep "model.layers.0.mlp.gate_proj.weight_scale_inv" "$tmp/rank1" | grep -q "dim0:0-2 " \
    || die "rank 1's gate scale is not block rows [0, 2): $(grep gate_proj "$tmp/rank1")"
for q in fp8 int8; do
    ref=tests/models/qwen3-$q
    for tp in 1 2 4; do
        out="$tmp/quantize-$q-$tp"
        "$BIN/tpconvert" --tp $tp --quantize $q --quiet tests/models/qwen3-q256 "$out" 2>"$tmp/err" \
            || die "--quantize $q --tp $tp: $(cat "$tmp/err")"
        # the Python reference (tools/make_fixtures.py) quantized the same
        # bf16 weights: weights and F32 scales must be its bytes, so the
        # dequantized weights are equal bit for bit
        verify "$out" "$ref"
    done
    grep -q '"quantization_config"' "$out/config.json" || die "--quantize $q: config.json has no quantization_config"
    "$BIN/tpinspect" "$out" >"$tmp/q.txt"
    grep -q "quantization.*$q" "$tmp/q.txt" || die "tpinspect of --quantize $q: $(cat "$tmp/q.txt")"
done
"$BIN/tpconvert" --tp 2 --quantize int8 --quantize-lm-head --quiet tests/models/llama-tiny "$tmp/q-head" 2>"$tmp/err" \
    || die "--quantize-lm-head: $(cat "$tmp/err")"
"$BIN/tpinspect" "$tmp/q-head" --rank 1 >"$tmp/q-head.txt"
grep -q "^lm_head.weight  *I8 " "$tmp/q-head.txt" && grep -q "^lm_head.weight_scale  *F32 .*dim0:" "$tmp/q-head.txt" \
    || die "--quantize-lm-head: lm_head not I8 with its scale cut by rows: $(grep lm_head "$tmp/q-head.txt")"
grep -q '"modules_to_not_convert":[[:space:]]*\[\]' "$tmp/q-head/config.json" \
    || die "--quantize-lm-head: lm_head still listed unquantized: $(grep -A3 modules_to_not_convert "$tmp/q-head/config.json")"
expect_fail "--quantize fp8: tests/models/qwen3-fp8/config.json is already quantized" \
    "$BIN/tpconvert" --tp 1 --quantize fp8 tests/models/qwen3-fp8 "$tmp/q-again"
no_output "$tmp/q-again" "--quantize of a quantized checkpoint"
# a tied lm_head (qwen3-q256): its one table, the embedding, quantized once,
# byte for byte the Python reference's (tests/models/qwen3-*-head), and
# tpverify's own re-quantization of the bf16 source agrees
for q in fp8 int8; do
    dt=F8_E4M3; [ $q = int8 ] && dt=I8
    for tp in 1 2; do
        out="$tmp/q-tied-$q-$tp"
        "$BIN/tpconvert" --tp $tp --quantize $q --quantize-lm-head --quiet tests/models/qwen3-q256 "$out" \
            2>"$tmp/err" || die "--quantize $q --quantize-lm-head --tp $tp (tied): $(cat "$tmp/err")"
        verify "$out" tests/models/qwen3-$q-head
        verify "$out" tests/models/qwen3-q256
    done
    "$BIN/tpinspect" "$out" --rank 1 >"$tmp/q-tied.txt"
    grep -q "^model.embed_tokens.weight  *$dt .*dim0:256-512 " "$tmp/q-tied.txt" &&
        grep -q "^model.embed_tokens.weight_scale[_inv]*  *F32 .*dim0:" "$tmp/q-tied.txt" \
        || die "--quantize $q --quantize-lm-head (tied): embedding not $dt with its scale cut by rows: $(grep embed "$tmp/q-tied.txt")"
    ! grep -q "^lm_head" "$tmp/q-tied.txt" || die "--quantize $q --quantize-lm-head (tied): a second lm_head table was written"
    grep -q '"modules_to_not_convert":[[:space:]]*\[\]' "$out/config.json" \
        || die "--quantize $q --quantize-lm-head (tied): lm_head still listed unquantized: $(grep -A3 modules_to_not_convert "$out/config.json")"
    "$BIN/tpinspect" "$out" >"$tmp/q-tied.txt"
    grep -q "quantization .*lm_head (tied to the embedding) quantized" "$tmp/q-tied.txt" \
        || die "tpinspect of --quantize $q --quantize-lm-head (tied): $(grep quantization "$tmp/q-tied.txt")"
    # without the flag the table stays bf16
    "$BIN/tpinspect" "$tmp/quantize-$q-2" --rank 1 >"$tmp/q-untouched.txt"
    grep -q "^model.embed_tokens.weight  *BF16 " "$tmp/q-untouched.txt" \
        || die "--quantize $q without --quantize-lm-head quantized the tied embedding"
done
expect_fail "--quantize-lm-head needs --quantize" "$BIN/tpconvert" --tp 1 --quantize-lm-head tests/models/llama-tiny "$tmp/q-nq"
expect_fail "--quantize int4: expected fp8 or int8" "$BIN/tpconvert" --tp 1 --quantize int4 tests/models/llama-tiny "$tmp/q-nq"

# bad quantization_config
arch_case quant-method tests/models/qwen3-fp8 's/"quant_method": "fp8"/"quant_method": "awq"/' \
    'quantization_config.quant_method "awq" is not supported'
arch_case quant-static tests/models/qwen3-fp8 's/"activation_scheme": "dynamic"/"activation_scheme": "static"/' \
    'quantization_config.activation_scheme "static" is not supported'
arch_case quant-none tests/models/qwen3-fp8 's/"quantization_config"/"quantization_config_x"/' \
    'dtype F8_E4M3, but config.json has no quantization_config'
# an 8-bit tied table (qwen3-int8-head) whose config keeps lm_head, or the embedding, unquantized
arch_case quant-tied-skip tests/models/qwen3-int8-head 's/"modules_to_not_convert": \[\]/"modules_to_not_convert": ["lm_head"]/' \
    'tensor model.embed_tokens.weight: dtype I8, but config.json'"'"'s quantization_config keeps lm_head, which is tied to it, unquantized'
arch_case quant-tied-emb tests/models/qwen3-int8-head 's/"modules_to_not_convert": \[\]/"modules_to_not_convert": ["embed_tokens"]/' \
    'does not quantize model.embed_tokens (modules_to_not_convert)'
arch_case quant-skip tests/models/qwen3-fp8 's/"quant_method": "fp8",/"quant_method": "fp8", "modules_to_not_convert": ["o_proj"],/' \
    'does not quantize model.layers.0.self_attn.o_proj (modules_to_not_convert)'
# 64 x 128 blocks: every scale has the wrong number of block rows
arch_case quant-block tests/models/qwen3-fp8-bf16s 's/^\( *\)128,$/\164,/' \
    'tensor model.layers.0.mlp.down_proj.weight_scale_inv: shape [2, 3], but weight model.layers.0.mlp.down_proj.weight [256, 384] needs [4, 3] (one per weight_block_size block)'
# st_data FILE TENSOR: the byte offset of a tensor's data in a safetensors file
st_data() {
    local hl begin
    hl=$(od -An -t u8 -N 8 "$1" | tr -d ' ')
    begin=$(head -c $((8 + hl)) "$1" | grep -ao "\"$2\":{[^}]*}" | grep -o '"data_offsets":\[[0-9]*' | grep -o '[0-9]*$')
    [ -n "$begin" ] || die "st_data: no tensor $2 in $1"
    echo $((8 + hl + begin))
}
scale_case() { # name bytes(printf) message: the first BF16 scale of layer 0's q_proj patched
    local d="$tmp/scale-$1" t=model.layers.0.self_attn.q_proj.weight_scale_inv off
    rm -rf "$d"; cp -r tests/models/qwen3-fp8-bf16s "$d"
    off=$(st_data "$d/model.safetensors" "$t")
    printf "$2" | dd of="$d/model.safetensors" bs=1 seek="$off" conv=notrunc status=none
    cmp -s "$d/model.safetensors" tests/models/qwen3-fp8-bf16s/model.safetensors && die "scale_case $1: nothing patched"
    expect_fail "$3" "$BIN/tpconvert" --tp 2 "$d" "$d-out"
    no_output "$d-out" "scale $1"
}
scale_case nan '\xc0\x7f' "tensor model.layers.0.self_attn.q_proj.weight_scale_inv: element 0 is nan; scales must be finite and > 0"
scale_case inf '\x80\x7f' "element 0 is inf; scales must be finite and > 0"
scale_case zero '\x00\x00' "element 0 is 0; scales must be finite and > 0"
scale_case negative '\x80\xbf' "element 0 is -1; scales must be finite and > 0"
# tpverify --against the float source of a --quantize conversion quantizes
# it the same way; a changed source weight is then a difference
for q in fp8 int8; do verify "$tmp/quantize-$q-4" tests/models/qwen3-q256; done
d="$tmp/q256-changed"; rm -rf "$d"; cp -r tests/models/qwen3-q256 "$d"
off=$(st_data "$d/model.safetensors" model.layers.1.mlp.down_proj.weight)
printf '\x11' | dd of="$d/model.safetensors" bs=1 seek=$((off + 1)) conv=notrunc status=none
expect_fail "tensor model.layers.1.mlp.down_proj.weight differs from the source at element [0, 0]" \
    "$BIN/tpverify" "$tmp/quantize-fp8-4" --against "$d"
# a missing scale (renamed in the header, same length), a scale whose
# weight is gone, in the two-file checkpoint
d="$tmp/scale-missing"; rm -rf "$d"; cp -r tests/models/qwen3-fp8 "$d"
LC_ALL=C sed -i 's/model\.layers\.1\.mlp\.up_proj\.weight_scale_inv/model.layers.1.mlp.up_proj_weight_scale_inv/' \
    "$d/model-00002-of-00002.safetensors" "$d/model.safetensors.index.json"
expect_fail "tensor model.layers.1.mlp.up_proj.weight_scale_inv is missing (the scale of F8_E4M3 weight model.layers.1.mlp.up_proj.weight)" \
    "$BIN/tpconvert" --tp 2 "$d" "$d-out"
no_output "$d-out" "missing scale"
d="$tmp/weight-missing"; rm -rf "$d"; cp -r tests/models/qwen3-fp8 "$d"
LC_ALL=C sed -i 's/model\.layers\.1\.mlp\.up_proj\.weight"/model.layers.1.mlp.up_proj.wxxxxx"/' \
    "$d/model-00001-of-00002.safetensors" "$d/model.safetensors.index.json"
expect_fail "tensor model.layers.1.mlp.up_proj.weight_scale_inv: a quantization scale, but its weight model.layers.1.mlp.up_proj.weight is missing" \
    "$BIN/tpconvert" --tp 2 "$d" "$d-out"
no_output "$d-out" "scale without its weight"

echo "== --dry-run writes nothing"
"$BIN/tpconvert" --tp 4 --dry-run tests/models/qwen3-tiny "$tmp/dry-out" >"$tmp/dry"
no_output "$tmp/dry-out" "--dry-run"
grep -q "replicated on every rank" "$tmp/dry" || die "dry run lists no replicated tensors"
grep -q "model.embed_tokens.weight" "$tmp/dry" || die "dry run: embedding missing"
grep -q "ideal total/tp" "$tmp/dry" || die "dry run: no per-rank total"

echo "== --bundle"
if "$BIN/tpconvert" --tp 4 --bundle --ranks-per-node 2 --quiet tests/models/qwen3-tiny "$tmp/bundled" 2>"$tmp/err"; then
    [ "$(ls "$tmp/bundled"/node-*-of-00002.tar | wc -l)" -eq 2 ] || die "--bundle: not 2 node tars: $(ls "$tmp/bundled")"
else
    die "--bundle: $(cat "$tmp/err")"
fi

echo "e2e_convert: all checks passed"
