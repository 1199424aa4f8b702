/* shardfmt.h - the on-disk formats of tpshard, and the small I/O toolbox
 * every layer above shares.
 *
 * This is the bottom layer.  It knows three formats:
 *   - safetensors (read, defensively, and written for --format safetensors),
 *   - the tpshard rank file (FORMAT.md beside this header is its spec),
 *   - the manifest.json of a converted directory.
 * plus the chunk codecs (a table: none, zstd over byte planes, exponent planes
 * + Huffman; XXH3 checksums), a thread
 * pool, a progress bar and the error convention used everywhere.
 *
 * Error convention: functions that can fail return 0 on success and -1 on
 * failure, and fill a tp_err with a one-line message that names the file,
 * the tensor or the flag.  Libraries never print.
 */
#ifndef TP_SHARDFMT_H
#define TP_SHARDFMT_H

#include <stddef.h>
#include <stdint.h>
#include <stdbool.h>
#include <stdio.h>
#include <sys/stat.h>

#ifdef __cplusplus
extern "C" {
#endif

/* ------------------------------------------------------------------ errors */

typedef struct tp_err {
    char msg[1024];
} tp_err;

/* Formats msg into err (if err is not NULL) and returns -1, so that error
 * paths read `return tp_errorf(err, "%s: ...", path);`.  Control characters
 * (from quoted input) become '?', so the message is always one line; the
 * same holds for tp_err_prefix. */
int tp_errorf_(tp_err *err, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));
/* A macro around tp_errorf_ so that the compiler sees the -1: an output that
 * a failing path leaves unset then draws no maybe-uninitialized warning.
 * The one spelling of an error everywhere. */
static inline int tp_err_minus1_(int ignored) { (void)ignored; return -1; }
#define tp_errorf(...) tp_err_minus1_(tp_errorf_(__VA_ARGS__))

/* Prefixes an existing message: "<prefix>: <old message>".  Returns -1. */
int tp_err_prefix(tp_err *err, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));

/* ------------------------------------------------------------------ dtypes */

typedef enum tp_dtype {
    TP_DTYPE_INVALID = 0,
    TP_BF16,
    TP_F16,
    TP_F32,
    TP_F8_E4M3,     /* OCP e4m3 "fn": no infinities, 0x7f/0xff NaN, max 448 */
    TP_I8,          /* two's complement */
} tp_dtype;
/* The 8-bit dtypes are weights quantized with a scale; how a weight and its
 * scale tensor go together is in FORMAT.md ("Quantized weights"). */

/* "BF16", "F16", "F32", "F8_E4M3", "I8" as safetensors spells them. */
const char *tp_dtype_name(tp_dtype dt);
/* TP_DTYPE_INVALID for anything we do not support. */
tp_dtype tp_dtype_from_name(const char *name);
size_t tp_dtype_size(tp_dtype dt);

/* Conversions used by the loader, the runtime and tests. */
float tp_bf16_to_f32(uint16_t h);
uint16_t tp_f32_to_bf16(float f); /* round to nearest even, NaN kept NaN */
float tp_f16_to_f32(uint16_t h);
/* e4m3fn, exactly (every e4m3 value is an fp32 value); NaN stays NaN. */
float tp_f8e4m3_to_f32(uint8_t b);
/* Round to nearest, ties to even; saturates to +-448 (as a quantizer that
 * scales by amax / 448 wants: never NaN from a finite input); NaN -> 0x7f
 * with the sign kept. */
uint8_t tp_f32_to_f8e4m3(float f);

#define TP_MAX_DIMS 8

/* Overflow-checked helpers: return false on overflow. */
bool tp_mul_size(size_t a, size_t b, size_t *out);
bool tp_add_size(size_t a, size_t b, size_t *out);
/* product(shape) * dtype size, overflow-checked. */
bool tp_tensor_nbytes(tp_dtype dt, const uint64_t *shape, int ndim, size_t *out);

/* ------------------------------------------------------------------ files */

/* A read-only memory mapping of a whole file. */
typedef struct tp_mmap {
    const uint8_t *data;
    size_t size;
    char *path; /* owned copy, for messages */
} tp_mmap;

