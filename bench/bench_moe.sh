#!/usr/bin/env bash
# bench_moe.sh - the CPU runtime on a mixture-of-experts checkpoint with
# Qwen3-30B-A3B's layer shape (make bench-moe).
#
# bin/tpsynth --preset qwen3-30b-a3b-layer: hidden 2048, 32 heads, 4 KV heads,
# head_dim 128, 128 experts of 768, top 8, vocab 151936, untied, and 2 of
# the real model's 48 layers (3.74 GB; tprun reads the weights in place, so a
# rank holds about its rank file).  Converted with --compress none
# at tp 1, and at tp 2 in both split modes (tensor-parallel experts, the
# default, and --expert-parallel); for each: the largest rank file against
# total / tp (the embedding is vocabulary-parallel, tpconvert's default;
# EXTRA="--replicate-embedding" keeps it whole), load time of rank 0 (tprun
# --load-only --verbose), and prefill
# and decode tokens/s (greedy, --ignore-eos; tp 2: two processes on
# 127.0.0.1, tcp).  Threads: nproc / tp per rank.
#
# Environment: BIN (default bin), PRESET (default qwen3-30b-a3b-layer),
# PROMPT_LEN (default 128), NEW_TOKENS (default 32), EXTRA (more tpconvert
# flags), BENCH_TMP.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-bin}
PRESET=${PRESET:-qwen3-30b-a3b-layer}
PROMPT_LEN=${PROMPT_LEN:-128}
NEW_TOKENS=${NEW_TOKENS:-32}
read -r -a extra <<<"${EXTRA:-}"
parent=${BENCH_TMP:-${TMPDIR:-/tmp}}
for prog in tpsynth tpconvert tprun; do
    [ -x "$BIN/$prog" ] || { echo "bench_moe: $BIN/$prog not found (run make first)" >&2; exit 1; }
done
work=$(mktemp -d "$parent/bench-moe.XXXXXX")
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$work"; }
trap cleanup EXIT
cores=$(nproc)

echo "== model: $BIN/tpsynth --preset $PRESET"
"$BIN/tpsynth" --preset "$PRESET" --quiet "$work/model" >/dev/null
vocab=$(sed -n 's/.*"vocab_size":[[:space:]]*\([0-9]*\).*/\1/p' "$work/model/config.json")
ids=$(awk -v n="$PROMPT_LEN" -v vocab="$vocab" 'BEGIN { s = 12345; for (i = 0; i < n; i++) { s = (s * 75 + 74) % 65537; printf "%s%d", (i ? "," : ""), s % vocab } }')
src_bytes=$(du -sb "$work/model" | cut -f1)

json_field() { # file key -> number
    sed -n "s/.*\"$2\":\([0-9.eE+-]*\).*/\1/p" "$1" | head -n 1
}

run_ranks() { # tp out args...
    local tp=$1 out=$2; shift 2
    local threads=$(( cores / tp )); [ "$threads" -ge 1 ] || threads=1
    if [ "$tp" -eq 1 ]; then
        "$BIN/tprun" "$@" --threads "$threads" --json > "$out" 2> "$out.err"
        return
    fi
    local port=$(( 20000 + RANDOM % 12000 )) r   # below the ephemeral ports (32768+)
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
for run in "1 tensor" "2 tensor" "2 expert"; do
    read -r tp mode <<<"$run"
    flag=(); [ "$mode" = expert ] && flag=(--expert-parallel)
    out=$work/tp$tp-$mode
    "$BIN/tpconvert" --tp "$tp" "${flag[@]}" "${extra[@]}" --compress none --quiet "$work/model" "$out"
    max_rank=$(du -b "$out"/rank-*.tpshard | sort -n | tail -n 1 | cut -f1)
    share=$(awk -v m="$max_rank" -v s="$src_bytes" -v t="$tp" 'BEGIN { printf "%.3f", m / (s / t) }')
    run_ranks "$tp" "$work/load.json" "$out" --load-only --verbose
    load_s=$(sed -n 's/^tprun: loaded rank 0 .* in \([0-9.]*\) s.*/\1/p' "$work/load.json.err")
    run_ranks "$tp" "$work/gen.json" "$out" --prompt-ids "$ids" \
        --max-new-tokens "$NEW_TOKENS" --temperature 0 --ignore-eos
    rows+=("$(awk -v tp="$tp" -v mode="$mode" -v b="$max_rank" -v share="$share" -v load="$load_s" \
        -v pf="$(json_field "$work/gen.json" prefill_tokens_per_s)" \
        -v dc="$(json_field "$work/gen.json" decode_tokens_per_s)" \
        'BEGIN { printf "%-3s %-8s %10.1f %8s %8.2f %12.1f %12.2f", tp, mode, b / 1e6, share, load, pf, dc }')")
    rm -rf "$out"
done

echo
echo "$PRESET: $(awk -v b="$src_bytes" 'BEGIN{printf "%.2f", b/1e9}') GB bf16, prompt $PROMPT_LEN tokens, $NEW_TOKENS new, $cores cores"
printf "%-3s %-8s %10s %8s %8s %12s %12s\n" tp experts "rank MB" "x tot/tp" "load s" "prefill t/s" "decode t/s"
printf "%s\n" "${rows[@]}"
