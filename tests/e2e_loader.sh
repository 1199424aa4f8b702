#!/usr/bin/env bash
# e2e_loader.sh - tpverify, tpinspect and tpbundle on real conversions
# (bin/tpconvert) of the reference models in tests/models:
#   - tpverify passes, with --against the source model too, for tpshard
#     (zstd and none) and the safetensors export, at tp 1, 2 and 4 (qwen3-kv1
#     at tp 4: several ranks hold the same kv head);
#   - a flipped data byte makes tpverify exit non-zero naming the tensor;
#   - a flipped byte of a copied file (tokenizer.json, config.json) makes
#     tpverify, tprun and tpbundle verify / unpack fail naming the file;
#     --against another model fails;
#   - an edit of manifest.json itself (rms_norm_eps in its embedded config)
#     is refused by tpverify, tpverify --against and tprun (directory and
#     bundle): the manifest's own checksum; an older manifest is refused as
#     made by an older tpconvert;
#   - a copied file over 64 MiB is refused by tpconvert, naming it;
#   - tpinspect --json holds the manifest's facts; --dump writes the tensor;
#   - tpbundle pack / verify / unpack round trip; a hostile tar is refused;
#   - a FIFO named manifest.json, a rank file, config.json or a node tar:
#     tpverify, tpinspect, tprun and tpbundle fail at once naming it;
#   - bad flags give a usage text that names the flag.
# Everything it needs must be there: a missing program or model is a failure.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-bin}
tmp=$(mktemp -d "${TMPDIR:-/tmp}/e2e_loader.XXXXXX")
trap 'rm -rf "$tmp"' EXIT

die() { echo "e2e_loader: FAIL: $*" >&2; exit 1; }
for p in tpconvert tpverify tpinspect tpbundle tprun; do
    [ -x "$BIN/$p" ] || die "$BIN/$p is not built"
done
for m in qwen2-tiny qwen3-kv1 llama-bias; do
    [ -f "tests/models/$m/config.json" ] || die "tests/models/$m is missing"
done

# expect_fail WANT CMD...: CMD exits non-zero and its stderr contains WANT.
expect_fail() {
    local want=$1; shift
    if "$@" >"$tmp/stdout" 2>"$tmp/stderr"; then
        die "succeeded, expected a failure with '$want': $*"
    fi
    grep -qF -- "$want" "$tmp/stderr" || die "$*: stderr lacks '$want': $(cat "$tmp/stderr")"
}
# expect_ok WANT CMD...: CMD exits 0 and its stdout contains WANT.
expect_ok() {
    local want=$1; shift
    "$@" >"$tmp/stdout" 2>"$tmp/stderr" || die "$* failed: $(cat "$tmp/stderr")"
    grep -qF -- "$want" "$tmp/stdout" || die "$*: stdout lacks '$want': $(cat "$tmp/stdout")"
}
# flip_byte FILE OFFSET: changes one byte in place.
flip_byte() {
    local old new
    old=$(od -An -tu1 -j "$2" -N1 "$1" | tr -d ' ')
    new=$(( (old + 1) % 256 ))
    printf "$(printf '\\%03o' "$new")" | dd of="$1" bs=1 seek="$2" conv=notrunc status=none
}

