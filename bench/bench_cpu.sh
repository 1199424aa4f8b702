#!/usr/bin/env bash
# bench_cpu.sh - the CPU runtime on a Qwen3-0.6B-shaped checkpoint, side by
# side with llama.cpp on the same weights (make bench-cpu; make bench-cpu-8b
# runs the qwen3-8b preset, tprun only).
#
# 1. The model: bin/tpsynth --preset $PRESET (qwen3-0.6b: hidden 1024, 28
#    layers, 16 heads, 8 KV heads, head_dim 128, intermediate 3072, vocab
#    151936, tied, bf16 N(0, 0.02^2)) with the Qwen3 tokenizer (llama.cpp's
#    converter needs one).
# 2. llama.cpp, built once and cached under $LLAMA_DIR (build/llama.cpp): the
#    source distribution of the llama-cpp-python package on PyPI (which
#    vendors llama.cpp), cmake Release with GGML_NATIVE=ON, llama-bench (the
#    one program measured; this llama.cpp has no llama-cli target).  Its
#    convert_hf_to_gguf.py turns the same safetensors into bf16 and q8_0
#    GGUF (python: torch, numpy, transformers, sentencepiece; the missing
#    ones are pip-installed).  If any of this fails the script
#    says so and prints our figures alone.
# 3. One table at tp 1, the tools interleaved for $ROUNDS rounds (tprun,
#    llama.cpp bf16, llama.cpp q8_0, again ...), each round a fresh process:
#      decode tok/s    $NEW_TOKENS greedy tokens after the prompt
#                      (tprun --json decode_tokens_per_s; llama-bench tg)
#      prefill tok/s   a $PROMPT_LEN-token prompt (prefill_tokens_per_s; pp)
#      TTFT            wall time of a process that loads the model and runs
#                      the prompt (tprun --max-new-tokens 1, checksums
#                      verified; llama-bench -n 0 -r 1 --no-warmup)
#      peak RSS        /usr/bin/time's maximum resident set of the decode run
#    median and best (tok/s: max; TTFT: min) over the rounds, and our
#    medians as a ratio of llama.cpp bf16's; then the issue's targets.
#    tprun-fp8 / tprun-int8 are the same weights through tpconvert
#    --quantize fp8 / int8 (the linear layers; the tied embedding / lm_head
#    stays bf16 unless QUANT_FLAGS has --quantize-lm-head, so the rank file
#    need not be half the bf16 one: the script prints the ratio of the bytes
#    read a token, the bound of a decode that only streams weights; an
#    untied embedding is read one row a token),
#    against our bf16 decode and llama.cpp q8_0.
# 4. tprun alone at every tp in $TPS (ranks joined by tcp on 127.0.0.1,
#    each with $THREADS / tp threads): load seconds per rank for every
#    codec in $CODECS (warm page cache, checksums verified), prefill and
#    decode tok/s, and the peak RSS of each rank.  Each conversion is
#    deleted after use (the 8B preset writes ~32 GB at most at once).
#
# Environment: BIN (bin), PRESET (qwen3-0.6b), TPS ("1 2"), CODECS
# ("none exphuf zstd"), QUANT ("fp8 int8"; "" skips the 8-bit rows), QUANT_FLAGS
# (more tpconvert flags for them, e.g. --quantize-lm-head), SYNTH_FLAGS (more
# tpsynth flags, e.g. --no-tie), PROMPT_LEN (128), NEW_TOKENS (32), ROUNDS (3), THREADS
# (nproc), LLAMA (1; 0 skips llama.cpp), LLAMA_DIR (build/llama.cpp),
# BENCH_TMP (the work directory's parent, default $TMPDIR or /tmp).
# Figures on a shared machine are noisy: compare medians of interleaved runs.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-bin}
PRESET=${PRESET:-qwen3-0.6b}
TPS=${TPS:-"1 2"}
CODECS=${CODECS:-"none exphuf zstd"}
QUANT=${QUANT-"fp8 int8"}
QUANT_FLAGS=${QUANT_FLAGS:-}
SYNTH_FLAGS=${SYNTH_FLAGS:-}
PROMPT_LEN=${PROMPT_LEN:-128}
NEW_TOKENS=${NEW_TOKENS:-32}
ROUNDS=${ROUNDS:-3}
THREADS=${THREADS:-$(nproc)}
LLAMA=${LLAMA:-1}
LLAMA_DIR=${LLAMA_DIR:-build/llama.cpp}
parent=${BENCH_TMP:-${TMPDIR:-/tmp}}
tokenizer=tests/data/qwen3-tokenizer/tokenizer.json.zst
for prog in tpsynth tpconvert tprun; do
    [ -x "$BIN/$prog" ] || { echo "bench_cpu: $BIN/$prog not found (run make first)" >&2; exit 1; }
