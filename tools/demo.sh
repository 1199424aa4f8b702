#!/usr/bin/env bash
# demo.sh - the README's `make demo` (make builds first; this builds nothing).
#
# 1. bin/tpsynth makes a small Qwen3 model (hidden 128, 2 layers, the real
#    Qwen3 tokenizer of 151,669 entries, a vocabulary of 151,936 ids, RANDOM
#    weights) in a temporary directory;
# 2. bin/tpconvert cuts it for tensor parallelism 2 (zstd, checksummed);
# 3. two ranks of bin/tprun load their shard and generate, joined by an
#    all-reduce: under mpirun when it is installed, else two processes on
#    this machine over the tcp backend.
#
# Environment: BIN (default bin), PROMPT, MAX_NEW_TOKENS (default 32),
# TEMPERATURE (default 0.8; 0 is greedy), SEED (default 1),
# DEMO_LAUNCHER=tcp (two local processes even when mpirun exists), DEMO_DIR
# (keep the model and the conversion there instead of a temporary directory
# that is removed at the end).
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-bin}
PROMPT=${PROMPT:-"Tensor parallelism splits every layer across ranks, so"}
MAX_NEW_TOKENS=${MAX_NEW_TOKENS:-32}
# Sampling rather than greedy: a random model's greedy text repeats one token.
TEMPERATURE=${TEMPERATURE:-0.8}
SEED=${SEED:-1}
TOKENIZER=tests/data/qwen3-tokenizer/tokenizer.json.zst

for prog in tpsynth tpconvert tprun; do
    if [ ! -x "$BIN/$prog" ]; then
        echo "demo: $BIN/$prog not found: run 'make demo' (it builds first)" >&2
        exit 1
    fi
done
if [ ! -f "$TOKENIZER" ]; then
    echo "demo: $TOKENIZER not found (is this a complete checkout?)" >&2
    exit 1
fi

if [ -n "${DEMO_DIR:-}" ]; then
    work=$DEMO_DIR
    if [ -e "$work" ] && [ -n "$(ls -A "$work" 2>/dev/null)" ]; then
        echo "demo: DEMO_DIR=$work is not empty" >&2
        exit 1
    fi
    mkdir -p "$work"
else
    work=$(mktemp -d "${TMPDIR:-/tmp}/tpshard-demo.XXXXXX")
    trap 'rm -rf "$work"' EXIT
fi
model=$work/model
out=$work/tp2

step() { printf '\n== %s\n' "$*"; }
elapsed() { awk -v a="$1" -v b="$(date +%s.%N)" 'BEGIN {printf "%.2f s", b - a}'; }

step "1/3  a small Qwen3 model with random weights: $BIN/tpsynth --preset demo"
t0=$(date +%s.%N)
"$BIN/tpsynth" --preset demo --seed 1 --tokenizer "$TOKENIZER" "$model"
echo "     $(du -sh "$model" | cut -f1) in $model ($(elapsed "$t0"))"

step "2/3  convert for 2 ranks: $BIN/tpconvert --tp 2"
t0=$(date +%s.%N)
"$BIN/tpconvert" --tp 2 "$model" "$out"
echo "     $(du -sh "$out" | cut -f1) in $out ($(elapsed "$t0")):"
ls -l "$out" | sed 's/^/     /'

step "3/3  two ranks of tprun"
echo "     NOTE: the weights are random, so the generated text is gibberish. The demo"
echo "     shows the whole path (conversion, loading, two ranks joined by an"
echo "     all-reduce, tokenizer, generation, timings), not a trained model."
echo "     prompt: $PROMPT"
args=(--prompt "$PROMPT" --max-new-tokens "$MAX_NEW_TOKENS" --temperature "$TEMPERATURE"
      --seed "$SEED" --verbose)
t0=$(date +%s.%N)
if [ "${DEMO_LAUNCHER:-auto}" != tcp ] && command -v mpirun >/dev/null 2>&1; then
    echo "     launcher: mpirun -np 2"
    echo
    mpirun --allow-run-as-root --oversubscribe -np 2 "$BIN/tprun" "$out" "${args[@]}"
else
    # No MPI: rank 1 in the background, rank 0 in the foreground, over TCP on
    # localhost (the port is picked from the process id to avoid collisions).
    port=$(( 20000 + $$ % 20000 ))
    echo "     launcher: two local processes, tcp backend on 127.0.0.1:$port (mpirun not found)"
    echo
    export MASTER_ADDR=127.0.0.1 MASTER_PORT=$port WORLD_SIZE=2
    RANK=1 "$BIN/tprun" "$out" --rank 1 "${args[@]}" &
    rank1=$!
    rc=0
    RANK=0 "$BIN/tprun" "$out" --rank 0 "${args[@]}" || rc=$?
    wait "$rank1" || rc=$((rc ? rc : $?))
    [ $rc -eq 0 ] || { echo "demo: tprun failed (exit $rc)" >&2; exit $rc; }
fi
echo
echo "== done: generation with 2 ranks in $(elapsed "$t0") (random weights: gibberish is expected)"
[ -n "${DEMO_DIR:-}" ] && echo "   model and conversion kept in $work"
exit 0