echo "== tpverify on conversions of every kind"
convert() { # model tp out [extra tpconvert flags...]
    local model=$1 tp=$2 out=$3; shift 3
    "$BIN/tpconvert" --tp "$tp" --quiet "$@" "tests/models/$model" "$out" \
        || die "tpconvert --tp $tp $* tests/models/$model failed"
}
convert qwen2-tiny 2 "$tmp/q2-zstd" --compress zstd
convert qwen2-tiny 2 "$tmp/q2-none" --compress none
convert qwen3-kv1 4 "$tmp/kv1-tp4" --vocab-parallel
convert llama-bias 1 "$tmp/bias-tp1"
convert qwen2-tiny 2 "$tmp/q2-st" --format safetensors
for case in q2-zstd:qwen2-tiny:2 q2-none:qwen2-tiny:2 kv1-tp4:qwen3-kv1:4 bias-tp1:llama-bias:1 \
            q2-st:qwen2-tiny:2; do
    IFS=: read -r out model tp <<<"$case"
    ranks="$tp ranks"; [ "$tp" = 1 ] && ranks="1 rank"
    expect_ok "tpverify: OK: $ranks," "$BIN/tpverify" "$tmp/$out" --quiet
    expect_ok "source tensors identical bit for bit" \
        "$BIN/tpverify" "$tmp/$out" --against "tests/models/$model" --quiet --threads 2
done
expect_fail "is not in the source model" "$BIN/tpverify" "$tmp/q2-zstd" --against tests/models/qwen3-kv1 --quiet

