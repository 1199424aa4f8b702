# tpshard: tpconvert / tprun and friends.
#
# Layers (each a static library with one public header):
#   shardfmt/  formats, codec, checksums, thread pool, progress
#   convert/   HF model + TP plan -> rank files
#   loader/    converted directory or node bundle -> a rank's tensors in memory
#   runtime/   model, forward pass (CPU; CUDA when nvcc is found), tokenizer, comm, generation
# Programs are thin mains in tools/*.c -> bin/.  Tests are tests/test_*.c
# (unit) and tests/e2e_*.sh (end to end), all run by `make test`.

CC      ?= cc
# The project's own flags live in TP_* variables that the rules always use,
# so a command-line CFLAGS / CPPFLAGS / LDFLAGS / LDLIBS (e.g.
# `make CFLAGS="-O1 -g -fsanitize=address,undefined"
#  LDFLAGS=-fsanitize=address,undefined`) adds to them instead of dropping
# -std=c11, -D_GNU_SOURCE, -pthread, the include paths or the libraries.
TP_CFLAGS   := -std=c11 -D_GNU_SOURCE -Wall -Wextra -Wno-unused-parameter -pthread -fPIC
TP_INCLUDES := -Ishardfmt -Iconvert -Iloader -Iruntime -I/usr/include/cjson
TP_CPPFLAGS := $(TP_INCLUDES) $(MHD_CFLAGS)
# The libraries every program, test and fuzz target links (MPI / CUDA added below).
# libmicrohttpd: tprun --serve's HTTP server (runtime/serve_http.c).
MHD_CFLAGS := $(shell pkg-config --cflags libmicrohttpd 2>/dev/null)
MHD_LIBS   := $(or $(shell pkg-config --libs libmicrohttpd 2>/dev/null),-lmicrohttpd)
TP_BASE_LIBS := -lzstd -lcjson -larchive -lxxhash -lpcre2-8 -lutf8proc -lopenblas $(MHD_LIBS) -lm -pthread
TP_LDLIBS   := $(TP_BASE_LIBS)

# `make SAN=1 ...`: an AddressSanitizer + UBSan build in its own tree
# (build-san/, bin-san/), so that it never clobbers the normal build.  CPU
# only: the CUDA tests skip without a GPU anyway.  BUILD=/BIN= still win.
SAN_FLAGS := -fsanitize=address,undefined -fno-sanitize-recover=undefined -fno-omit-frame-pointer
SAN_BUILD := build-san
SAN_BIN   := bin-san
ifeq ($(SAN),1)
  CFLAGS    ?= -O1 -g
  TP_CFLAGS += $(SAN_FLAGS)
  LDFLAGS   += $(SAN_FLAGS)
  BUILD     := $(SAN_BUILD)
  BIN       := $(SAN_BIN)
  NOCUDA    := 1
else ifeq ($(NOCUDA),1)
  # Objects without TP_HAVE_CUDA must never mix with the CUDA build's.
  BUILD     := build-nocuda
  BIN       := bin-nocuda
else
  BUILD     := build
  BIN       := bin
endif
CFLAGS  ?= -O2 -g

# MPI (Open MPI from Debian) for the CPU multi-rank backend; optional.
MPI_CFLAGS := $(shell mpicc --showme:compile 2>/dev/null)
MPI_LIBS   := $(shell mpicc --showme:link 2>/dev/null)
ifneq ($(MPI_LIBS),)
  TP_CPPFLAGS += -DTP_HAVE_MPI $(MPI_CFLAGS)
  TP_LDLIBS   += $(MPI_LIBS)
endif

# CUDA + NCCL when nvcc is found (CPU-only build otherwise).
CUDA_HOME ?= /usr/local/cuda
NVCC := $(shell command -v nvcc 2>/dev/null || ( test -x $(CUDA_HOME)/bin/nvcc && echo $(CUDA_HOME)/bin/nvcc ))
ifeq ($(NOCUDA),1)
  NVCC :=
