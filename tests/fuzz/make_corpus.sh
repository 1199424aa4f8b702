#!/usr/bin/env bash
# make_corpus.sh - (re)writes the seed corpora of fuzz_bundle, fuzz_config
# and fuzz_tokenizer under tests/fuzz/corpus/: a few valid inputs and a few
# broken ones each, all small (libFuzzer runs with -max_len=65536).  The
# committed files are its output; run it again only to change the seeds.
# Needs the built programs ($BIN, default bin/) and python3.
# Usage: tests/fuzz/make_corpus.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
BIN=${BIN:-bin}
for p in tpsynth tpconvert tpbundle; do
    [ -x "$BIN/$p" ] || { echo "make_corpus.sh: $BIN/$p is not built" >&2; exit 1; }
done
corpus=tests/fuzz/corpus
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

# --- fuzz_bundle: node bundles of a very small synthetic model.
out=$corpus/fuzz_bundle
rm -rf "$out" && mkdir -p "$out"
"$BIN/tpsynth" --hidden 16 --layers 1 --heads 2 --kv-heads 1 --head-dim 8 --intermediate 16 \
    --vocab 32 --quiet "$tmp/syn"
"$BIN/tpconvert" --tp 2 --quiet "$tmp/syn" "$tmp/zstd"
"$BIN/tpbundle" pack "$tmp/zstd" --ranks-per-node 1 --out "$tmp/zstd-b" --quiet >/dev/null
cp "$tmp/zstd-b/node-00001-of-00002.tar" "$out/tpshard_zstd_node1.tar"
"$BIN/tpconvert" --tp 1 --format safetensors --quiet "$tmp/syn" "$tmp/st"
"$BIN/tpbundle" pack "$tmp/st" --ranks-per-node 1 --out "$tmp/st-b" --quiet >/dev/null
cp "$tmp/st-b/node-00000-of-00001.tar" "$out/safetensors_tp1.tar"
python3 - "$tmp/st" "$out" <<'EOF'
import io, os, sys, tarfile
src, out = sys.argv[1], sys.argv[2]
def member(name, data, **kw):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    for k, v in kw.items():
        setattr(info, k, v)
    return info, io.BytesIO(data)
def write(name, entries):
    with tarfile.open(os.path.join(out, name), "w", format=tarfile.PAX_FORMAT) as t:
        for info, data in entries:
            t.addfile(info, data)
