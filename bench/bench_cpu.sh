#!/usr/bin/env bash
# bench_cpu.sh - the CPU runtime on a Qwen3-0.6B-shaped checkpoint (make bench-cpu).
#
# Generates the synthetic checkpoint (bin/tpsynth --preset qwen3-0.6b: hidden
# 1024, 28 layers, 16 heads, 8 KV heads, head_dim 128, intermediate 3072,
# vocab 151936, tied, bf16 N(0, 0.02^2)), converts it at tp 1 and 2 with
# --compress none and zstd, then measures with tprun:
#   - load time per rank (tprun --load-only --verbose: "loaded ... in X s",
#     the mmap, checksum verification and decompression), uncompressed vs zstd;
#   - prefill tokens/s for a PROMPT_LEN-token prompt and decode tokens/s for
#     NEW_TOKENS tokens (greedy, --ignore-eos), at tp 1 (one process) and
#     tp 2 (two processes joined by the tcp backend on 127.0.0.1).
# Threads: each rank gets nproc / tp threads, so tp 2 on a 2-core machine
# runs one thread per rank.
#
# Environment: BIN (default bin), PRESET (default qwen3-0.6b), TPS (default
# "1 2"), PROMPT_LEN (default 128), NEW_TOKENS (default 32), BENCH_TMP.
# The page cache is not dropped: load times are warm-cache times.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-bin}
PRESET=${PRESET:-qwen3-0.6b}
TPS=${TPS:-"1 2"}
PROMPT_LEN=${PROMPT_LEN:-128}
NEW_TOKENS=${NEW_TOKENS:-32}
parent=${BENCH_TMP:-${TMPDIR:-/tmp}}
for prog in tpsynth tpconvert tprun; do
    [ -x "$BIN/$prog" ] || { echo "bench_cpu: $BIN/$prog not found (run make first)" >&2; exit 1; }
done
work=$(mktemp -d "$parent/bench-cpu.XXXXXX")
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$work"; }
trap cleanup EXIT
cores=$(nproc)

echo "== model: $BIN/tpsynth --preset $PRESET"
"$BIN/tpsynth" --preset "$PRESET" "$work/model" >/dev/null

# Prompt ids: a fixed pseudo-random sequence inside the vocabulary.
vocab=$(sed -n 's/.*"vocab_size":[[:space:]]*\([0-9]*\).*/\1/p' "$work/model/config.json")
ids=$(awk -v n="$PROMPT_LEN" -v vocab="$vocab" 'BEGIN { s = 12345; for (i = 0; i < n; i++) { s = (s * 75 + 74) % 65537; printf "%s%d", (i ? "," : ""), s % vocab } }')

json_field() { # file key -> number
    sed -n "s/.*\"$2\":\([0-9.eE+-]*\).*/\1/p" "$1" | head -n 1
}

# Runs tp ranks of tprun with the given arguments; rank 0's JSON to $out.
run_ranks() { # tp out args...
    local tp=$1 out=$2; shift 2
    local threads=$(( cores / tp )); [ "$threads" -ge 1 ] || threads=1
    if [ "$tp" -eq 1 ]; then
        "$BIN/tprun" "$@" --threads "$threads" --json > "$out" 2> "$out.err"
        return
    fi
    local port=$(( 20000 + RANDOM % 20000 )) r
    pids=()
    for (( r = 1; r < tp; r++ )); do
        RANK=$r WORLD_SIZE=$tp LOCAL_RANK=$r MASTER_ADDR=127.0.0.1 MASTER_PORT=$port \
            "$BIN/tprun" "$@" --threads "$threads" --json > /dev/null &
        pids+=($!)
    done
    RANK=0 WORLD_SIZE=$tp LOCAL_RANK=0 MASTER_ADDR=127.0.0.1 MASTER_PORT=$port \
        "$BIN/tprun" "$@" --threads "$threads" --json > "$out" 2> "$out.err"
    for p in "${pids[@]}"; do wait "$p"; done
    pids=()
}

rows=()
for tp in $TPS; do
    for codec in none zstd; do
        out=$work/tp$tp-$codec
        "$BIN/tpconvert" --tp "$tp" --compress "$codec" --quiet "$work/model" "$out"
        bytes=$(du -sb "$out" | cut -f1)
        run_ranks "$tp" "$work/load.json" "$out" --load-only --verbose
        load_s=$(sed -n 's/^tprun: loaded rank 0 .* in \([0-9.]*\) s.*/\1/p' "$work/load.json.err")
        if [ "$codec" = none ]; then
            run_ranks "$tp" "$work/gen.json" "$out" --prompt-ids "$ids" \
                --max-new-tokens "$NEW_TOKENS" --temperature 0 --ignore-eos
            prefill=$(json_field "$work/gen.json" prefill_tokens_per_s)
            decode=$(json_field "$work/gen.json" decode_tokens_per_s)
        else
            prefill="-"; decode="-"
        fi
        [ "$prefill" = - ] || prefill=$(printf '%.1f' "$prefill")
        [ "$decode" = - ] || decode=$(printf '%.2f' "$decode")
        rows+=("$(printf '%-4s %-6s %10.3f %12.3f %14s %14s' "$tp" "$codec" \
            "$(awk -v b="$bytes" 'BEGIN { print b / 1e9 }')" "$load_s" "$prefill" "$decode")")
    done
done

echo
echo "bench-cpu: $PRESET, $cores cores ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ *//'))"
echo "prompt $PROMPT_LEN tokens, $NEW_TOKENS new tokens, greedy; warm page cache; rank 0's figures"
printf '%-4s %-6s %10s %12s %14s %14s\n' tp codec "out GB" "load s/rank" "prefill tok/s" "decode tok/s"
for r in "${rows[@]}"; do echo "$r"; done