int tp_mmap_open(tp_mmap *m, const char *path, tp_err *err);
void tp_mmap_close(tp_mmap *m);

/* write(2)/pwrite(2) loops that report ENOSPC and friends with the path. */
int tp_write_all(int fd, const void *buf, size_t len, const char *path, tp_err *err);
int tp_pwrite_all(int fd, const void *buf, size_t len, uint64_t off, const char *path, tp_err *err);
/* Reads a whole (small) file into a NUL-terminated malloc'd buffer. */
int tp_read_file(const char *path, size_t max_size, char **out, size_t *out_len, tp_err *err);
/* The one reader of a file that may be zstd-compressed (a tokenizer.json.zst):
 * a path ending in ".zst" is read and its zstd frames decoded (streaming, so
 * a frame need not record its size; concatenated frames are joined), any
 * other path is read as tp_read_file reads it.  max_size bounds both the
 * file and the DECODED bytes ("PATH: decompresses to more than N bytes");
 * a corrupt or truncated frame is "PATH: zstd: <reason>".  *out is
 * NUL-terminated and malloc'd, as tp_read_file's.  (codec.c) */
int tp_read_file_zst(const char *path, size_t max_size, char **out, size_t *out_len, tp_err *err);
/* Writes a whole small file crash-safely: tmp name, fsync, rename, fsync dir. */
int tp_write_file_atomic(const char *path, const void *buf, size_t len, tp_err *err);
int tp_fsync_dir(const char *dir, tp_err *err);
/* Opens an input file for reading without ever blocking, and only if it is
 * a regular file: opens with O_NONBLOCK (so a FIFO does not wait for a
 * writer), fstats, refuses anything else with "PATH: not a regular file
 * (fifo)" (or directory, device, socket), then clears O_NONBLOCK.  extra is
 * OR-ed into O_RDONLY | O_CLOEXEC (e.g. O_NOFOLLOW).  *st (may be NULL) gets
 * the fstat.  Returns the descriptor, or -1 with err filled.  Every open of
 * an input goes through here (tp_mmap_open, tp_read_file, bundles). */
int tp_open_regular(const char *path, int extra, struct stat *st, tp_err *err);
/* The one crash-safe commit of a written file: fsync(fd), close(fd) (always
 * closed, success or not), rename tmp_path to final_path, fsync final_path's
 * directory.  On any failure tmp_path is removed (and final_path too when the
 * failure came after the rename), so nothing half-written stays behind. */
int tp_file_commit(int fd, const char *tmp_path, const char *final_path, tp_err *err);
/* The one rule for a file name taken from untrusted input (manifest entries,
 * a safetensors index, tar entries): 1 to 255 bytes of printable ASCII, no
 * '/' or '\\', and no leading '.' (so never "." or "..", and never a hidden
 * name such as tpconvert's temporary directories). */
bool tp_safe_file_name(const char *name);
/* Checks that dir/name, a file read from a model directory, stays inside it:
 * when it is a symlink (or lies under one), its target must resolve inside
 * dir, or, when dir is a Hugging Face hub cache snapshot
 * (".../models--X/snapshots/REV"), inside that repository's ".../blobs".
 * Otherwise: "DIR/NAME: symlink to TARGET, outside the model directory".
 * A missing file passes (the caller's open reports it). */
int tp_model_file_check(const char *dir, const char *name, tp_err *err);
/* Runs fn(arg), which reads a file mapping, under a per-thread SIGBUS guard:
 * when the file behind the mapping shrinks (truncated by someone else while
 * mapped) the access raises SIGBUS, and instead of the process dying this
 * returns -1 (fn is abandoned midway: it must not hold locks or allocations
 * of its own).  Returns 0 when fn ran to the end.  A SIGBUS outside any guard
 * keeps its default action (the process dies), so the process-wide handler,
 * installed on first use, changes nothing else. */
int tp_sigbus_guard(void (*fn)(void *arg), void *arg);
/* Joins dir and name into a malloc'd path. */
char *tp_path_join(const char *dir, const char *name);
/* The directory part of path ("." when there is none), malloc'd. */
char *tp_path_dir(const char *path);

/* --------------------------------------------------------------- checksums */

/* XXH3-64 (libxxhash).  The hex form is 16 lowercase digits. */
uint64_t tp_xxh3(const void *data, size_t len);

