#!/usr/bin/env bash
# bench_serve.sh - tprun --serve under concurrent load, beside llama.cpp's
# llama-server on the same weights (make bench-serve).
#
# 1. The model: bin/tpsynth --preset qwen3-0.6b with the Qwen3 tokenizer,
#    converted (uncompressed) at tp 1 and 2.
# 2. llama-server, built like bench_cpu.sh's llama-bench (the llama.cpp that
#    the llama-cpp-python source distribution on PyPI vendors, cmake Release,
#    GGML_NATIVE=ON, cached in $LLAMA_DIR), on the bf16 GGUF of the same
#    safetensors (its convert_hf_to_gguf.py), with --parallel as many slots
#    as the concurrency.  If any of this fails the script says so and prints
#    our figures alone.
# 3. For each concurrency C in $CONCURRENCY (1 4 16), the servers in turn
#    (tprun tp=1, tprun tp=2 over tcp, llama-server; interleaved, each a
#    fresh process with --max-batch / --parallel C): $REQ_PER_SLOT x C
#    streamed /v1/completions requests, C at a time, each a different
#    $PROMPT_LEN-token prompt (token ids) and $NEW_TOKENS tokens without
#    stopping at end of sequence (tprun --ignore-eos; llama-server
#    "ignore_eos").  Measured by the client: output tokens/s (all completion
#    tokens / wall time), p50 / p99 time to first token and inter-token
#    latency (the gaps between streamed chunks, one token each).
#
# Environment: BIN (bin), PRESET (qwen3-0.6b), CONCURRENCY ("1 4 16"),
# STEP_TOKENS (tprun --max-step-tokens; empty: its default),
# REQ_PER_SLOT (2), PROMPT_LEN (64), NEW_TOKENS (32), THREADS (nproc), LLAMA
# (1; 0 skips llama-server), LLAMA_DIR (build/llama.cpp), BENCH_TMP.
# Figures on a shared 2-core machine are noisy.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-bin}
PRESET=${PRESET:-qwen3-0.6b}
CONCURRENCY=${CONCURRENCY:-"1 4 16"}
REQ_PER_SLOT=${REQ_PER_SLOT:-2}
PROMPT_LEN=${PROMPT_LEN:-64}
NEW_TOKENS=${NEW_TOKENS:-32}
THREADS=${THREADS:-$(nproc)}
LLAMA=${LLAMA:-1}
STEP_TOKENS=${STEP_TOKENS:-}
step_flag=()
[ -n "$STEP_TOKENS" ] && step_flag=(--max-step-tokens "$STEP_TOKENS")
LLAMA_DIR=${LLAMA_DIR:-build/llama.cpp}
parent=${BENCH_TMP:-${TMPDIR:-/tmp}}
for prog in tpsynth tpconvert tprun; do
    [ -x "$BIN/$prog" ] || { echo "bench_serve: $BIN/$prog not found (run make first)" >&2; exit 1; }
done
work=$(mktemp -d "$parent/bench-serve.XXXXXX")
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$work"; }
trap cleanup EXIT

echo "== model: tpsynth --preset $PRESET, converted at tp 1 and 2"
"$BIN/tpsynth" --preset "$PRESET" --tokenizer tests/data/qwen3-tokenizer/tokenizer.json.zst --quiet "$work/model"
"$BIN/tpconvert" --tp 1 --compress none --quiet "$work/model" "$work/tp1"
"$BIN/tpconvert" --tp 2 --compress none --quiet "$work/model" "$work/tp2"

# ------------------------------------------------------------- llama-server
llama_src() { ls -d "$LLAMA_DIR"/src/llama_cpp_python-*/vendor/llama.cpp 2>/dev/null | head -n 1; }
llama_server=$LLAMA_DIR/cmake-build/bin/llama-server
build_llama_server() {
    [ -x "$llama_server" ] && return 0
    mkdir -p "$LLAMA_DIR/src"
    if ! ls "$LLAMA_DIR"/src/llama_cpp_python-*.tar.gz >/dev/null 2>&1; then
        python3 -m pip download --no-deps --no-binary :all: llama-cpp-python -d "$LLAMA_DIR/src" \
            >>"$LLAMA_DIR/build.log" 2>&1 || return 1
    fi
    [ -n "$(llama_src)" ] || tar xzf "$(ls "$LLAMA_DIR"/src/llama_cpp_python-*.tar.gz | head -n 1)" -C "$LLAMA_DIR/src" || return 1
    cmake -S "$(llama_src)" -B "$LLAMA_DIR/cmake-build" -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON \
        -DLLAMA_BUILD_SERVER=ON -DLLAMA_CURL=OFF >>"$LLAMA_DIR/build.log" 2>&1 || return 1
    cmake --build "$LLAMA_DIR/cmake-build" -j"$(nproc)" --target llama-server >>"$LLAMA_DIR/build.log" 2>&1 || return 1
    [ -x "$llama_server" ]
}
have_llama=0
if [ "$LLAMA" = 1 ]; then
    if ! command -v cmake >/dev/null; then
        echo "bench_serve: llama-server skipped: cmake is needed to build it; our figures alone"
    elif ! build_llama_server; then
        echo "bench_serve: llama-server could not be built (see $LLAMA_DIR/build.log); our figures alone"
    elif ! python3 "$(llama_src)/convert_hf_to_gguf.py" "$work/model" --outtype bf16 --outfile "$work/model.gguf" \
            >"$work/gguf.log" 2>&1; then
        echo "bench_serve: convert_hf_to_gguf.py failed ($(tail -n 1 "$work/gguf.log")); our figures alone"
    else
        have_llama=1
    fi
fi