done
[ -x /usr/bin/time ] || { echo "bench_cpu: /usr/bin/time not found (apt-get install time)" >&2; exit 1; }
work=$(mktemp -d "$parent/bench-cpu.XXXXXX")
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$work"; }
trap cleanup EXIT
results=$work/results.tsv   # tool <TAB> metric <TAB> value, one line per measurement
: > "$results"

echo "== model: $BIN/tpsynth --preset $PRESET"
"$BIN/tpsynth" --preset "$PRESET" $SYNTH_FLAGS --tokenizer "$tokenizer" --quiet "$work/model"
cfg=$work/model/config.json
cfg_int() { sed -n "s/.*\"$1\":[[:space:]]*\([0-9]*\).*/\1/p" "$cfg" | head -n 1; }
vocab=$(cfg_int vocab_size)
# Prompt ids: a fixed pseudo-random sequence inside the vocabulary.
ids=$(awk -v n="$PROMPT_LEN" -v vocab="$vocab" 'BEGIN { s = 12345; for (i = 0; i < n; i++) { s = (s * 75 + 74) % 65537; printf "%s%d", (i ? "," : ""), s % vocab } }')
gen=(--prompt-ids "$ids" --max-new-tokens "$NEW_TOKENS" --temperature 0 --ignore-eos)

json_field() { # file key -> number
    sed -n "s/.*\"$2\":\([0-9.eE+-]*\).*/\1/p" "$1" | head -n 1
}

# ------------------------------------------------------------- llama.cpp

llama_src() { ls -d "$LLAMA_DIR"/src/llama_cpp_python-*/vendor/llama.cpp 2>/dev/null | head -n 1; }
llama_bench=$LLAMA_DIR/cmake-build/bin/llama-bench

# Downloads, unpacks and builds llama.cpp unless the cache has it; its
# output goes to $LLAMA_DIR/build.log.
build_llama() {
    [ -x "$llama_bench" ] && return 0
    mkdir -p "$LLAMA_DIR/src"
    if ! ls "$LLAMA_DIR"/src/llama_cpp_python-*.tar.gz >/dev/null 2>&1; then
        echo "== llama.cpp: pip download --no-deps --no-binary :all: llama-cpp-python"
        python3 -m pip download --no-deps --no-binary :all: llama-cpp-python -d "$LLAMA_DIR/src" \
            >> "$LLAMA_DIR/build.log" 2>&1 || return 1
    fi
    if [ -z "$(llama_src)" ]; then
        tar xzf "$(ls "$LLAMA_DIR"/src/llama_cpp_python-*.tar.gz | head -n 1)" -C "$LLAMA_DIR/src" || return 1
    fi
    echo "== llama.cpp: cmake Release, GGML_NATIVE=ON (once; cached in $LLAMA_DIR)"
    cmake -S "$(llama_src)" -B "$LLAMA_DIR/cmake-build" -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON \
        -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
        -DLLAMA_BUILD_SERVER=OFF >> "$LLAMA_DIR/build.log" 2>&1 || return 1
    cmake --build "$LLAMA_DIR/cmake-build" -j"$(nproc)" --target llama-bench \
        >> "$LLAMA_DIR/build.log" 2>&1 || return 1
    [ -x "$llama_bench" ]
}