endif
CU_SRC :=
ifneq ($(NVCC),)
  CU_SRC         := $(wildcard runtime/cuda/*.cu)
  NVCCFLAGS      ?= -O2 -gencode arch=compute_80,code=sm_80 -gencode arch=compute_90,code=sm_90
  TP_NVCCFLAGS   := -std=c++17 -Xcompiler -fPIC -Ishardfmt -Iconvert -Iloader -Iruntime -DTP_HAVE_CUDA
  TP_CPPFLAGS    += -DTP_HAVE_CUDA -I$(CUDA_HOME)/include
  TP_LDLIBS      += -L$(CUDA_HOME)/lib64 -Wl,-rpath,$(CUDA_HOME)/lib64 -lnccl -lcudart -ldl -lstdc++
endif

LAYERS := shardfmt convert loader runtime
# Link order: higher layers first.
LIBS := $(BUILD)/libruntime.a $(BUILD)/libloader.a $(BUILD)/libconvert.a $(BUILD)/libshardfmt.a

define layer_objs
$(patsubst %.c,$(BUILD)/%.o,$(wildcard $(1)/*.c))
endef

SHARDFMT_OBJS := $(call layer_objs,shardfmt)
CONVERT_OBJS  := $(call layer_objs,convert)
LOADER_OBJS   := $(call layer_objs,loader)
RUNTIME_OBJS  := $(call layer_objs,runtime) $(patsubst %.cu,$(BUILD)/%.o,$(CU_SRC))

PROGRAMS   := $(patsubst tools/%.c,$(BIN)/%,$(wildcard tools/*.c))
TEST_PROGS := $(patsubst tests/%.c,$(BUILD)/tests/%,$(wildcard tests/test_*.c))
HEADERS    := $(wildcard */*.h runtime/cuda/*.h)

.PHONY: all test check check-san check-emu clean demo fuzz fuzz-build deps bench-convert bench-cpu bench-cpu-8b bench-gpu bench-comm bench-moe bench-serve print-cflags print-ldlibs
all: $(PROGRAMS) $(TEST_PROGS)

# The README's two commands.  Each installs what is missing first, then
# re-enters make so that the MPI/CUDA detection above sees the new packages.
demo:
	bash tools/install-deps.sh
	$(MAKE) -j$(shell nproc) all
	bash tools/demo.sh
check:
	bash tools/install-deps.sh
	$(MAKE) -j$(shell nproc) all
	$(MAKE) fuzz FUZZ_SECONDS=$(FUZZ_SECONDS)
	bash tests/run_tests.sh
	$(MAKE) check-san

# The whole test suite again, built with ASan + UBSan in its own tree.  Any
# report fails the test it happens in; LeakSanitizer is on, with only Open
# MPI's own leaks suppressed (tests/lsan.supp).  fast_unwind_on_malloc=0:
# Open MPI's libraries have no frame pointers, and only full allocation
# stacks reach the libmpi frames that the suppressions name.
# OPENBLAS_NUM_THREADS=1: OpenBLAS starts its worker threads from a library
# constructor; a program that exits at once (--help) while they start up
# drew one unsymbolised 152-byte LeakSanitizer report under load, once.  The
# model runs OpenBLAS single-threaded anyway (model.c), so this changes no
# code path of ours.
SAN_ENV := OPENBLAS_NUM_THREADS=1 \
           ASAN_OPTIONS=halt_on_error=1:detect_leaks=1:fast_unwind_on_malloc=0 \
           UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1 \
           LSAN_OPTIONS=suppressions=$(CURDIR)/tests/lsan.supp:print_suppressions=0
check-san:
	$(MAKE) -j$(shell nproc) SAN=1 all
	$(SAN_ENV) BUILD=$(SAN_BUILD) BIN=$(SAN_BIN) bash tests/run_tests.sh

# Not part of check: a few minutes of the CUDA kernels and model on the CPU
# emulation (runtime/cuda/emu/run_emu.sh quick; `run_emu.sh all` is ~25 min).
check-emu:
	bash runtime/cuda/emu/run_emu.sh quick
deps:
	bash tools/install-deps.sh

$(BUILD)/%.o: %.c $(HEADERS)
	@mkdir -p $(dir $@)
	$(CC) $(TP_CPPFLAGS) $(CPPFLAGS) $(TP_CFLAGS) $(CFLAGS) -c $< -o $@

$(BUILD)/%.o: %.cu $(HEADERS)
	@mkdir -p $(dir $@)
	$(NVCC) $(TP_NVCCFLAGS) $(NVCCFLAGS) -c $< -o $@

$(BUILD)/libshardfmt.a: $(SHARDFMT_OBJS)
$(BUILD)/libconvert.a:  $(CONVERT_OBJS)
$(BUILD)/libloader.a:   $(LOADER_OBJS)
$(BUILD)/libruntime.a:  $(RUNTIME_OBJS)
$(BUILD)/lib%.a:
	@mkdir -p $(BUILD)
	rm -f $@ && ar rcs $@ $^

$(BIN)/%: tools/%.c $(LIBS) $(HEADERS)
	@mkdir -p $(BIN)
	$(CC) $(TP_CPPFLAGS) $(CPPFLAGS) $(TP_CFLAGS) $(CFLAGS) $(LDFLAGS) $< -o $@ $(LIBS) $(TP_LDLIBS) $(LDLIBS)

$(BUILD)/tests/%: tests/%.c $(LIBS) $(HEADERS)
	@mkdir -p $(BUILD)/tests
	$(CC) $(TP_CPPFLAGS) $(CPPFLAGS) $(TP_CFLAGS) $(CFLAGS) $(LDFLAGS) $< -o $@ $(LIBS) $(TP_LDLIBS) $(LDLIBS)

test: all
	bash tests/run_tests.sh

# libFuzzer targets (clang): every tests/fuzz/fuzz_*.c, linked against the
# four layer libraries rebuilt with the fuzz instrumentation in
# $(BUILD)/fuzz/ (CPU only, without MPI: a fuzz target runs in one process).
# `make fuzz` builds them and runs each for FUZZ_SECONDS.
FUZZ_CC      ?= clang
FUZZ_SAN     := -fsanitize=address,undefined -fno-sanitize-recover=undefined
FUZZ_CFLAGS  := -std=c11 -D_GNU_SOURCE -g -O1 -pthread -fno-omit-frame-pointer $(FUZZ_SAN)
FUZZ_SECONDS ?= 5
FUZZ_TARGETS := $(patsubst tests/fuzz/%.c,$(BUILD)/fuzz/%,$(wildcard tests/fuzz/fuzz_*.c))
FUZZ_OBJS    := $(patsubst %.c,$(BUILD)/fuzz/obj/%.o,$(foreach l,$(LAYERS),$(wildcard $(l)/*.c)))
FUZZ_LIBS    := $(patsubst %,$(BUILD)/fuzz/lib%.a,runtime loader convert shardfmt)

$(FUZZ_OBJS): $(BUILD)/fuzz/obj/%.o: %.c $(HEADERS)
	@mkdir -p $(dir $@)
	$(FUZZ_CC) $(TP_INCLUDES) $(FUZZ_CFLAGS) -fsanitize=fuzzer-no-link -c $< -o $@
$(BUILD)/fuzz/libshardfmt.a: $(filter $(BUILD)/fuzz/obj/shardfmt/%,$(FUZZ_OBJS))
$(BUILD)/fuzz/libconvert.a:  $(filter $(BUILD)/fuzz/obj/convert/%,$(FUZZ_OBJS))
$(BUILD)/fuzz/libloader.a:   $(filter $(BUILD)/fuzz/obj/loader/%,$(FUZZ_OBJS))
$(BUILD)/fuzz/libruntime.a:  $(filter $(BUILD)/fuzz/obj/runtime/%,$(FUZZ_OBJS))
$(FUZZ_LIBS):
	rm -f $@ && ar rcs $@ $^
$(FUZZ_TARGETS): $(BUILD)/fuzz/%: tests/fuzz/%.c $(FUZZ_LIBS) $(HEADERS)
	$(FUZZ_CC) $(TP_INCLUDES) $(FUZZ_CFLAGS) -fsanitize=fuzzer $< -o $@ $(FUZZ_LIBS) $(TP_BASE_LIBS)
fuzz-build: $(FUZZ_TARGETS)
fuzz: $(FUZZ_TARGETS)
	BUILD=$(BUILD) bash tests/fuzz/run_fuzz.sh $(FUZZ_SECONDS)

bench-convert: all
	bash bench/bench_convert.sh
bench-cpu: all
	bash bench/bench_cpu.sh
# Opt-in: the qwen3-8b shape (writes ~32 GB: the model and one conversion at
# a time), tprun alone at tp 1 and 2; PRESET_8B=qwen3-0.6b tries it small.
bench-cpu-8b: all
	PRESET=$${PRESET_8B:-qwen3-8b} TPS="1 2" CODECS=none QUANT= LLAMA=0 ROUNDS=1 bash bench/bench_cpu.sh
bench-gpu: all
	bash bench/bench_gpu.sh
bench-comm: all
	bash bench/bench_comm.sh
bench-moe: all
	bash bench/bench_moe.sh
bench-serve: all
	bash bench/bench_serve.sh

# The flags the programs are built with, for scripts that build a program of
# their own against the libraries (bench/bench_comm.sh).
print-cflags:
	@echo $(TP_CPPFLAGS) $(CPPFLAGS) $(TP_CFLAGS) $(CFLAGS)
print-ldlibs:
	@echo $(TP_LDLIBS) $(LDLIBS)

clean:
	rm -rf $(BUILD) $(BIN)
