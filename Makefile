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
CFLAGS  ?= -O2 -g
CFLAGS  += -std=c11 -D_GNU_SOURCE -Wall -Wextra -Wno-unused-parameter -pthread -fPIC
CPPFLAGS += -Ishardfmt -Iconvert -Iloader -Iruntime -I/usr/include/cjson
LDLIBS  += -lzstd -lcjson -larchive -lxxhash -lpcre2-8 -lutf8proc -lopenblas -lm -pthread

BUILD := build
BIN   := bin

# MPI (Open MPI from Debian) for the CPU multi-rank backend; optional.
MPI_CFLAGS := $(shell mpicc --showme:compile 2>/dev/null)
MPI_LIBS   := $(shell mpicc --showme:link 2>/dev/null)
ifneq ($(MPI_LIBS),)
  CPPFLAGS += -DTP_HAVE_MPI $(MPI_CFLAGS)
  LDLIBS   += $(MPI_LIBS)
endif

# CUDA + NCCL when nvcc is found (CPU-only build otherwise).
CUDA_HOME ?= /usr/local/cuda
NVCC := $(shell command -v nvcc 2>/dev/null || ( test -x $(CUDA_HOME)/bin/nvcc && echo $(CUDA_HOME)/bin/nvcc ))
ifeq ($(NOCUDA),1)
  NVCC :=
endif
CU_SRC :=
ifneq ($(NVCC),)
  CU_SRC    := $(wildcard runtime/cuda/*.cu)
  NVCCFLAGS ?= -O2 -std=c++17 -gencode arch=compute_80,code=sm_80 -gencode arch=compute_90,code=sm_90 \
               -Xcompiler -fPIC -Ishardfmt -Iconvert -Iloader -Iruntime
  CPPFLAGS  += -DTP_HAVE_CUDA -I$(CUDA_HOME)/include
  LDLIBS    += -L$(CUDA_HOME)/lib64 -Wl,-rpath,$(CUDA_HOME)/lib64 -lcublasLt -lcublas -lnccl -lcudart -lstdc++
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

.PHONY: all test check clean demo fuzz deps bench-convert bench-cpu bench-cpu-8b bench-gpu bench-comm print-cflags print-ldlibs
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
deps:
	bash tools/install-deps.sh

$(BUILD)/%.o: %.c $(HEADERS)
	@mkdir -p $(dir $@)
	$(CC) $(CPPFLAGS) $(CFLAGS) -c $< -o $@

$(BUILD)/%.o: %.cu $(HEADERS)
	@mkdir -p $(dir $@)
	$(NVCC) $(NVCCFLAGS) -DTP_HAVE_CUDA -c $< -o $@

$(BUILD)/libshardfmt.a: $(SHARDFMT_OBJS)
$(BUILD)/libconvert.a:  $(CONVERT_OBJS)
$(BUILD)/libloader.a:   $(LOADER_OBJS)
$(BUILD)/libruntime.a:  $(RUNTIME_OBJS)
$(BUILD)/lib%.a:
	@mkdir -p $(BUILD)
	rm -f $@ && ar rcs $@ $^

$(BIN)/%: tools/%.c $(LIBS) $(HEADERS)
	@mkdir -p $(BIN)
	$(CC) $(CPPFLAGS) $(CFLAGS) $< -o $@ $(LIBS) $(LDLIBS)

$(BUILD)/tests/%: tests/%.c $(LIBS) $(HEADERS)
	@mkdir -p $(BUILD)/tests
	$(CC) $(CPPFLAGS) $(CFLAGS) $< -o $@ $(LIBS) $(LDLIBS)

test: all
	bash tests/run_tests.sh

# libFuzzer targets (clang); `make fuzz` runs each for FUZZ_SECONDS.
FUZZ_SECONDS ?= 5
FUZZ_TARGETS := $(patsubst tests/fuzz/%.c,$(BUILD)/fuzz/%,$(wildcard tests/fuzz/fuzz_*.c))
FUZZ_SRC := $(wildcard shardfmt/*.c)
$(BUILD)/fuzz/%: tests/fuzz/%.c $(FUZZ_SRC) $(HEADERS)
	@mkdir -p $(BUILD)/fuzz
	clang -std=c11 -D_GNU_SOURCE -g -O1 -fsanitize=fuzzer,address,undefined $(CPPFLAGS) $< $(FUZZ_SRC) -o $@ \
	  -lzstd -lcjson -lxxhash -lm -pthread
fuzz: $(FUZZ_TARGETS)
	bash tests/fuzz/run_fuzz.sh $(FUZZ_SECONDS)

bench-convert: all
	bash bench/bench_convert.sh
bench-cpu: all
	bash bench/bench_cpu.sh
# Opt-in: the qwen3-8b shape (writes ~32 GB: the model and one conversion at
# a time), tprun alone at tp 1 and 2; PRESET_8B=qwen3-0.6b tries it small.
bench-cpu-8b: all
	PRESET=$${PRESET_8B:-qwen3-8b} TPS="1 2" CODECS=none LLAMA=0 ROUNDS=1 bash bench/bench_cpu.sh
bench-gpu: all
	bash bench/bench_gpu.sh
bench-comm: all
	bash bench/bench_comm.sh

# The flags the programs are built with, for scripts that build a program of
# their own against the libraries (bench/bench_comm.sh).
print-cflags:
	@echo $(CPPFLAGS) $(CFLAGS)
print-ldlibs:
	@echo $(LDLIBS)

clean:
	rm -rf $(BUILD) $(BIN)