# The converter's python modules; pip installs the missing ones.
convert_deps() {
    local mod pkg missing=()
    for mod in numpy torch transformers sentencepiece; do
        python3 -c "import $mod" 2>/dev/null || missing+=("$mod")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    echo "== pip install ${missing[*]} (for convert_hf_to_gguf.py)"
    python3 -m pip install --quiet "${missing[@]}" >> "$LLAMA_DIR/build.log" 2>&1
}

gguf_bf16=$work/model-bf16.gguf
gguf_q8=$work/model-q8_0.gguf
if [ "$LLAMA" = 1 ]; then
    mkdir -p "$LLAMA_DIR"
    if ! command -v python3 >/dev/null || ! command -v cmake >/dev/null; then
        echo "bench_cpu: llama.cpp skipped: python3 and cmake are needed to build it; our figures alone"
        LLAMA=0
    elif ! build_llama; then
        echo "bench_cpu: llama.cpp could not be built (see $LLAMA_DIR/build.log); our figures alone"
        LLAMA=0
    elif ! convert_deps; then
        echo "bench_cpu: the python modules of convert_hf_to_gguf.py could not be installed (see $LLAMA_DIR/build.log); our figures alone"
        LLAMA=0
    else
        for q in bf16 q8_0; do
            echo "== llama.cpp: convert_hf_to_gguf.py --outtype $q"
            if ! python3 "$(llama_src)/convert_hf_to_gguf.py" "$work/model" --outtype "$q" \
                    --outfile "$work/model-$q.gguf" > "$work/convert-$q.log" 2>&1; then
                echo "bench_cpu: convert_hf_to_gguf.py --outtype $q failed ($(tail -n 1 "$work/convert-$q.log")); our figures alone"
                LLAMA=0
                break
            fi
        done
    fi
fi

# ------------------------------------------------------------ measuring

# tprun tp 1, one round: decode + prefill (+ peak RSS), then TTFT.
round_tprun() { # tool name, conversion
    local tool=$1 out=$2
    /usr/bin/time -f %M -o "$work/rss" "$BIN/tprun" "$out" "${gen[@]}" --threads "$THREADS" --json \
        > "$work/gen.json" 2> "$work/gen.err" || { echo "bench_cpu: tprun failed: $(tail -n 3 "$work/gen.err")" >&2; exit 1; }
    printf '%s\tdecode\t%s\n%s\tprefill\t%s\n%s\trss\t%s\n' "$tool" \
        "$(json_field "$work/gen.json" decode_tokens_per_s)" \
        "$tool" "$(json_field "$work/gen.json" prefill_tokens_per_s)" "$tool" "$(tail -n 1 "$work/rss")" >> "$results"
    /usr/bin/time -f %e -o "$work/wall" "$BIN/tprun" "$out" --prompt-ids "$ids" --max-new-tokens 1 \
        --temperature 0 --threads "$THREADS" > /dev/null 2>&1
    printf '%s\tttft\t%s\n' "$tool" "$(tail -n 1 "$work/wall")" >> "$results"
}

# llama-bench -o csv: the avg_ts of the row whose n_prompt / n_gen is set.
llama_ts() { # csv, "pp" or "tg"
    python3 - "$1" "$2" <<'EOF'
import csv, sys
for row in csv.DictReader(open(sys.argv[1])):
    if (sys.argv[2] == "pp") == (int(row["n_gen"]) == 0):
        print(row["avg_ts"])
        break
EOF
}

# llama-bench's extra flags per model: --repack 0 where its default dies
# (SIGILL or SIGSEGV in the AMX kernels on CPUs that list AMX, as in VMs that
# do not let a process use the AMX tile state).
declare -A llama_extra=()
probe_llama() { # tool name, gguf
    local rc=0
    "$llama_bench" -m "$2" -t "$THREADS" -p 8 -n 1 -r 1 --no-warmup > /dev/null 2>&1 || rc=$?
    [ $rc -eq 0 ] && return 0
    if "$llama_bench" -m "$2" -t "$THREADS" -p 8 -n 1 -r 1 --no-warmup --repack 0 > /dev/null 2>&1; then
        llama_extra[$1]="--repack 0"
        echo "bench_cpu: $1: llama-bench dies (exit $rc; its AMX kernels) by default here: measured with --repack 0"
        return 0
    fi
    echo "bench_cpu: $1: llama-bench fails (exit $rc), with --repack 0 too" >&2
    return 1
}

