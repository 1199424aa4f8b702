#!/usr/bin/env bash
# bench_comm.sh - our tcp all-reduce against Gloo's (make bench-comm).
#
# Why: the non-MPI CPU path (--rank, torchrun, srun) uses our own tcp
# backend, a star through rank 0.  Gloo (Debian's libgloo-dev) is the
# collective library PyTorch uses on CPUs; this measures whether it would
# serve better.  Both run WORLD forked ranks on 127.0.0.1 and all-reduce N
# floats ITERS times; the runs alternate (ours, gloo, ours, gloo, ...) for
# ROUNDS rounds, and the table gives, per size, the min and median over the
# rounds of each round's median latency, and gloo / ours.
# Sizes: 1024 and 4096 floats are one decode step's all-reduce of
# Qwen3-0.6B and Qwen3-8B (hidden size), 128 x 1024 a 128-token prefill's,
# 1 Mi floats a large message.
#
# Environment: WORLDS (default "2 4"), SIZES, ITERS (default 300), ROUNDS
# (default 5), BUILD (default build).  Installs libgloo-dev with apt-get when
# missing (and says so); without it, prints our figures alone.
set -euo pipefail
cd "$(dirname "$0")/.."
BUILD=${BUILD:-build}
WORLDS=${WORLDS:-"2 4"}
SIZES=${SIZES:-"1024 4096 131072 1048576"}
ITERS=${ITERS:-300}
ROUNDS=${ROUNDS:-5}
[ -f "$BUILD/libruntime.a" ] || { echo "bench_comm: $BUILD/libruntime.a not found (run make first)" >&2; exit 1; }
mkdir -p "$BUILD/bench"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# Link flags exactly as the Makefile links the programs.
libs=$(make -s --no-print-directory print-ldlibs 2>/dev/null) || libs=""
[ -n "$libs" ] || { echo "bench_comm: make print-ldlibs failed" >&2; exit 1; }
cflags=$(make -s --no-print-directory print-cflags)
# shellcheck disable=SC2086
cc $cflags bench/comm_bench.c -o "$BUILD/bench/comm_bench" \
    "$BUILD/libruntime.a" "$BUILD/libloader.a" "$BUILD/libconvert.a" "$BUILD/libshardfmt.a" $libs

have_gloo=0
if [ ! -f /usr/include/gloo/allreduce.h ]; then
    echo "bench_comm: installing libgloo-dev" >&2
    if [ "$(id -u)" = 0 ]; then apt-get install -y -q libgloo-dev >/dev/null 2>&1 || true
    else sudo -n apt-get install -y -q libgloo-dev >/dev/null 2>&1 || true; fi
fi
if [ -f /usr/include/gloo/allreduce.h ] &&
   g++ -O2 -std=c++17 bench/comm_bench_gloo.cc -o "$BUILD/bench/comm_bench_gloo" -lgloo -pthread; then
    have_gloo=1
else
    echo "bench_comm: Gloo not available: our figures alone" >&2
fi

port=29650
field() { sed -n "s/.*$1=\([0-9.]*\).*/\1/p"; }
for w in $WORLDS; do
    for n in $SIZES; do
        for r in $(seq "$ROUNDS"); do
            port=$((port + 1))
            "$BUILD/bench/comm_bench" tcp "$w" "$n" "$ITERS" "$port" | field median_us >>"$work/ours.$w.$n"
            if [ $have_gloo = 1 ]; then
                mkdir "$work/store.$w.$n.$r"
                "$BUILD/bench/comm_bench_gloo" "$w" "$n" "$ITERS" "$work/store.$w.$n.$r" \
                    | field median_us >>"$work/gloo.$w.$n"
            fi
        done
    done
done

stats() { sort -g "$1" | awk '{v[NR]=$1} END {printf "%.1f %.1f", v[1], v[int((NR+1)/2)]}'; }
echo
echo "all-reduce latency, microseconds (min / median of $ROUNDS rounds, each the median of $ITERS calls)"
printf '%-6s %-9s %-20s %-20s %s\n' world floats "ours (tcp star)" "gloo (ring)" "gloo/ours (median)"
for w in $WORLDS; do
    for n in $SIZES; do
        read -r omin omed <<<"$(stats "$work/ours.$w.$n")"
        if [ $have_gloo = 1 ]; then
            read -r gmin gmed <<<"$(stats "$work/gloo.$w.$n")"
            ratio=$(awk -v g="$gmed" -v o="$omed" 'BEGIN {printf "%.2f", g / o}')
            printf '%-6s %-9s %-20s %-20s %s\n' "$w" "$n" "$omin / $omed" "$gmin / $gmed" "$ratio"
        else
            printf '%-6s %-9s %-20s %-20s %s\n' "$w" "$n" "$omin / $omed" "-" "-"
        fi
    done
done
echo "machine: $(nproc) cores, $(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -n 1)"