/* The one hex encoding of the formats: lowercase, most significant first.
 * tp_hex64 writes v as 16 digits and a NUL; tp_hex_bytes writes the n bytes
 * as 2n digits (byte order kept) and a NUL, out holding 2n + 1. */
void tp_hex64(uint64_t v, char out[17]);
void tp_hex_bytes(const uint8_t *bytes, size_t n, char *out);
/* Exactly 16 hex digits (either case) then the end of s: 0 and *out set,
 * else -1 and *out untouched. */
int tp_parse_hex64(const char *s, uint64_t *out);
/* Whether s[0..n) are all lowercase hex digits, as tp_hex64 and
 * tp_hex_bytes write them (a NUL before n is not a digit: false). */
bool tp_is_lower_hex(const char *s, size_t n);

/* -------------------------------------------------------------------- rng */

/* xoshiro256** (Blackman & Vigna): the one random generator of the project,
 * behind tprun's sampling and tpsynth's weights.  The sequence a seed gives
 * is part of what both promise (the same seed samples the same tokens and
 * writes the same bytes, release after release): never change it. */
typedef struct tp_rng { uint64_t s[4]; } tp_rng;
/* splitmix64 spreads any seed, 0 included, over the 256-bit state. */
void tp_rng_seed(tp_rng *r, uint64_t seed);
/* The next 64 random bits. */
uint64_t tp_rng_next(tp_rng *r);
/* Uniform in [0, 1): the top 53 bits of tp_rng_next. */
double tp_rng_uniform(tp_rng *r);

/* ------------------------------------------------------------- thread pool */

/* A fixed pool of worker threads running jobs from a FIFO queue.
 * tp_pool_wait() blocks until every submitted job has finished. */
typedef struct tp_pool tp_pool;
typedef void (*tp_job_fn)(void *arg);

/* nthreads <= 0 means one per online core. */
tp_pool *tp_pool_create(int nthreads);
int tp_pool_threads(const tp_pool *pool);
void tp_pool_submit(tp_pool *pool, tp_job_fn fn, void *arg);
void tp_pool_wait(tp_pool *pool);
void tp_pool_destroy(tp_pool *pool);
/* Runs fn(i, arg) for i in [0, n) across the pool and waits. */
void tp_pool_parallel_for(tp_pool *pool, size_t n, void (*fn)(size_t i, void *arg), void *arg);

/* ---------------------------------------------------------------- progress */

/* A one-line progress bar on stderr: bytes done, MB/s, ETA.  Draws only when
 * stderr is a terminal and quiet is false; redraws at most 10 times a second.
 * Thread-safe: workers call tp_progress_add(). */
typedef struct tp_progress tp_progress;
tp_progress *tp_progress_start(const char *label, uint64_t total_bytes, bool quiet);
void tp_progress_add(tp_progress *p, uint64_t bytes);
/* Clears the line and frees.  Safe with NULL. */
void tp_progress_finish(tp_progress *p);
/* Monotonic seconds. */
double tp_now(void);

/* ------------------------------------------------------------- safetensors */

typedef struct tp_st_tensor {
    char *name;
    tp_dtype dtype;
    int ndim;
    uint64_t shape[TP_MAX_DIMS];
    uint64_t begin, end;    /* data_offsets, relative to the data section */
    const uint8_t *data;    /* points into the mapping */
    size_t nbytes;
} tp_st_tensor;

typedef struct tp_st_file {
    tp_mmap map;
    uint64_t header_len;
    size_t n_tensors;
    tp_st_tensor *tensors;   /* sorted by name */
    /* __metadata__ as parallel key/value arrays sorted by key (strings
     * only, per spec). */
    size_t n_meta;
    char **meta_keys, **meta_values;
} tp_st_file;

/* Largest header accepted (the reference implementation uses 100 MB). */
#define TP_ST_MAX_HEADER (100u * 1000u * 1000u)

/* Opens and validates a safetensors file: header length bound, JSON, dtypes,
 * shapes, byte length = product(shape) * dtype size, offsets inside the file,
 * sorted and non-overlapping and covering the data section, no duplicate
 * names.  Errors name the file and the tensor. */