round_llama() { # tool name, gguf
    local tool=$1 model=$2
    local -a extra=(${llama_extra[$tool]:-})
    /usr/bin/time -f %M -o "$work/rss" "$llama_bench" -m "$model" -t "$THREADS" -p "$PROMPT_LEN" \
        -n "$NEW_TOKENS" -r 1 "${extra[@]}" -o csv > "$work/llama.csv" 2> "$work/llama.err" ||
        { echo "bench_cpu: llama-bench ${extra[*]} on $model failed: $(tail -n 3 "$work/llama.err")" >&2; exit 1; }
    printf '%s\tdecode\t%s\n%s\tprefill\t%s\n%s\trss\t%s\n' "$tool" "$(llama_ts "$work/llama.csv" tg)" \
        "$tool" "$(llama_ts "$work/llama.csv" pp)" "$tool" "$(tail -n 1 "$work/rss")" >> "$results"
    /usr/bin/time -f %e -o "$work/wall" "$llama_bench" -m "$model" -t "$THREADS" -p "$PROMPT_LEN" \
        -n 0 -r 1 --no-warmup "${extra[@]}" > /dev/null 2>&1
    printf '%s\tttft\t%s\n' "$tool" "$(tail -n 1 "$work/wall")" >> "$results"
}

# "median best" of one tool's metric; best is the max (tok/s) or min.
stats() { # tool metric max|min
    awk -F'\t' -v t="$1" -v m="$2" '$1 == t && $2 == m { print $3 }' "$results" | sort -g |
        awk -v best="$3" '{ v[NR] = $1 } END { if (!NR) { print "- -"; exit }
            med = NR % 2 ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2
            print med, (best == "max" ? v[NR] : v[1]) }'
}

# ------------------------------------------------------ the tp 1 table

tp1=$work/tp1-none
"$BIN/tpconvert" --tp 1 --compress none --quiet "$work/model" "$tp1"
tp1_bytes=$(du -sb "$tp1"/rank-*.tpshard | awk '{ s += $1 } END { print s }')
tools=(tprun)
for q in $QUANT; do
    "$BIN/tpconvert" --tp 1 --compress none --quantize "$q" $QUANT_FLAGS --quiet "$work/model" "$work/tp1-$q"
    tools+=(tprun-$q)
done
[ "$LLAMA" = 1 ] && tools+=(llama.cpp-bf16 llama.cpp-q8_0)
if [ "$LLAMA" = 1 ]; then
    probe_llama llama.cpp-bf16 "$gguf_bf16" && probe_llama llama.cpp-q8_0 "$gguf_q8" || exit 1
fi
echo "== $ROUNDS interleaved rounds: ${tools[*]} ($THREADS threads)"
for (( r = 1; r <= ROUNDS; r++ )); do
    round_tprun tprun "$tp1"
    for q in $QUANT; do round_tprun tprun-$q "$work/tp1-$q"; done
    if [ "$LLAMA" = 1 ]; then
        round_llama llama.cpp-bf16 "$gguf_bf16"
        round_llama llama.cpp-q8_0 "$gguf_q8"
    fi
done

# the matrix kernels tprun picked on this CPU (tprun --cpu-kernels; --verbose names them)
kernels=$("$BIN/tprun" "$tp1" --prompt-ids 1 --max-new-tokens 1 --verbose 2>&1 | grep -o '[a-z0-9]* kernels' | head -1)
echo
echo "bench-cpu: $PRESET${SYNTH_FLAGS:+ $SYNTH_FLAGS}${QUANT_FLAGS:+ (8-bit: $QUANT_FLAGS)}, tp 1, $THREADS threads, $(nproc) cores ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ *//')), tprun ${kernels:-kernels unknown}"
echo "prompt $PROMPT_LEN tokens, $NEW_TOKENS new tokens, greedy; $ROUNDS interleaved rounds; median (best)"
printf '%-16s %18s %18s %16s %14s\n' tool "decode tok/s" "prefill tok/s" "TTFT s" "peak RSS GB"
for t in "${tools[@]}"; do
    read -r dm db <<< "$(stats "$t" decode max)"
    read -r pm pb <<< "$(stats "$t" prefill max)"
    read -r tm tb <<< "$(stats "$t" ttft min)"
    read -r rssm rssb <<< "$(stats "$t" rss min)"
    printf '%-16s %8.2f (%6.2f) %8.1f (%6.1f) %6.2f (%6.2f) %14.2f\n' "$t" "$dm" "$db" "$pm" "$pb" \
        "$tm" "$tb" "$(awk -v k="$rssm" 'BEGIN { print k * 1024 / 1e9 }')"
