#!/usr/bin/env bash
# run_emu.sh - an optional developer check for machines without a GPU: runs
# tests/test_kernels_cuda.c against the kernels of runtime/cuda/kernels_cuda.cu
# executed on the CPU by a small emulation (every block's threads are
# std::threads, __shared__ is static storage, __syncthreads a barrier, warp
# shuffles go through per-warp barriers, cublasGemmEx is the documented
# column-major product done naively; stream capture records a stream's work
# by value and a graph launch replays it in order, see cuda_runtime.h for
# what that does not model).  It checks the kernels' indexing,
# masking, softmax and selection logic against the CPU references; it says
# nothing about speed, occupancy, memory coalescing, real warp scheduling or
# the NCCL backend.  A real GPU run of test_kernels_cuda replaces it.
# Then test_model_cuda (the whole cuda model, its weights streamed from real
# rank files through pinned staging buffers whose asynchronous copies the
# emulation defers to the next synchronisation) and tprun --device cuda
# itself (--load-only, and greedy tokens against the cpu's).
# Needs g++ (C++20), python3; all takes about 25 minutes on 2 cores
# (thousands of threads).  quick (`make check-emu`) takes a few: the kernel
# tests listed in QUICK_KERNELS below and the models listed after them cuda
# vs cpu (tp 1, and one expert-parallel conversion at tp 2; the fp8 / int8
# synthetic models), each through a
# small driver that includes the test file and calls those of its test
# functions; no tprun run.
# Usage: run_emu.sh [all|kernels|model|quick]  (default all: both test programs).
set -euo pipefail
what=${1:-all}
case $what in all|kernels|model|quick) ;; *) echo "usage: $0 [all|kernels|model|quick]" >&2; exit 2 ;; esac
# quick: the kernel tests that run in seconds to a minute (lookup, norm,
# the batched step's append and attention, gemm, picking, expert routing);
# the model run covers attention (test_attention alone takes ~3 minutes
# here), the decode graph and the device picks.
QUICK_KERNELS=(test_argument_errors test_embedding test_rmsnorm test_attention_batch test_gemm test_gemm_q8 test_argmax test_router_logits test_router_topk test_moe_rows)
# and one mixture-of-experts model (router, top-k, per-expert GEMMs, host routing)
QUICK_MODEL=qwen3-tiny
QUICK_MOE_MODEL=qwen3moe-tiny
# logits only (no graph check): the rope types linear and longrope (its prompt
# crosses original_max_position_embeddings), and the fused expert layout
# (converted by tpconvert, tp 1)
QUICK_LOGIT_MODELS=(llama-linear llama-longrope qwen3moe-fused)
# batched steps (tp_model_forward_batch on 3 slots, at tp 1 and 2) against
# the cpu's and against each prompt alone: dense, and longrope (its rows per
# pass and slot); qwen3moe-tiny passes too but adds 4 minutes here
QUICK_BATCH_MODELS=(qwen3-tiny llama-longrope)
# batched decode graphs (buckets 1, 2, 4, 8; padding rows) against the same
# steps kernel by kernel (the same bits) and the cpu's: dense, and longrope
# (its rope rows computed on the host for each step)
QUICK_GRAPH_MODELS=(qwen3-tiny llama-longrope)
# --expert-parallel, converted by tpconvert at tp 2 (in-process comm)
QUICK_EP_MODEL=qwen3moe-tiny
cd "$(dirname "$0")/../../.."
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
b=$work/build
make -s -j"$(nproc)" NOCUDA=1 BUILD="$b" BIN="$b/bin" \
    "$b/libruntime.a" "$b/libloader.a" "$b/libconvert.a" "$b/libshardfmt.a" "$b/bin/tpconvert" "$b/bin/tprun"