int tp_st_open(tp_st_file *f, const char *path, tp_err *err);
/* Parses a header from memory (the fuzz target's entry): buf is the whole
 * file image.  The result's map is not owned (map.data = buf). */
int tp_st_parse(tp_st_file *f, const uint8_t *buf, size_t len, const char *name, tp_err *err);
void tp_st_close(tp_st_file *f);
const tp_st_tensor *tp_st_find(const tp_st_file *f, const char *name);

/* A model directory's weights: one file, or several via
 * model.safetensors.index.json.  Each tensor name is found in exactly one
 * file; the index must not point at missing files or tensors. */
typedef struct tp_st_set {
    size_t n_files;
    tp_st_file *files;
    char **file_names;
    /* every tensor of every file, sorted by name, pointing into files[] */
    size_t n_tensors;
    const tp_st_tensor **tensors;
} tp_st_set;

int tp_st_set_open(tp_st_set *s, const char *model_dir, tp_err *err);
void tp_st_set_close(tp_st_set *s);
const tp_st_tensor *tp_st_set_find(const tp_st_set *s, const char *name);

/* Writes a safetensors file (crash-safe: tmp + fsync + rename).  Tensor data
 * is produced by a callback so that the writer streams: fill(i, dst, arg)
 * must write exactly tensors[i].nbytes bytes into dst. */
typedef struct tp_st_out_tensor {
    const char *name;
    tp_dtype dtype;
    int ndim;
    uint64_t shape[TP_MAX_DIMS];
} tp_st_out_tensor;

typedef int (*tp_st_fill_fn)(size_t i, uint8_t *dst, size_t nbytes, void *arg, tp_err *err);
int tp_st_write(const char *path, const tp_st_out_tensor *tensors, size_t n,
                const char *const *meta_kv /* key,value,...,NULL */,
                tp_st_fill_fn fill, void *arg, tp_err *err);

/* ------------------------------------------------------------------- codec */

typedef enum tp_codec {
    TP_CODEC_NONE = 0,
    TP_CODEC_ZSTD = 1,   /* zstd; 16-bit dtypes are split into byte planes first */
    TP_CODEC_EXPHUF = 2, /* exponent planes + canonical Huffman (FORMAT.md 2) */
} tp_codec;
#define TP_CODEC_COUNT 3

/* One row of the codec table (codec.c; a codec's code is in codec_NAME.c).
 * The index and the manifest record a codec by name; id is its in-memory
 * tag.  Every codec serves every dtype (dtypes says how). */
typedef struct tp_codec_info {
    tp_codec id;
    const char *name;        /* as stored in the index and the manifest */
    int min_level, max_level, default_level; /* all 0: the codec has no levels */
    const char *dtypes;      /* one line: what it does to which dtypes */
} tp_codec_info;

/* The codec tpconvert uses unless told otherwise (chosen by measurement:
 * FORMAT.md 2, bench/bench_convert.sh). */
#define TP_CODEC_DEFAULT TP_CODEC_EXPHUF

/* The row of c, NULL for an unknown id. */
const tp_codec_info *tp_codec_get(tp_codec c);
/* "none", "zstd", "exphuf"; "?" for an unknown id. */
const char *tp_codec_name(tp_codec c);
/* 0 and *out set for a known name (exact, case-sensitive), -1 otherwise. */
int tp_codec_from_name(const char *name, tp_codec *out);
/* "none|zstd|exphuf": the names in table order, for help and messages. */
const char *tp_codec_names(void);
/* Whether level is valid for c: inside [min_level, max_level] for a codec
 * with levels; a codec without levels ignores the level (any is accepted). */
bool tp_codec_level_ok(tp_codec c, int level);

#define TP_DEFAULT_CHUNK (1u << 20)  /* raw bytes per chunk */
#define TP_ALIGN 4096u

/* Encodes one chunk of raw_len bytes of dtype (a whole number of elements;
 * the dtype picks byte or exponent planes).  dst must hold
 * tp_codec_bound(c, raw_len) bytes; *stored_len gets the encoded size.
 * For TP_CODEC_NONE the stored bytes equal the raw bytes.  Deterministic:
 * the same input, codec and level give the same bytes. */
