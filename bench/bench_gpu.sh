#!/usr/bin/env bash
# bench_gpu.sh - GPU benchmark (make bench-gpu): the reference half only.
#
# tprun --device cuda exists but has never run on a GPU (none was lent to the
# session that wrote it): the tprun half below is measured as written, and
# its first real run is also its first test.  The reference half:
#   1. bin/tpsynth --preset $PRESET (Qwen3-0.6B shape, random bf16 weights),
#      then bin/tpconvert --tp 1 (timed: the input tprun will load);
#   2. transformers from_pretrained(tp_plan="auto") under
#      torchrun --nproc-per-node $NPROC: load seconds;
#   3. safetensors load_file(device="cuda"): load seconds and GB/s;
#   4. transformers generate, greedy, batch 1: decode tokens/s ($NEW new
#      tokens after a $PROMPT-token prompt) and prefill tokens/s ($PREFILL
#      tokens in one forward);
#   5. device copy bandwidth (torch), and decode's fraction of the memory
#      bound: tokens/s * weight bytes / copy bandwidth.
# And tprun's loader on the GPU: tprun --device cuda --load-only on the tp 1
# conversion with codec zstd and with codec none (process start to weights
# on the GPU, wall clock, plus tprun's own bytes / seconds / GB/s of the
# streaming upload), as JSON lines "tprun-load-zstd" / "tprun-load-none" in
# the same results.
# Then the mixture-of-experts preset $MOE_PRESET (qwen3-30b-a3b-layer) on
# tprun --device cuda: decode and prefill JSON lines "tprun-moe-*", and its
# greedy tokens against the cpu's.
# Needs a CUDA GPU visible to torch; without one it says so and exits 2
# without measuring anything.
#
# Environment: BIN (default bin), PRESET (qwen3-0.6b), MOE_PRESET
# (qwen3-30b-a3b-layer), NPROC (1), PROMPT
# (128), NEW (128), PREFILL (2048), REPEAT (3), BENCH_TMP (parent of the work
# directory, default $TMPDIR or /tmp), PYTHON (python3).
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-bin}
PRESET=${PRESET:-qwen3-0.6b}
MOE_PRESET=${MOE_PRESET:-qwen3-30b-a3b-layer}
NPROC=${NPROC:-1}
PROMPT=${PROMPT:-128}
NEW=${NEW:-128}
PREFILL=${PREFILL:-2048}
REPEAT=${REPEAT:-3}
PYTHON=${PYTHON:-python3}
parent=${BENCH_TMP:-${TMPDIR:-/tmp}}
ref=bench/bench_gpu_reference.py


for prog in tpsynth tpconvert; do
    if [ ! -x "$BIN/$prog" ]; then
        echo "bench_gpu: $BIN/$prog not found (run make first)" >&2
        exit 1
    fi
done
if ! "$PYTHON" -c 'import torch, transformers, safetensors' 2>/dev/null; then
    echo "bench_gpu: $PYTHON cannot import torch, transformers and safetensors (the reference needs them)" >&2
    exit 1