done
if [ "$LLAMA" = 1 ]; then
    read -r dm _ <<< "$(stats tprun decode max)"; read -r dl _ <<< "$(stats llama.cpp-bf16 decode max)"
    read -r pm _ <<< "$(stats tprun prefill max)"; read -r pl _ <<< "$(stats llama.cpp-bf16 prefill max)"
    read -r tm _ <<< "$(stats tprun ttft min)"; read -r tl _ <<< "$(stats llama.cpp-bf16 ttft min)"
    read -r rssm _ <<< "$(stats tprun rss min)"; read -r rssl _ <<< "$(stats llama.cpp-bf16 rss min)"
    awk -v dm="$dm" -v dl="$dl" -v pm="$pm" -v pl="$pl" -v tm="$tm" -v tl="$tl" -v rm="$rssm" -v rl="$rssl" 'BEGIN {
        printf "tprun / llama.cpp bf16 (medians): decode %.2fx, prefill %.2fx, TTFT %.2fx, peak RSS %.2fx\n",
            dm / dl, pm / pl, tm / tl, rm / rl
        printf "target decode >= 1.0x llama.cpp bf16: %s\n", (dm >= dl ? "met" : "NOT met")
        printf "target prefill >= 1.0x llama.cpp bf16: %s\n", (pm >= pl ? "met" : "NOT met") }'
fi
# The 8-bit conversions: decode against our bf16 and llama.cpp q8_0.
read -r dm _ <<< "$(stats tprun decode max)"
for q in $QUANT; do
    qbytes=$(du -sb "$work/tp1-$q"/rank-*.tpshard | awk '{ s += $1 } END { print s }')
    # An untied embedding is in both files but only one row of it is read a token.
    emb=0
    grep -q '"tie_word_embeddings":[[:space:]]*false' "$cfg" && emb=$(( $(cfg_int vocab_size) * $(cfg_int hidden_size) * 2 ))
    read -r dq _ <<< "$(stats tprun-$q decode max)"
    awk -v q="$q" -v dq="$dq" -v dm="$dm" -v b="$tp1_bytes" -v qb="$qbytes" -v e="$emb" 'BEGIN {
        printf "tprun %s / tprun bf16 decode (medians): %.2fx (rank file %.2f GB vs %.2f GB; bytes read a token: ratio %.2fx); target >= 1.7x: %s\n",
            q, dq / dm, qb / 1e9, b / 1e9, (b - e) / (qb - e), (dq >= 1.7 * dm ? "met" : "NOT met") }'
    if [ "$LLAMA" = 1 ] && [ "$q" = int8 ]; then
        read -r dl _ <<< "$(stats llama.cpp-q8_0 decode max)"
        awk -v dq="$dq" -v dl="$dl" 'BEGIN {
            printf "tprun int8 / llama.cpp q8_0 decode (medians): %.2fx; target >= 1.0x: %s\n", dq / dl, (dq >= dl ? "met" : "NOT met") }'
    fi
    rm -rf "$work/tp1-$q"
done
# RSS target: the rank file plus the KV cache that the run fills (fp32 K and V).
kv=$(( ($(cfg_int num_hidden_layers) * $(cfg_int num_key_value_heads) * $(cfg_int head_dim)) * 8 * (PROMPT_LEN + NEW_TOKENS) ))
read -r rssm _ <<< "$(stats tprun rss min)"
awk -v r="$rssm" -v b="$tp1_bytes" -v kv="$kv" 'BEGIN {
    lim = 1.15 * b + kv
    printf "target peak RSS <= 1.15 x rank file (%.2f GB) + KV cache (%.3f GB) = %.2f GB: %.2f GB, %s\n",
        b / 1e9, kv / 1e9, lim / 1e9, r * 1024 / 1e9, (r * 1024 <= lim ? "met" : "NOT met") }'