# ------------------------------------------------------------- the client
cat >"$work/load.py" <<'EOF'
# load.py PORT CONCURRENCY REQUESTS PROMPT_LEN NEW_TOKENS MODEL: prints
# "tok/s ttft_p50 ttft_p99 itl_p50 itl_p99" (seconds).
import json, sys, time, http.client
from concurrent.futures import ThreadPoolExecutor
port, conc, n, plen, new, model = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), sys.argv[6]
def one(i):
    prompt = [1000 + (i * 131 + j * 17) % 50000 for j in range(plen)]
    body = json.dumps({"model": model, "prompt": prompt, "max_tokens": new, "temperature": 0, "stream": True,
                       "ignore_eos": True, "stream_options": {"include_usage": True}})
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    t0 = time.time()
    c.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
    r = c.getresponse()
    assert r.status == 200, r.read()
    times, usage = [], None
    for line in r:
        line = line.strip()
        if not line.startswith(b"data: ") or line == b"data: [DONE]":
            continue
        d = json.loads(line[6:])
        if d.get("usage"):
            usage = d["usage"]["completion_tokens"]
        if d.get("choices") and d["choices"][0].get("text"):
            times.append(time.time())
    c.close()
    ttft = times[0] - t0 if times else float("nan")
    return ttft, [b - a for a, b in zip(times, times[1:])], usage if usage is not None else len(times)
t0 = time.time()
with ThreadPoolExecutor(conc) as ex:
    res = list(ex.map(one, range(n)))
wall = time.time() - t0
def pct(v, p):
    v = sorted(v)
    return v[min(len(v) - 1, int(p / 100 * len(v)))] if v else float("nan")
ttfts = [r[0] for r in res]; itls = [x for r in res for x in r[1]]
print("%.2f %.3f %.3f %.4f %.4f" % (sum(r[2] for r in res) / wall, pct(ttfts, 50), pct(ttfts, 99), pct(itls, 50), pct(itls, 99)))
EOF

# Ports below the kernel's ephemeral range (32768 and up on Linux), where the
# clients' own connections cannot hold them: the HTTP ports count up from
# here, the tp 2 rendezvous ports 5000 above them.
port=$(( 20000 + RANDOM % 5000 ))
wait_up() { # URL PID
    for _ in $(seq 1 1200); do
        curl -sf "$1" >/dev/null 2>&1 && return 0
        kill -0 "$2" 2>/dev/null || return 1
        sleep 0.25
    done
    return 1
}
# run_server NAME C: starts it, runs the load, stops it; appends a row.
run_server() {
    local name=$1 c=$2 pid model=bench
    port=$((port + 1))
    case $name in
    tprun-tp1)
        "$BIN/tprun" "$work/tp1" --serve --port $port --max-batch "$c" --ignore-eos --served-model-name $model \
            --threads "$THREADS" --no-verify "${step_flag[@]}" >"$work/srv.log" 2>&1 &
        pid=$! ;;
    tprun-tp2)
        local r mport=$((port + 5000))
        for r in 1 0; do
            RANK=$r WORLD_SIZE=2 LOCAL_RANK=$r LOCAL_WORLD_SIZE=2 MASTER_ADDR=127.0.0.1 MASTER_PORT=$mport \
                "$BIN/tprun" "$work/tp2" --serve --port $port --max-batch "$c" --ignore-eos --served-model-name $model \
                --threads $(( THREADS / 2 > 0 ? THREADS / 2 : 1 )) --no-verify "${step_flag[@]}" >"$work/srv$r.log" 2>&1 &
            pids+=($!)
        done
        pid=$! ;;
    llama-server)
        "$llama_server" -m "$work/model.gguf" --port $port --parallel "$c" -c $(( c * (PROMPT_LEN + NEW_TOKENS + 16) )) \
            -t "$THREADS" --alias $model >"$work/srv.log" 2>&1 &
        pid=$! ;;
    esac
    pids+=($pid)
    if ! wait_up "http://127.0.0.1:$port/health" $pid; then
        echo "bench_serve: $name did not start: $(tail -n 3 "$work"/srv*.log)" >&2
        return 1
    fi
    local row
    row=$(python3 "$work/load.py" $port "$c" $(( c * REQ_PER_SLOT )) "$PROMPT_LEN" "$NEW_TOKENS" $model)
    printf '%-14s %4d  %s\n' "$name" "$c" "$row" | awk '{printf "| %-13s | %3d | %8.1f | %6.3f | %6.3f | %7.4f | %7.4f |\n", $1, $2, $3, $4, $5, $6, $7}' >>"$work/table"
    kill -TERM $pid 2>/dev/null || true
    wait $pid 2>/dev/null || true
    [ "$name" = tprun-tp2 ] && wait 2>/dev/null || true
}

servers=(tprun-tp1 tprun-tp2)
[ $have_llama = 1 ] && servers+=(llama-server)
: >"$work/table"
for c in $CONCURRENCY; do
    for name in "${servers[@]}"; do
        echo "== $name, $c concurrent"
        run_server "$name" "$c" || printf '| %-13s | %3d | failed |\n' "$name" "$c" >>"$work/table"
    done
done
kernels=$("$BIN/tprun" "$work/tp1" --prompt-ids 1 --max-new-tokens 1 --verbose 2>&1 | grep -o '[a-z0-9]* kernels' | head -1)
echo
echo "$PRESET, $PROMPT_LEN-token prompts, $NEW_TOKENS tokens each, $REQ_PER_SLOT x C requests, $THREADS threads, tprun ${kernels:-kernels unknown}${STEP_TOKENS:+, tprun --max-step-tokens $STEP_TOKENS}"
echo "| server | C | out tok/s | TTFT p50 s | TTFT p99 s | ITL p50 s | ITL p99 s |"
echo "|---|---|---|---|---|---|---|"
cat "$work/table"