size_t tp_codec_bound(tp_codec c, size_t raw_len);
int tp_codec_encode(tp_codec c, int level, tp_dtype dtype,
                    const uint8_t *raw, size_t raw_len,
                    uint8_t *dst, size_t dst_cap, size_t *stored_len, tp_err *err);
/* Decodes into dst, which must be exactly raw_len bytes.  scratch: NULL (the
 * codec then uses a per-thread buffer of its own) or raw_len bytes.  Stored
 * bytes are untrusted: anything that does not decode to exactly raw_len
 * bytes fails with "codec NAME: <reason>", never reading outside stored or
 * writing outside dst. */
int tp_codec_decode(tp_codec c, tp_dtype dtype,
                    const uint8_t *stored, size_t stored_len,
                    uint8_t *dst, size_t raw_len, uint8_t *scratch, tp_err *err);

/* Exponent planes (codec exphuf), exposed for tests and tpcodecbench: each
 * element is cut into tp_expplanes_count(dt) byte planes of n_elems bytes,
 * one after the other in dst (count x n_elems bytes: F16 has 3 planes, so
 * 1.5 x its raw size); the first holds the exponent (FORMAT.md 2 lists
 * which bits go where).  join inverts split. */
int tp_expplanes_count(tp_dtype dt);
void tp_expplanes_split(tp_dtype dt, const uint8_t *src, size_t n_elems, uint8_t *dst);
void tp_expplanes_join(tp_dtype dt, const uint8_t *src, size_t n_elems, uint8_t *dst);

/* Byte planes, exposed for tests: planes = all low bytes then all high bytes. */
void tp_byteplanes_split(const uint8_t *src, size_t n_elems, uint8_t *dst);
void tp_byteplanes_join(const uint8_t *src, size_t n_elems, uint8_t *dst);

/* -------------------------------------------------------- tpshard rank file */

/* How a tensor of a rank relates to the full (global) tensor.  A rank holds
 * along split_dim the concatenation of n_ranges global ranges (packed tensors
 * such as a fused gate_up have two; everything else one).  split_dim -1 means
 * the rank holds the whole tensor (replicated). */
#define TP_MAX_RANGES 4
typedef struct tp_split {
    int dim;                        /* -1: replicated */
    int n_ranges;
    uint64_t start[TP_MAX_RANGES];
    uint64_t end[TP_MAX_RANGES];    /* exclusive */
} tp_split;

typedef struct tp_chunk_info {
    uint64_t offset;       /* absolute file offset of the stored bytes */
    uint64_t stored_size;
    uint64_t raw_size;
    uint64_t xxh3;         /* of the stored bytes */
} tp_chunk_info;

typedef struct tp_shard_tensor {
    char *name;
    tp_dtype dtype;
    int ndim;
    uint64_t shape[TP_MAX_DIMS];         /* local */
    uint64_t global_shape[TP_MAX_DIMS];
    tp_split split;
    char *style;            /* the plan style it was cut with, e.g. "colwise" */
    bool reduce_bias;       /* bias of a rowwise layer: add once, after the all-reduce */
    tp_codec codec;
    uint64_t offset;        /* absolute file offset, TP_ALIGN-aligned */
    uint64_t stored_size;   /* sum of chunk stored sizes */
    uint64_t raw_size;      /* product(shape) * dtype size */
    uint64_t xxh3;          /* of the raw bytes */
    size_t n_chunks;
    tp_chunk_info *chunks;
} tp_shard_tensor;

typedef struct tp_shard_index {
    char conversion_id[33];
    int rank, tp;
    uint64_t file_size;
    uint64_t index_xxh3;    /* recorded in the manifest as the rank's checksum */
    size_t n_tensors;
    tp_shard_tensor *tensors;
} tp_shard_index;

void tp_shard_index_free(tp_shard_index *ix);
const tp_shard_tensor *tp_shard_find(const tp_shard_index *ix, const char *name);

/* Reading: opens the file by mmap, validates the header and the index
 * (offsets inside the file, aligned, non-overlapping, sizes consistent,
 * index checksum).  Data checksums are checked by tp_shard_read_tensor. */
typedef struct tp_shard_reader {
    tp_mmap map;
    tp_shard_index index;
} tp_shard_reader;