emu=runtime/cuda/emu
# link_emu OUT OBJ...: the objects against the CPU-only libraries.
link_emu() {
    local out=$1; shift
    g++ -o "$out" "$@" "$b/libruntime.a" "$b/libloader.a" "$b/libconvert.a" "$b/libshardfmt.a" \
        -lzstd -lcjson -larchive -lxxhash -lpcre2-8 -lutf8proc -lopenblas -lm -pthread \
        $(mpicc --showme:link 2>/dev/null || true)
}
# TP_CUDA_EMU: the tests may expect what only the emulation guarantees (a
# naive GEMM: the same bits for any row count)
inc=(-I"$emu" -Ishardfmt -Iconvert -Iloader -Iruntime -I/usr/include/cjson -DTP_HAVE_CUDA -DTP_CUDA_EMU)
python3 "$emu/rewrite.py" runtime/cuda/kernels_cuda.cu >"$work/kernels_emu.cpp"
g++ -std=c++20 -O1 -g -Iruntime/cuda "${inc[@]}" -c "$work/kernels_emu.cpp" -o "$work/kernels_emu.o"
g++ -std=c++20 -O1 -g -I"$emu" -c "$emu/emu.cpp" -o "$work/emu.o"
# quick_driver FILE CALLS...: a C file that includes a copy of the test FILE
# (its main renamed: a #define would not survive test_model_cuda.c's own
# #undef main) and whose main, once the emulated device is there, makes only
# the given calls and reports the file's checks (check_finish).
quick_driver() {
    local file=$1; shift
    local copy=$work/$(basename "$file" .c)_all.c
    sed 's/^int main(void)$/int test_all_main(void)/' "$file" >"$copy"
    grep -q '^int test_all_main(void)$' "$copy" || { echo "run_emu.sh: no 'int main(void)' in $file" >&2; exit 1; }
    printf '#include "%s"\n#include <time.h>\n' "$copy"
    printf 'int main(void)\n{\n    tp_err dev_err = { { 0 } };\n    int count = 0;\n    time_t t0 = time(NULL);\n'
    printf '    if (tpc_device_count(&count, &dev_err) || count == 0 || tpc_set_device(0, &dev_err)) {\n'
    printf '        printf("the emulation has no device: %%s\\n", dev_err.msg);\n        return 1;\n    }\n'
    for call in "$@"; do
        printf '    %s;\n    printf("done: %%s (%%lds)\\n", "%s", (long)(time(NULL) - t0));\n    fflush(stdout);\n' \
            "$call" "${call//\"/}"
    done
    printf '    return check_finish("%s (run_emu.sh quick)");\n}\n' "$(basename "$file" .c)"
}
if [ "$what" = quick ]; then
    calls=()
    for t in "${QUICK_KERNELS[@]}"; do calls+=("$t()"); done
    quick_driver tests/test_kernels_cuda.c "${calls[@]}" >"$work/test_kernels_quick.c"
    gcc -std=c11 -D_GNU_SOURCE -O1 -g "${inc[@]}" -Itests -c "$work/test_kernels_quick.c" -o "$work/test.o"
else
    gcc -std=c11 -D_GNU_SOURCE -O1 -g "${inc[@]}" -c tests/test_kernels_cuda.c -o "$work/test.o"
fi
link_emu "$work/test_kernels_cuda_emu" "$work/test.o" "$work/kernels_emu.o" "$work/emu.o"
if [ "$what" = quick ]; then
    echo "== test_kernels_cuda (${#QUICK_KERNELS[@]} of its tests) on the CPU emulation (not a GPU run)"
    "$work/test_kernels_cuda_emu"
elif [ "$what" != model ]; then
    echo "== test_kernels_cuda on the CPU emulation (not a GPU run)"
    "$work/test_kernels_cuda_emu"
fi
[ "$what" = kernels ] && exit 0

# The whole "cuda" model (runtime/cuda/model_cuda.cu and model.c's cuda
# dispatch) on the same emulation: tests/test_model_cuda.c compares its
# logits with the CPU model's on tests/models/* at tp 1 and 2 (in-process
# comm, so the all-reduces take the staged host path; no NCCL here).
cat >"$work/nccl_stub.cpp" <<'STUB'
// No nccl comm exists in the emulation: the model takes the staged path.
#include "kernels_cuda.h"
extern "C" tpc_stream tpc_comm_stream(const tp_comm *) { return nullptr; }
extern "C" int tpc_comm_device(const tp_comm *) { return -1; }
extern "C" void tpc_comm_set_enqueue_only(tp_comm *, bool) {}
extern "C" int tpc_comm_wait(tp_comm *, tp_err *) { return 0; }
STUB
for f in model_cuda weights_cuda; do
    g++ -std=c++20 -O1 -g -Iruntime/cuda "${inc[@]}" -x c++ -c runtime/cuda/$f.cu -o "$work/${f}_emu.o"