echo "== tpinspect"
id=$(grep -o '"conversion_id"[^,]*' "$tmp/q2-zstd/manifest.json" | grep -o '[0-9a-f]\{32\}')
[ ${#id} -eq 32 ] || die "no conversion id in manifest.json"
"$BIN/tpinspect" "$tmp/q2-zstd" --json >"$tmp/inspect.json" || die "tpinspect --json failed"
tr -d ' \t\n' <"$tmp/inspect.json" >"$tmp/inspect.flat"
for want in '"format":"tpshard"' '"tp":2,' "\"conversion_id\":\"$id\"" '"model_type":"qwen2"' \
            '"codec":"zstd"' '"BF16":{' '"ratio":'; do
    grep -qF -- "$want" "$tmp/inspect.flat" || die "tpinspect --json lacks $want"
done
head -c1 "$tmp/inspect.flat" | grep -q '{' || die "tpinspect --json is not one object"
tail -c1 "$tmp/inspect.flat" | grep -q '}' || die "tpinspect --json is not one object"
if command -v jq >/dev/null; then
    [ "$(jq -r '.ranks | length' "$tmp/inspect.json")" = 2 ] || die "tpinspect --json: ranks is not an array of 2"
else
    echo "   (jq not installed: the JSON is checked by grep only)"
fi
expect_ok "conversion id  $id" "$BIN/tpinspect" "$tmp/q2-zstd"
expect_ok "model.layers.0.self_attn.q_proj.weight" "$BIN/tpinspect" "$tmp/q2-zstd" --rank 1

# --dump: the norm is replicated (same bytes on both ranks), q_proj is cut (not).
for r in 0 1; do
    "$BIN/tpinspect" "$tmp/q2-zstd" --rank $r --tensor model.norm.weight --dump "$tmp/norm$r" \
        || die "tpinspect --dump model.norm.weight failed"
    "$BIN/tpinspect" "$tmp/q2-zstd" --rank $r --tensor model.layers.0.self_attn.q_proj.weight \
        --dump "$tmp/q$r" || die "tpinspect --dump q_proj failed"
done
hidden=$(grep -o '"hidden_size": *[0-9]*' tests/models/qwen2-tiny/config.json | grep -o '[0-9]*$')
[ "$(stat -c %s "$tmp/norm0")" -eq $((hidden * 2)) ] || die "dumped norm is not $hidden bf16 values"
cmp -s "$tmp/norm0" "$tmp/norm1" || die "replicated model.norm.weight differs between ranks"
[ "$(stat -c %s "$tmp/q0")" -eq $((hidden * hidden)) ] || die "dumped q_proj slice has the wrong size"
! cmp -s "$tmp/q0" "$tmp/q1" || die "the two q_proj slices are identical"
expect_fail "rank 0 has no tensor no.such.tensor" \
    "$BIN/tpinspect" "$tmp/q2-zstd" --rank 0 --tensor no.such.tensor --dump "$tmp/x"
[ ! -e "$tmp/x" ] || die "a failed --dump left a file"

echo "== a flipped byte is caught, naming the tensor"
for out in q2-none q2-zstd; do
    cp -r "$tmp/$out" "$tmp/$out-bad"
    line=$("$BIN/tpinspect" "$tmp/$out-bad" --rank 1 | grep '^model.layers.1.mlp.down_proj.weight ')
    offset=$(awk '{print $7}' <<<"$line")
    stored=$(awk '{print $8}' <<<"$line")
    flip_byte "$tmp/$out-bad/rank-00001-of-00002.tpshard" $((offset + stored / 2))
    expect_fail "model.layers.1.mlp.down_proj.weight" "$BIN/tpverify" "$tmp/$out-bad" --quiet
    grep -qF "rank 1" "$tmp/stderr" || die "tpverify did not name the rank: $(cat "$tmp/stderr")"
done
cp -r "$tmp/q2-st" "$tmp/q2-st-bad"
size=$(stat -c %s "$tmp/q2-st-bad/rank-00000-of-00002.safetensors")
flip_byte "$tmp/q2-st-bad/rank-00000-of-00002.safetensors" $((size - 3))
expect_fail "rank-00000-of-00002.safetensors" "$BIN/tpverify" "$tmp/q2-st-bad" --quiet

echo "== a damaged copied file (config.json, tokenizer.json) is caught"
# The manifest pins each copied file by size and XXH3 like the rank files.
# A stand-in tokenizer.json (tpconvert copies it as it is) rides along.
cp -r tests/models/llama-bias "$tmp/bias-tok"
printf '{"version": "1.0", "model": {"type": "BPE", "vocab": {}}}\n' >"$tmp/bias-tok/tokenizer.json"
"$BIN/tpconvert" --tp 1 --quiet "$tmp/bias-tok" "$tmp/tok-tp1" || die "tpconvert of bias-tok failed"
rm -rf "$tmp/bias-tok"
expect_ok "tpverify: OK: 1 rank," "$BIN/tpverify" "$tmp/tok-tp1" --quiet
grep -q '"xxh3":[[:space:]]*"[0-9a-f]\{16\}"' "$tmp/tok-tp1/manifest.json" || die "manifest.json has no xxh3 for copied files"
"$BIN/tprun" "$tmp/tok-tp1" --comm single --load-only >/dev/null 2>"$tmp/stderr" \
    || die "tprun --load-only of the undamaged conversion failed: $(cat "$tmp/stderr")"
cp -r "$tmp/tok-tp1" "$tmp/tok-bad"
flip_byte "$tmp/tok-bad/tokenizer.json" 30
expect_fail "tokenizer.json: checksum mismatch (file corrupted or replaced)" "$BIN/tpverify" "$tmp/tok-bad" --quiet
expect_fail "tokenizer.json: checksum mismatch (file corrupted or replaced)" \
    "$BIN/tprun" "$tmp/tok-bad" --comm single --prompt-ids "1 2" --max-new-tokens 1
expect_fail "tokenizer.json: checksum mismatch" "$BIN/tpbundle" pack "$tmp/tok-bad" --ranks-per-node 1 \
    --out "$tmp/tok-bad-bundle" --quiet
cp -r "$tmp/tok-tp1" "$tmp/cfg-bad"
flip_byte "$tmp/cfg-bad/config.json" 5
expect_fail "config.json: checksum mismatch (file corrupted or replaced)" "$BIN/tpverify" "$tmp/cfg-bad" --quiet
expect_fail "config.json: checksum mismatch (file corrupted or replaced)" \
    "$BIN/tprun" "$tmp/cfg-bad" --comm single --prompt-ids "1 2" --max-new-tokens 1
printf ' ' >>"$tmp/cfg-bad/config.json"
expect_fail "config.json: $(( $(stat -c %s "$tmp/tok-tp1/config.json") + 1 )) bytes, the manifest says" \
    "$BIN/tpverify" "$tmp/cfg-bad" --quiet
# In a bundle: a good pack, then one byte of tokenizer.json changed inside the tar.
"$BIN/tpbundle" pack "$tmp/tok-tp1" --ranks-per-node 1 --out "$tmp/tok-bundle" --quiet >/dev/null \
    || die "tpbundle pack of tok-tp1 failed"
tb=$tmp/tok-bundle/node-00000-of-00001.tar
expect_ok "holds 1 rank file" "$BIN/tpbundle" verify "$tb"
off=$(grep -obaF '"BPE"' "$tb" | head -n1 | cut -d: -f1)
[ -n "$off" ] || die "no tokenizer.json bytes found in $tb"
flip_byte "$tb" $((off + 1))
expect_fail "tokenizer.json: checksum mismatch (file corrupted or replaced)" "$BIN/tpbundle" verify "$tb"
expect_fail "tokenizer.json: checksum mismatch (file corrupted or replaced)" "$BIN/tpbundle" unpack "$tb" "$tmp/tok-out"
[ ! -e "$tmp/tok-out" ] || die "a refused unpack left $tmp/tok-out"
expect_fail "tokenizer.json: checksum mismatch (file corrupted or replaced)" \
    "$BIN/tprun" "$tb" --comm single --prompt-ids "1 2" --max-new-tokens 1

echo "== an edited manifest.json is caught by its own checksum"
# The embedded config is what tprun's model reads: 1e-06 -> 1e-04 changed
# the logits and passed every check before the manifest had a checksum.
cp -r "$tmp/tok-tp1" "$tmp/man-eps"
grep -q '"rms_norm_eps":[[:space:]]*1e-06' "$tmp/man-eps/manifest.json" || die "no rms_norm_eps in manifest.json"
sed -i 's/\("rms_norm_eps":[[:space:]]*\)1e-06/\11e-04/' "$tmp/man-eps/manifest.json"
grep -q '"rms_norm_eps":[[:space:]]*1e-04' "$tmp/man-eps/manifest.json" || die "the edit of manifest.json did not happen"
want="man-eps/manifest.json: checksum mismatch (the manifest was edited or corrupted after tpconvert wrote it)"
expect_fail "$want" "$BIN/tpverify" "$tmp/man-eps" --quiet
expect_fail "$want" "$BIN/tpverify" "$tmp/man-eps" --against tests/models/llama-bias --quiet
expect_fail "$want" "$BIN/tprun" "$tmp/man-eps" --comm single --prompt-ids "1 2" --max-new-tokens 1
# The same edit inside a node bundle (same length, so the tar stays whole).
"$BIN/tpbundle" pack "$tmp/tok-tp1" --ranks-per-node 1 --out "$tmp/eps-bundle" --quiet >/dev/null \
    || die "tpbundle pack of tok-tp1 failed"
eb=$tmp/eps-bundle/node-00000-of-00001.tar
"$BIN/tprun" "$eb" --comm single --load-only >/dev/null 2>"$tmp/stderr" \
    || die "tprun --load-only of the undamaged bundle failed: $(cat "$tmp/stderr")"
off=$(grep -obaF '1e-06' "$eb" | head -n1 | cut -d: -f1)
[ -n "$off" ] || die "no rms_norm_eps bytes found in $eb"
printf '4' | dd of="$eb" bs=1 seek=$((off + 4)) conv=notrunc status=none
expect_fail "manifest.json: checksum mismatch" "$BIN/tprun" "$eb" --comm single --prompt-ids "1 2" --max-new-tokens 1
expect_fail "manifest.json: checksum mismatch" "$BIN/tpbundle" verify "$eb"
# A manifest of format version 1 (no checksum yet) is refused, not misread.
cp -r "$tmp/tok-tp1" "$tmp/man-v1"
sed -i 's/"format_version":[[:space:]]*2/"format_version":\t1/' "$tmp/man-v1/manifest.json"
perl -0pi -e 's/,\s*"manifest_xxh3":\s*"[0-9a-f]{16}"//' "$tmp/man-v1/manifest.json"
! grep -q manifest_xxh3 "$tmp/man-v1/manifest.json" || die "manifest_xxh3 still in the version 1 manifest"
expect_fail "format version 1 was made by an older tpconvert (this build reads 2): convert again" \
    "$BIN/tpverify" "$tmp/man-v1" --quiet
expect_fail "made by an older tpconvert" "$BIN/tprun" "$tmp/man-v1" --comm single --load-only

echo "== a copied file over the 64 MiB limit is refused by tpconvert"
cp -r tests/models/llama-bias "$tmp/big-tok"
truncate -s $((64 * 1024 * 1024 + 1)) "$tmp/big-tok/tokenizer.json"   # sparse: costs no disk
expect_fail "big-tok/tokenizer.json: file is 67108865 bytes, more than the 67108864 allowed" \
    "$BIN/tpconvert" --tp 1 --quiet "$tmp/big-tok" "$tmp/big-tok-out"
[ ! -e "$tmp/big-tok-out/manifest.json" ] || die "a refused conversion left a manifest"
rm -rf "$tmp/big-tok"

echo "== tpbundle"
"$BIN/tpbundle" pack "$tmp/kv1-tp4" --ranks-per-node 2 --out "$tmp/bundles" --quiet >"$tmp/list" \
    || die "tpbundle pack failed"
[ "$(wc -l <"$tmp/list")" -eq 2 ] || die "tpbundle pack did not list 2 bundles: $(cat "$tmp/list")"
for n in 0 1; do
    b=$tmp/bundles/node-0000$n-of-00002.tar
    [ -f "$b" ] || die "$b missing"
    expect_ok "holds 2 rank files" "$BIN/tpbundle" verify "$b"
    expect_ok "2 rank files, every checksum matches" "$BIN/tpverify" "$b"
    expect_ok "unpacked" "$BIN/tpbundle" unpack "$b" "$tmp/node$n"
    for r in $((2 * n)) $((2 * n + 1)); do
        f=rank-0000$r-of-00004.tpshard
        cmp -s "$tmp/kv1-tp4/$f" "$tmp/node$n/$f" || die "unpacked $f differs"
    done
    cmp -s "$tmp/kv1-tp4/manifest.json" "$tmp/node$n/manifest.json" || die "unpacked manifest differs"
done
[ ! -e "$tmp/node0/rank-00002-of-00004.tpshard" ] || die "node 0 got rank 2"
ls -A "$tmp/bundles" | grep -q tmp && die "tpbundle pack left temporary files"
expect_fail "not empty" "$BIN/tpbundle" unpack "$tmp/bundles/node-00000-of-00002.tar" "$tmp/node0"

# A bundle of a directory with a flipped byte: verify names the tensor.
"$BIN/tpbundle" pack "$tmp/q2-none-bad" --ranks-per-node 2 --out "$tmp/bad-bundle" --quiet >/dev/null \
    || die "tpbundle pack of q2-none-bad failed"
expect_fail "model.layers.1.mlp.down_proj.weight" "$BIN/tpbundle" verify "$tmp/bad-bundle/node-00000-of-00001.tar"

# A hostile bundle made with the system tar: an entry the manifest does not list.
mkdir "$tmp/evil"
cp "$tmp/kv1-tp4/manifest.json" "$tmp/evil/"
echo 'echo pwned' >"$tmp/evil/evil.sh"
tar -C "$tmp/evil" -cf "$tmp/evil.tar" manifest.json evil.sh
expect_fail "entry evil.sh is not listed in the bundle's manifest" \
    "$BIN/tpbundle" unpack "$tmp/evil.tar" "$tmp/evil-out"
[ ! -e "$tmp/evil-out" ] || die "a refused unpack left $tmp/evil-out"
expect_fail "evil.sh" "$BIN/tpbundle" verify "$tmp/evil.tar"

echo "== a FIFO where a file should be: refused at once, never blocking"
# expect_fail_fast WANT CMD...: like expect_fail, within 10 s (a hang is a failure).
expect_fail_fast() {
    local want=$1 rc=0; shift
    timeout 10 "$@" >"$tmp/stdout" 2>"$tmp/stderr" || rc=$?
    [ $rc -ne 124 ] || die "$*: still running after 10 s (blocked on a FIFO?)"
    [ $rc -ne 0 ] || die "succeeded, expected a failure with '$want': $*"
    grep -qF -- "$want" "$tmp/stderr" || die "$*: stderr lacks '$want': $(cat "$tmp/stderr")"
}
for f in manifest.json rank-00000-of-00001.tpshard config.json; do
    cp -r "$tmp/tok-tp1" "$tmp/fifo"
    rm "$tmp/fifo/$f" && mkfifo "$tmp/fifo/$f"
    want="$f" # each tool names the file; what matters most is that none blocks
    expect_fail_fast "$want" "$BIN/tpverify" "$tmp/fifo"
    [ "$f" = config.json ] || grep -qF "$f: not a regular file (fifo)" "$tmp/stderr" \
        || die "tpverify, FIFO $f: $(cat "$tmp/stderr")"
    if [ "$f" = config.json ]; then # tpinspect does not read it; it must not block either
        timeout 10 "$BIN/tpinspect" "$tmp/fifo" >/dev/null 2>&1 || [ $? -ne 124 ] || die "tpinspect blocked on a FIFO"
    else
        expect_fail_fast "$want" "$BIN/tpinspect" "$tmp/fifo"
    fi
    expect_fail_fast "$want" "$BIN/tprun" "$tmp/fifo" --comm single --load-only
    expect_fail_fast "$want" "$BIN/tpbundle" pack "$tmp/fifo" --ranks-per-node 1 --out "$tmp/fifo-b"
    rm -rf "$tmp/fifo" "$tmp/fifo-b"
done
mkfifo "$tmp/node-00000-of-00001.tar"
want="node-00000-of-00001.tar: not a regular file (fifo)"
expect_fail_fast "$want" "$BIN/tprun" "$tmp/node-00000-of-00001.tar" --comm single --load-only
expect_fail_fast "$want" "$BIN/tpbundle" verify "$tmp/node-00000-of-00001.tar"
expect_fail_fast "$want" "$BIN/tpbundle" unpack "$tmp/node-00000-of-00001.tar" "$tmp/fifo-un"
rm "$tmp/node-00000-of-00001.tar"

echo "== usage errors name the flag"
expect_fail "--frobnicate" "$BIN/tpverify" "$tmp/q2-zstd" --frobnicate
grep -qF "usage:" "$tmp/stderr" || die "tpverify: no usage text"
expect_fail "--threads" "$BIN/tpverify" "$tmp/q2-zstd" --threads lots
expect_fail "--bogus" "$BIN/tpinspect" "$tmp/q2-zstd" --bogus
expect_fail "--tensor and --dump go together" "$BIN/tpinspect" "$tmp/q2-zstd" --tensor x
expect_fail "--ranks-per-node" "$BIN/tpbundle" pack "$tmp/q2-zstd"
expect_fail "--ranks-per-node" "$BIN/tpbundle" pack "$tmp/q2-zstd" --ranks-per-node 0
expect_fail "unknown command" "$BIN/tpbundle" explode
expect_fail "rank 7 is not in this conversion (tp=2)" "$BIN/tpinspect" "$tmp/q2-zstd" --rank 7
expect_fail "tpverify:" "$BIN/tpverify" "$tmp/does-not-exist"

echo "e2e_loader: all checks passed"