int tp_shard_open(tp_shard_reader *r, const char *path, tp_err *err);
/* Parses from memory (the fuzz target's entry). buf is the whole file image. */
int tp_shard_parse(tp_shard_index *ix, const uint8_t *buf, size_t len, const char *name, tp_err *err);
void tp_shard_close(tp_shard_reader *r);

/* Decodes chunk ci of tensor t into dst + (sum of earlier raw sizes),
 * verifying the chunk checksum when verify is set.  Independent per chunk, so
 * callers spread chunks over a pool. */
int tp_shard_read_chunk(const tp_shard_reader *r, const tp_shard_tensor *t, size_t ci,
                        uint8_t *dst_tensor, bool verify, tp_err *err);
/* The same, into dst exactly (c->raw_size bytes): for a caller that decodes
 * a chunk into a buffer of its own (the loader's streaming path). */
int tp_shard_decode_chunk(const tp_shard_reader *r, const tp_shard_tensor *t, size_t ci, uint8_t *dst,
                          bool verify, tp_err *err);
/* Whole tensor, chunks on the pool (NULL pool: this thread), then the tensor
 * checksum.  dst must hold t->raw_size bytes. */
int tp_shard_read_tensor(const tp_shard_reader *r, const tp_shard_tensor *t, uint8_t *dst,
                         tp_pool *pool, bool verify, tp_err *err);
/* For TP_CODEC_NONE tensors: the bytes in place in the mapping (NULL otherwise). */
const uint8_t *tp_shard_tensor_inplace(const tp_shard_reader *r, const tp_shard_tensor *t);

/* Writing.  Tensors are appended one at a time; each starts on TP_ALIGN.
 * The writer works on "<path>.tmp" and tp_shard_writer_finish() writes the
 * index and header, fsyncs and renames to path.  tp_shard_writer_abort()
 * removes the temporary file.  finish() always frees the writer (on failure
 * it removes the temporary file itself); after a failed add() the writer
 * only accepts abort() or finish(), which then fails.  At most 2 x (pool
 * threads) chunks are in memory at a time.  add() waits for pool jobs, so
 * it must not itself run as a job of the same pool. */
typedef struct tp_shard_writer tp_shard_writer;

typedef struct tp_shard_tensor_desc {
    const char *name;
    tp_dtype dtype;
    int ndim;
    uint64_t shape[TP_MAX_DIMS];
    uint64_t global_shape[TP_MAX_DIMS];
    tp_split split;
    const char *style;
    bool reduce_bias;
} tp_shard_tensor_desc;

/* Produces raw bytes [raw_off, raw_off+len) of the tensor being written. */
typedef int (*tp_shard_fill_fn)(void *arg, uint64_t raw_off, uint8_t *dst, size_t len, tp_err *err);

typedef struct tp_shard_writer_opts {
    tp_codec codec;
    int level;              /* zstd level */
    size_t chunk_size;      /* raw bytes per chunk, 0 = TP_DEFAULT_CHUNK */
    tp_pool *pool;          /* chunks are filled and encoded here (may be NULL) */
    tp_progress *progress;  /* raw bytes added as they are written (may be NULL) */
} tp_shard_writer_opts;

int tp_shard_writer_open(tp_shard_writer **w, const char *path, const char *conversion_id,
                         int rank, int tp, const tp_shard_writer_opts *opts, tp_err *err);
/* fill is called from pool threads, concurrently, for disjoint ranges. */
int tp_shard_writer_add(tp_shard_writer *w, const tp_shard_tensor_desc *desc,
                        tp_shard_fill_fn fill, void *arg, tp_err *err);
/* On success *index_xxh3 and *file_size (may be NULL) describe the file. */
int tp_shard_writer_finish(tp_shard_writer *w, uint64_t *index_xxh3, uint64_t *file_size,
                           uint64_t *raw_bytes, uint64_t *stored_bytes, tp_err *err);
void tp_shard_writer_abort(tp_shard_writer *w);

/* ---------------------------------------------------------------- manifest */

/* The most ranks a conversion may have: the manifest, every rank file's
 * index (FORMAT.md), the shard writer and tpconvert --tp all hold tp to
 * [1, TP_MAX_TP], so a tp that one accepts the others accept too. */