done
g++ -std=c++20 -O1 -g -Iruntime/cuda "${inc[@]}" -c "$work/nccl_stub.cpp" -o "$work/nccl_stub.o"
gcc -std=c11 -D_GNU_SOURCE -O1 -g "${inc[@]}" -c runtime/model.c -o "$work/model_cuda_dispatch.o"
if [ "$what" = quick ]; then
    # each comparison, then a check that it compared something
    calls=("g_max_tp = 1")
    for m in "$QUICK_MODEL" "$QUICK_MOE_MODEL"; do
        calls+=("compare_model(\"tests/models/$m\", \"$m\")" "expect_compared(\"$m\")")
    done
    for m in "${QUICK_BATCH_MODELS[@]}"; do
        calls+=("compare_batched_fixture(\"tests/models/$m\", \"$m\")" "expect_compared(\"$m batched\")")
    done
    for m in "${QUICK_GRAPH_MODELS[@]}"; do
        calls+=("compare_batch_graphs_fixture(\"tests/models/$m\", \"$m\")" "expect_compared(\"$m batched graphs\")")
    done
    for m in "${QUICK_LOGIT_MODELS[@]}"; do
        calls+=("compare_fixture(\"tests/models/$m\", \"$m\", false)" "expect_compared(\"$m\")")
    done
    calls+=("compare_converted(\"tests/models/$QUICK_EP_MODEL\", \"$QUICK_EP_MODEL\", 2, true)"
            "expect_compared(\"$QUICK_EP_MODEL expert-parallel\")"
            "compare_quantized(TP_F8_E4M3)" "expect_compared(\"the fp8 synthetic model\")"
            "compare_quantized(TP_I8)" "expect_compared(\"the int8 synthetic model\")")
    quick_driver tests/test_model_cuda.c "${calls[@]}" >"$work/test_model_quick.c"
    gcc -std=c11 -D_GNU_SOURCE -O1 -g "${inc[@]}" -Itests -c "$work/test_model_quick.c" -o "$work/test_model.o"
    label="test_model_cuda ($QUICK_MODEL, $QUICK_MOE_MODEL, ${QUICK_LOGIT_MODELS[*]} at tp 1; batched ${QUICK_BATCH_MODELS[*]}; batched decode graphs ${QUICK_GRAPH_MODELS[*]}; $QUICK_EP_MODEL expert-parallel at tp 2; the 8-bit synthetic models)"
else
    gcc -std=c11 -D_GNU_SOURCE -O1 -g "${inc[@]}" -c tests/test_model_cuda.c -o "$work/test_model.o"
    label=test_model_cuda
fi
link_emu "$work/test_model_cuda_emu" "$work/test_model.o" "$work/model_cuda_dispatch.o" "$work/model_cuda_emu.o" "$work/weights_cuda_emu.o" \
    "$work/nccl_stub.o" "$work/kernels_emu.o" "$work/emu.o"
echo "== $label on the CPU emulation (not a GPU run)"
"$work/test_model_cuda_emu"
[ "$what" = quick ] && exit 0

# tprun itself on the emulation: --device cuda --load-only opens a real
# conversion (zstd and uncompressed) without decoding it and streams it to
# the "device", and a greedy generation on --device cuda gives the cpu's
# tokens.
gcc -std=c11 -D_GNU_SOURCE -O1 -g "${inc[@]}" -c tools/tprun.c -o "$work/tprun.o"
link_emu "$work/tprun_emu" "$work/tprun.o" "$work/model_cuda_dispatch.o" "$work/model_cuda_emu.o" "$work/weights_cuda_emu.o" \
    "$work/nccl_stub.o" "$work/kernels_emu.o" "$work/emu.o"
echo "== tprun --device cuda on the CPU emulation (not a GPU run)"
model=tests/models/qwen3-tiny
for codec in zstd none; do
    conv=$work/conv-$codec
    "$b/bin/tpconvert" --tp 1 --compress "$codec" --chunk-size 4K --quiet "$model" "$conv"
    "$work/tprun_emu" "$conv" --device cuda --load-only --threads 2 2>"$work/load.log" || {
        cat "$work/load.log"; echo "tprun --device cuda --load-only ($codec) failed"; exit 1; }
    grep 'load-only: rank 0 of 1: .* MB of weights on the device in .* GB/s' "$work/load.log" || {
        cat "$work/load.log"; echo "tprun --load-only ($codec): no load line"; exit 1; }
    args=(--prompt-ids 1,2,3,4,5 --max-new-tokens 6 --temperature 0 --ignore-eos --json --threads 2)
    cpu=$("$b/bin/tprun" "$conv" "${args[@]}" | grep -o '"generated_ids":\[[^]]*\]')
    gpu=$("$work/tprun_emu" "$conv" --device cuda "${args[@]}" | grep -o '"generated_ids":\[[^]]*\]')
    echo "  $codec: cpu $cpu, cuda $gpu"
    if [ -z "$cpu" ] || [ "$cpu" != "$gpu" ]; then
        echo "tprun --device cuda ($codec): tokens differ from the cpu's"; exit 1
    fi
done
echo "tprun on the emulation: ok"