manifest = open(os.path.join(src, "manifest.json"), "rb").read()
config = open(os.path.join(src, "config.json"), "rb").read()
write("broken_manifest_not_first.tar", [member("config.json", config), member("manifest.json", manifest)])
write("broken_dotdot.tar", [member("manifest.json", manifest), member("../config.json", config)])
link = tarfile.TarInfo("config.json"); link.type = tarfile.SYMTYPE; link.linkname = "/etc/passwd"
write("broken_symlink.tar", [member("manifest.json", manifest), (link, None)])
write("broken_unlisted.tar", [member("manifest.json", manifest), member("extra.bin", b"x" * 100)])
whole = open(os.path.join(out, "safetensors_tp1.tar"), "rb").read()
open(os.path.join(out, "broken_truncated.tar"), "wb").write(whole[:len(whole) // 2])
EOF

# --- fuzz_config: the fixture models' config.json and a few broken ones.
out=$corpus/fuzz_config
rm -rf "$out" && mkdir -p "$out"
for m in qwen3-tiny qwen2-tiny llama-tiny mistral-tiny; do
    cp "tests/models/$m/config.json" "$out/$m.json"
done
printf '{"model_type":"qwen3","hidden_size":64,"num_attention_heads":4,"intermediate_size":128,"vocab_size":512,"num_hidden_layers":2,"rope_parameters":{"rope_type":"llama3","rope_theta":10000,"factor":8,"low_freq_factor":1,"high_freq_factor":4,"original_max_position_embeddings":64}}' \
    >"$out/rope_parameters.json"
printf '{"model_type":"qwen2","hidden_size":60,"num_attention_heads":7,"num_key_value_heads":3,"intermediate_size":1,"vocab_size":1,"num_hidden_layers":1,"head_dim":3}' \
    >"$out/broken_heads.json"
printf '{"model_type":"llama","hidden_size":1e300,"eos_token_id":[1,2,3,4,5,6,7,8,9]}' >"$out/broken_sizes.json"
printf '[1, 2, {"model_type": null}]' >"$out/broken_not_object.json"
# fuzz_config's first find: a control character quoted into the message.
printf '{"model_type":"mi\\nstral","hidden_size":64}' >"$out/broken_model_type_newline.json"
# and its second: hidden_size < heads without head_dim derived head_dim 0.
printf '{"model_type":"mistral","hidden_size":1,"num_attention_heads":4,"intermediate_size":156,"num_hidden_layers":2,"vocab_size":512}' \
    >"$out/broken_head_dim_zero.json"
# and its third: an rms_norm_eps > 0 that is 0 as a float.
printf '{"model_type":"mistral","hidden_size":64,"num_attention_heads":4,"intermediate_size":128,"num_hidden_layers":2,"vocab_size":512,"rms_norm_eps":1e-66}' \
    >"$out/broken_eps_float_zero.json"

# --- fuzz_tokenizer: small byte-level BPE tokenizers (the 256 byte tokens,
# a few merges, added tokens) and a few broken ones.
out=$corpus/fuzz_tokenizer
rm -rf "$out" && mkdir -p "$out"
python3 - "$out" <<'EOF'
import json, os, sys
out = sys.argv[1]
def bytes_to_unicode():  # GPT-2's byte map, as tokenizers' ByteLevel uses
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b); cs.append(256 + n); n += 1
    return dict(zip(bs, map(chr, cs)))
m = bytes_to_unicode()
vocab = {m[b]: b for b in range(256)}
vocab.update({"Ġt": 256, "he": 257, "Ġthe": 258, "in": 259})
merges = ["Ġ t", "h e", "Ġt he", "i n"]
qwen_split = ("(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*"
              "|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+")
added = [{"id": 260, "content": "<|endoftext|>", "special": True, "single_word": False, "lstrip": False,
          "rstrip": False, "normalized": False},
         {"id": 261, "content": "<think>", "special": False, "single_word": False, "lstrip": False,
          "rstrip": False, "normalized": False}]
def tok(pre, normalizer=None, model_extra=None, merges_=merges):
    model = {"type": "BPE", "dropout": None, "unk_token": None, "fuse_unk": False,
             "byte_fallback": False, "vocab": vocab, "merges": merges_}
    model.update(model_extra or {})
    return {"version": "1.0", "added_tokens": added, "normalizer": normalizer, "pre_tokenizer": pre,
            "post_processor": None, "decoder": {"type": "ByteLevel"}, "model": model}
qwen_pre = {"type": "Sequence", "pretokenizers": [
    {"type": "Split", "pattern": {"Regex": qwen_split}, "behavior": "Isolated", "invert": False},
    {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}]}
bytelevel_pre = {"type": "ByteLevel", "add_prefix_space": False, "use_regex": True}
seeds = {
    "qwen_style.json": tok(qwen_pre, {"type": "NFC"}),
    "bytelevel_regex.json": tok(bytelevel_pre),
    "pair_merges_ignore.json": tok(bytelevel_pre, None, {"ignore_merges": True},
                                   [["Ġ", "t"], ["h", "e"], ["Ġt", "he"], ["i", "n"]]),
    "broken_merge_unknown.json": tok(bytelevel_pre, None, None, ["q z"]),
    "broken_model_type.json": tok(bytelevel_pre, None, {"type": "WordPiece"}),
    "broken_regex.json": tok({"type": "Split", "pattern": {"Regex": "(["}, "behavior": "Isolated",
                              "invert": False}),
}
for name, t in seeds.items():
    with open(os.path.join(out, name), "w") as f:
        json.dump(t, f, ensure_ascii=False, separators=(",", ":"))
EOF
ls -l "$corpus"/fuzz_bundle "$corpus"/fuzz_config "$corpus"/fuzz_tokenizer | awk 'NF > 5 {s += $5} END {print "corpus bytes:", s}'