#define TP_MAX_TP 4096

/* The rank file's format version (header and index, FORMAT.md 1). */
#define TP_FORMAT_VERSION 1
/* manifest.json's format version (FORMAT.md 3).  2 added "manifest_xxh3";
 * a manifest of an older version is refused as "made by an older tpconvert:
 * convert again". */
#define TP_MANIFEST_VERSION 2
#define TP_MANIFEST_NAME "manifest.json"
/* The largest file tpconvert copies from the model directory (config.json,
 * tokenizer.json, ...): a manifest that lists a larger one is refused by
 * the writer and by every reader, so what converts also packs, unpacks and
 * loads. */
#define TP_MAX_COPIED_FILE (64u << 20)

typedef struct tp_manifest_rank {
    int rank;
    char *file;             /* relative to the directory */
    uint64_t size;
    uint64_t checksum;      /* tpshard: index_xxh3; safetensors: XXH3 of the file */
    uint64_t raw_bytes, stored_bytes;
    size_t n_tensors;
} tp_manifest_rank;

/* A file copied from the model directory (config.json, tokenizer.json, ...),
 * pinned by size and XXH3-64 of its bytes like the rank files. */
typedef struct tp_manifest_file {
    char *name;             /* relative to the directory */
    uint64_t size;
    uint64_t xxh3;
} tp_manifest_file;

typedef struct tp_manifest {
    int format_version;
    char *format;           /* "tpshard" or "safetensors" */
    char conversion_id[33];
    int tp;
    char *model_type;
    bool vocab_parallel;
    /* --expert-parallel: each rank holds num_experts / tp whole experts (a
     * per-expert tensor only in its owner's file, fused ones cut along the
     * expert dim); false: every rank holds a slice of every expert.  Absent
     * in older manifests: false. */
    bool expert_parallel;
    char *codec;            /* a tp_codec_name: "none", "zstd", "exphuf" */
    int level;
    char *config_json;      /* the source config.json, as text */
    char *plan_json;        /* the plan used: {"pattern": "style", ...} */
    /* copied files present in the directory, e.g. "tokenizer.json"; may be 0 */
    size_t n_files;
    tp_manifest_file *files;
    tp_manifest_rank *ranks; /* tp entries, ranks[i].rank == i */
} tp_manifest;

/* Writes dir/manifest.json (m->format_version is ignored: the file gets
 * TP_MANIFEST_VERSION) and its self-checksum.  The text is parsed back
 * before anything is written, so what this writes always reads back; a
 * config_json that is not one JSON object is refused naming config.json. */
int tp_manifest_write(const char *dir, const tp_manifest *m, tp_err *err);
/* Parses dir/manifest.json defensively (every field checked, and the
 * self-checksum: one flipped bit anywhere, the embedded config included,
 * is refused as "checksum mismatch"). */
int tp_manifest_read(const char *dir, tp_manifest *m, tp_err *err);
int tp_manifest_parse(const char *json, size_t len, const char *name, tp_manifest *m, tp_err *err);
/* The self-checksum: a manifest's last member is "manifest_xxh3", the
 * XXH3-64 of every byte of the file before that member's value.  Writes that
 * value into text (len bytes that end with the member, 16 hex digits of any
 * value in place).  For the writer, and for a test or fuzz target that
 * edits a manifest and wants the edit judged by the checks behind the
 * checksum.  -1 when text does not end with the member. */
int tp_manifest_seal(char *text, size_t len);
/* The embedded config (m->config_json) against the copied config.json's
 * bytes: the same JSON value, member for member, so that whichever copy a
 * reader takes, the model is the same.  src names the directory or bundle:
 * "SRC: config.json differs from the config in manifest.json". */
int tp_manifest_check_config_copy(const tp_manifest *m, const char *text, size_t len, const char *src,
                                  tp_err *err);
void tp_manifest_free(tp_manifest *m);
/* A fresh random 128-bit id as 32 hex digits. */
void tp_new_conversion_id(char out[33]);
/* "rank-00001-of-00004.tpshard" / ".safetensors" */
void tp_rank_file_name(char *out, size_t cap, int rank, int tp, const char *ext);

#ifdef __cplusplus
}
#endif
#endif