fi
if ! gpu=$("$PYTHON" -c 'import torch, sys
if not torch.cuda.is_available(): sys.exit(1)
print(torch.cuda.get_device_name(), "x", torch.cuda.device_count())' 2>/dev/null); then
    echo "bench_gpu: no CUDA GPU visible to torch (torch.cuda.is_available() is False): nothing measured" >&2
    exit 2
fi
echo "== GPU: $gpu"
if command -v torchrun >/dev/null 2>&1; then
    torchrun=(torchrun)
else
    torchrun=("$PYTHON" -m torch.distributed.run)
fi

work=$(mktemp -d "$parent/bench-gpu.XXXXXX")
trap 'rm -rf "$work"' EXIT
model=$work/model
results=$work/results.jsonl

echo "== generating the $PRESET model into $work"
"$BIN/tpsynth" --preset "$PRESET" --seed 1 --quiet "$model"

echo "== tpconvert --tp 1 (the input of the tprun GPU run)"
t0=$(date +%s.%N)
"$BIN/tpconvert" --tp 1 --quiet "$model" "$work/tp1" >"$work/convert.log" 2>&1 || {
    echo "bench_gpu: tpconvert failed:" >&2; tail -n 20 "$work/convert.log" >&2; exit 1; }
t1=$(date +%s.%N)
awk -v a="$t0" -v b="$t1" 'BEGIN {printf "{\"bench\": \"tpconvert\", \"seconds\": %.3f}\n", b - a}' | tee -a "$results"

# run_ref NAME CMD...: one reference measurement; its JSON line goes to the
# results, its chatter to a log shown only when it fails.
run_ref() {
    local name=$1; shift
    echo "== $name"
    if ! "$@" >"$work/$name.out" 2>"$work/$name.log"; then
        echo "bench_gpu: $name failed:" >&2
        tail -n 30 "$work/$name.log" >&2
        exit 1
    fi
    grep '^{' "$work/$name.out" | tee -a "$results"
}

port=$(( 29500 + RANDOM % 2000 ))
run_ref load-tp "${torchrun[@]}" --nproc-per-node "$NPROC" --master-port "$port" "$ref" load-tp --model "$model"
run_ref load-st "$PYTHON" "$ref" load-st --model "$model" --repeat "$REPEAT"
run_ref generate "$PYTHON" "$ref" generate --model "$model" --repeat "$REPEAT" \
    --prompt "$PROMPT" --new "$NEW" --prefill "$PREFILL"
run_ref bandwidth "$PYTHON" "$ref" bandwidth --repeat "$REPEAT"

# tprun --load-only --device cuda: the mmap'd rank streamed to the GPU
# (pinned, double-buffered copies; zstd chunks decoded by a thread pool on
# the way).  One JSON line per codec; a failure is recorded, not hidden.
echo "== tpconvert --tp 1 --compress none"
"$BIN/tpconvert" --tp 1 --compress none --quiet "$model" "$work/tp1-none"
for codec in zstd none; do
    conv=tp1; [ "$codec" = none ] && conv=tp1-none
    echo "== tprun --load-only --device cuda ($codec)"
    t0=$(date +%s.%N)
    if "$BIN/tprun" "$work/$conv" --device cuda --load-only --quiet 2>"$work/load-$codec.log"; then
        t1=$(date +%s.%N)
        # "tprun: load-only: rank 0 of 1: B MB of weights on the device in S s, G GB/s, T s after process start; ..."
        line=$(grep -m1 'load-only:' "$work/load-$codec.log" || true)
        mb=$(sed -n 's/.*: \([0-9.]*\) MB of weights.*/\1/p' <<<"$line")
        up=$(sed -n 's/.* on the device in \([0-9.]*\) s,.*/\1/p' <<<"$line")
        gbs=$(sed -n 's/.* s, \([0-9.]*\) GB\/s,.*/\1/p' <<<"$line")
        awk -v a="$t0" -v b="$t1" -v c="$codec" -v mb="${mb:-0}" -v up="${up:-0}" -v g="${gbs:-0}" \
            'BEGIN {printf "{\"bench\": \"tprun-load-%s\", \"codec\": \"%s\", \"seconds\": %.3f, \"weight_bytes\": %.0f, \"upload_seconds\": %s, \"upload_gb_per_s\": %s}\n", c, c, b - a, mb * 1e6, up, g}' |
            tee -a "$results"
    else
        echo "{\"bench\": \"tprun-load-$codec\", \"codec\": \"$codec\", \"failed\": true}" | tee -a "$results"
        tail -n 5 "$work/load-$codec.log" | sed 's/^/    /' >&2
    fi
done

# tprun --device cuda decode (greedy, CUDA graph and --no-graph) and prefill,
# one JSON line each from tprun --json's timings; a failure is recorded.
ids() { awk -v n="$1" 'BEGIN { s = 7; for (i = 0; i < n; i++) { s = (s * 75 + 74) % 65537; printf "%s%d", (i ? "," : ""), 100 + s % 30000 } }'; }
run_tprun() { # NAME NEW PROMPT_LEN [tprun flags...]
    local name=$1 new=$2 plen=$3; shift 3
    echo "== $name"
    if "$BIN/tprun" "$work/tp1" --device cuda --prompt-ids "$(ids "$plen")" --max-new-tokens "$new" \
            --temperature 0 --ignore-eos --json "$@" >"$work/$name.json" 2>"$work/$name.log"; then
        "$PYTHON" -c 'import json, sys
t = json.load(open(sys.argv[1]))["timings"]
print(json.dumps({"bench": sys.argv[2], "prompt": int(sys.argv[3]), "new": int(sys.argv[4]),
                  "prefill_tokens_per_s": t["prefill_tokens_per_s"], "decode_tokens_per_s": t["decode_tokens_per_s"]}))' \
            "$work/$name.json" "$name" "$plen" "$new" | tee -a "$results"
    else
        echo "{\"bench\": \"$name\", \"failed\": true}" | tee -a "$results"
        tail -n 5 "$work/$name.log" | sed 's/^/    /' >&2
    fi
}
run_tprun tprun-decode "$NEW" "$PROMPT"
run_tprun tprun-decode-nograph "$NEW" "$PROMPT" --no-graph
run_tprun tprun-prefill 1 "$PREFILL"

echo
"$PYTHON" - "$results" "$PRESET" <<'EOF'
import json, sys
r = {}
for line in open(sys.argv[1]):
    d = json.loads(line)
    r[d["bench"]] = d
g, bw = r["generate"], r["bandwidth"]
frac = g["decode_tokens_per_s"] * g["weight_bytes"] / (bw["gb_per_s"] * 1e9)
print(f"Reference on {g['device']} ({sys.argv[2]}, bf16, batch 1):")
print(f"  tpconvert --tp 1                         {r['tpconvert']['seconds']:8.2f} s")
print(f"  transformers load, tp_plan=auto (world {r['load-tp']['world']}) {r['load-tp']['seconds']:8.2f} s")
print(f"  safetensors load_file(device=cuda)       {r['load-st']['seconds']:8.2f} s  "
      f"({r['load-st']['gb_per_s']} GB/s, page cache not dropped)")
print(f"  transformers decode                      {g['decode_tokens_per_s']:8.1f} tokens/s "
      f"({g['new']} new after {g['prompt']})")
print(f"  transformers prefill                     {g['prefill_tokens_per_s']:8.1f} tokens/s "
      f"({g['prefill_tokens']} tokens)")
print(f"  device copy bandwidth                    {bw['gb_per_s']:8.1f} GB/s")
print(f"  decode at the memory bound               {100 * frac:8.1f} %  "
      f"({g['weight_bytes'] / 1e9:.2f} GB of weights read per token)")
for codec in ("zstd", "none"):
    t = r.get(f"tprun-load-{codec}")
    if t is None:
        continue
    if t.get("failed"):
        print(f"  tprun --load-only --device cuda ({codec:4})  FAILED")
    else:
        print(f"  tprun --load-only --device cuda ({codec:4}) {t['seconds']:8.2f} s  process start to exit "
              f"(upload {t['upload_seconds']:.2f} s, {t['upload_gb_per_s']} GB/s)")
def ours(name, key):
    t = r.get(name)
    return None if t is None or t.get("failed") else t.get(key)
print()
print(f"tprun --device cuda, tp 1, same GPU:")
dec, dec_ng = ours("tprun-decode", "decode_tokens_per_s"), ours("tprun-decode-nograph", "decode_tokens_per_s")
pre = ours("tprun-prefill", "prefill_tokens_per_s")
bound = bw["gb_per_s"] * 1e9 / g["weight_bytes"]   # tokens/s if every token reads the weights once at copy speed
for label, v in (("decode, CUDA graph", dec), ("decode, --no-graph", dec_ng)):
    print(f"  {label:38} " + (f"{v:8.1f} tokens/s  ({v / g['decode_tokens_per_s']:.1f}x transformers, "
                               f"{100 * v / bound:.1f} % of the bound)" if v else "  FAILED"))
print(f"  {'prefill':38} " + (f"{pre:8.1f} tokens/s  ({pre / g['prefill_tokens_per_s']:.1f}x transformers)"
                              if pre else "  FAILED"))
print("Targets (issue 4):")
def verdict(ok):
    return "n/a (failed)" if ok is None else ("met" if ok else "NOT met")
print(f"  decode >= 50 % of the bandwidth bound    {verdict(None if not dec else dec >= 0.5 * bound)}")
print(f"  decode >= 10x transformers               {verdict(None if not dec else dec >= 10 * g['decode_tokens_per_s'])}")
for codec in ("none", "zstd"):
    t = r.get(f"tprun-load-{codec}")
    ok = None if not t or t.get("failed") else r["load-tp"]["seconds"] >= 3 * t["seconds"]
    print(f"  load ({codec}) >= 3x faster than transformers TP load  {verdict(ok)}")
EOF

# tp 2 and 4 on this one GPU through MPI (staged all-reduce) against tp 1's
# greedy tokens.
echo
if command -v mpirun >/dev/null 2>&1; then
    p=$(ids 32)
    "$BIN/tprun" "$work/tp1" --device cuda --prompt-ids "$p" --max-new-tokens 32 --temperature 0 \
        --ignore-eos --json 2>/dev/null | grep -o '"generated_ids":\[[^]]*\]' >"$work/tok1" || true
    for tp in 2 4; do
        "$BIN/tpconvert" --tp $tp --quiet "$model" "$work/tp$tp"
        mpirun --allow-run-as-root --oversubscribe -np $tp "$BIN/tprun" "$work/tp$tp" --comm mpi --device cuda \
            --prompt-ids "$p" --max-new-tokens 32 --temperature 0 --ignore-eos --json 2>"$work/mpi$tp.log" |
            grep -o '"generated_ids":\[[^]]*\]' >"$work/tok$tp" || true
        if [ -s "$work/tok1" ] && cmp -s "$work/tok1" "$work/tok$tp"; then
            echo "  mpirun -np $tp --comm mpi --device cuda: same 32 greedy tokens as tp 1"
        else
            echo "  mpirun -np $tp --comm mpi --device cuda: DIFFERENT tokens from tp 1, or failed:"
            tail -n 5 "$work/mpi$tp.log" | sed 's/^/    /'
        fi
    done
fi

# Mixture of experts: tpsynth --preset qwen3-30b-a3b-layer (Qwen3-30B-A3B's
# layer shape: 128 experts of 768, top 8), tp 1, on the GPU: load, decode
# (sparse layers route on the host, so no CUDA graph) and prefill, one JSON
# line each, and the greedy tokens against the cpu's (a failure is recorded).
echo
echo "== MoE: $MOE_PRESET"
moe=$work/moe
"$BIN/tpsynth" --preset "$MOE_PRESET" --seed 1 --quiet "$moe"
"$BIN/tpconvert" --tp 1 --quiet "$moe" "$work/moe-tp1"
run_moe() { # NAME NEW PROMPT_LEN [tprun flags...]
    local name=$1 new=$2 plen=$3; shift 3
    echo "== $name"
    if "$BIN/tprun" "$work/moe-tp1" --device cuda --prompt-ids "$(ids "$plen")" --max-new-tokens "$new" \
            --temperature 0 --ignore-eos --json "$@" >"$work/$name.json" 2>"$work/$name.log"; then
        "$PYTHON" -c 'import json, sys
d = json.load(open(sys.argv[1])); t = d["timings"]
print(json.dumps({"bench": sys.argv[2], "preset": sys.argv[5], "prompt": int(sys.argv[3]), "new": int(sys.argv[4]),
                  "prefill_tokens_per_s": t["prefill_tokens_per_s"], "decode_tokens_per_s": t["decode_tokens_per_s"]}))' \
            "$work/$name.json" "$name" "$plen" "$new" "$MOE_PRESET" | tee -a "$results"
    else
        echo "{\"bench\": \"$name\", \"preset\": \"$MOE_PRESET\", \"failed\": true}" | tee -a "$results"
        tail -n 5 "$work/$name.log" | sed 's/^/    /' >&2
    fi
}
run_moe tprun-moe-decode "$NEW" "$PROMPT"
run_moe tprun-moe-prefill 1 "$PREFILL"
p=$(ids 16)
cpu_tok=$("$BIN/tprun" "$work/moe-tp1" --prompt-ids "$p" --max-new-tokens 8 --temperature 0 --ignore-eos --json \
          2>/dev/null | grep -o '"generated_ids":\[[^]]*\]' || true)
gpu_tok=$("$BIN/tprun" "$work/moe-tp1" --device cuda --prompt-ids "$p" --max-new-tokens 8 --temperature 0 \
          --ignore-eos --json 2>/dev/null | grep -o '"generated_ids":\[[^]]*\]' || true)
if [ -n "$cpu_tok" ] && [ "$cpu_tok" = "$gpu_tok" ]; then
    echo "  $MOE_PRESET --device cuda: same 8 greedy tokens as the cpu"
else
    echo "  $MOE_PRESET --device cuda: DIFFERENT tokens from the cpu, or failed (cpu ${cpu_tok:-none}, cuda ${gpu_tok:-none})"
fi