rm -rf "$tp1"

# ------------------------------------------------ tprun at every tp

# Runs tp ranks of tprun with the given arguments; rank 0's JSON to $out,
# every rank's peak RSS (KB) to $out.rss.R.
run_ranks() { # tp out args...
    local tp=$1 out=$2; shift 2
    local threads=$(( THREADS / tp )); [ "$threads" -ge 1 ] || threads=1
    local port=$(( 20000 + RANDOM % 12000 )) r   # below the ephemeral ports (32768+)
    pids=()
    for (( r = 1; r < tp; r++ )); do
        RANK=$r WORLD_SIZE=$tp LOCAL_RANK=$r MASTER_ADDR=127.0.0.1 MASTER_PORT=$port \
            /usr/bin/time -f %M -o "$out.rss.$r" "$BIN/tprun" "$@" --threads "$threads" --json > /dev/null 2>&1 &
        pids+=($!)
    done
    local rc=0
    RANK=0 WORLD_SIZE=$tp LOCAL_RANK=0 MASTER_ADDR=127.0.0.1 MASTER_PORT=$port \
        /usr/bin/time -f %M -o "$out.rss.0" "$BIN/tprun" "$@" --threads "$threads" --json > "$out" 2> "$out.err" || rc=1
    for p in "${pids[@]}"; do wait "$p" || rc=1; done
    pids=()
    [ $rc -eq 0 ] || { echo "bench_cpu: tprun at tp $tp failed: $(grep -v '^[0-9]*$' "$out.err" | tail -n 3)" >&2; exit 1; }
}

rows=()
for tp in $TPS; do
    for codec in $CODECS; do
        out=$work/tp$tp-$codec
        "$BIN/tpconvert" --tp "$tp" --compress "$codec" --quiet "$work/model" "$out"
        bytes=$(du -sb "$out" | cut -f1)
        run_ranks "$tp" "$work/load.json" "$out" --load-only --verbose
        load_s=$(sed -n 's/^tprun: loaded rank 0 .* in \([0-9.]*\) s.*/\1/p' "$work/load.json.err")
        prefill=-; decode=-; rss=-; read_s=-
        if [ "$codec" = none ]; then
            # the load target's yardstick: rank 0's file read once from the page cache
            /usr/bin/time -f %e -o "$work/wall" cat "$out"/rank-00000-of-*.tpshard > /dev/null
            read_s=$(tail -n 1 "$work/wall")
            run_ranks "$tp" "$work/gen.json" "$out" "${gen[@]}"
            prefill=$(printf '%.1f' "$(json_field "$work/gen.json" prefill_tokens_per_s)")
            decode=$(printf '%.2f' "$(json_field "$work/gen.json" decode_tokens_per_s)")
            rss=$(for (( r = 0; r < tp; r++ )); do tail -n 1 "$work/gen.json.rss.$r"; done |
                  awk '{ printf "%s%.2f", (NR > 1 ? "/" : ""), $1 * 1024 / 1e9 }')
        fi
        rm -rf "$out"
        rows+=("$(printf '%-4s %-6s %10.3f %12s %12s %14s %14s %s' "$tp" "$codec" \
            "$(awk -v b="$bytes" 'BEGIN { print b / 1e9 }')" "$load_s" "$read_s" "$prefill" "$decode" "$rss")")
    done
done

echo
echo "tprun at tp $TPS: each rank $THREADS / tp threads; warm page cache, checksums verified; rank 0's figures"
printf '%-4s %-6s %10s %12s %12s %14s %14s %s\n' tp codec "out GB" "load s/rank" "cat s/rank" "prefill tok/s" \
    "decode tok/s" "peak RSS GB per rank"
for r in "${rows[@]}"; do echo "$r"; done
