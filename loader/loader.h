/* loader.h - reading what tpconvert wrote: one rank's tensors into memory
 * (from a converted directory or a node bundle), checksum verification of a
 * whole directory, comparison against the source model, and node bundles
 * (tar, via libarchive).
 *
 * Same error convention as shardfmt.h: 0 / -1 and a tp_err.
 */
#ifndef TP_LOADER_H
#define TP_LOADER_H

#include "shardfmt.h"

#ifdef __cplusplus
extern "C" {
#endif

/* ------------------------------------------------------------ rank loading */

typedef struct tp_loaded_tensor {
    const tp_shard_tensor *info;  /* name, dtype, local/global shape, split */
    const uint8_t *data;          /* raw_size bytes: in place in the mapping, or owned */
} tp_loaded_tensor;

typedef struct tp_loaded_rank {
    tp_manifest manifest;
    int rank;
    char *source;                 /* the directory or bundle path, for messages */
    /* The rank file: mapped from a directory, or read out of a bundle. */
    tp_shard_reader reader;
    uint8_t *bundle_image;        /* owned file image when read from a tar */
    uint8_t *owned;               /* one allocation for all decompressed tensors */
    size_t n_tensors;
    tp_loaded_tensor *tensors;    /* same order as reader.index.tensors */
    /* Copied files (NULL when the conversion had none). NUL-terminated. */
    char *config_json;
    char *generation_config_json;
    char *tokenizer_json;
    size_t tokenizer_json_len;
    char *tokenizer_config_json;
    char *chat_template_jinja;    /* transformers 5's chat_template.jinja */
    /* Statistics for --verbose. */
    double load_seconds;
    uint64_t raw_bytes, stored_bytes;
    /* Opened with defer_tensors: every tensors[i].data is NULL and
     * tp_load_stream decodes from the rank file. */
    bool deferred;
    bool verify;                  /* the tp_load_opts it was opened with */
    int threads;
    bool quiet;
} tp_loaded_rank;

typedef struct tp_load_opts {
    /* Check every chunk and tensor checksum and the XXH3 of every copied
     * file read (config.json, tokenizer.json, ...) (default on).  Off,
     * nothing is hashed: a corrupted byte of a codec "none" tensor (or of a
     * zstd frame that still decodes, or of a copied file of the right size)
     * is not noticed.  Sizes are checked either way. */
    bool verify;
    int threads;        /* decompression threads, 0 = all cores */
    bool quiet;         /* no progress bar */
    /* Open only: the manifest, the rank file (mapped, or read out of a
     * bundle), its index and the copied files, with every refusal below;
     * no tensor is decoded or hashed and every tensors[i].data is NULL (codec
     * "none" too: nothing unverified is handed out).  tp_load_stream then
     * delivers the bytes, checked on the way.  For a consumer that copies
     * the weights elsewhere (the GPU) and would otherwise decode twice. */
    bool defer_tensors;
} tp_load_opts;

/* path is a converted directory or a node bundle (.tar).  Refuses a rank
 * that is not in the conversion, a safetensors-format export, a missing rank
 * file, a rank file from another conversion (conversion id), a size or
 * checksum that differs from the manifest, a copied file whose size or
 * XXH3 differs from the manifest's ("DIR: tokenizer.json: checksum
 * mismatch (file corrupted or replaced)").  Reads no other rank's data (a
 * bundle's other entries are skipped unread).  Codec "none" tensors point
 * into the mapping (directory) or the rank file image (bundle, read into
 * memory); compressed ones are decoded on opts->threads threads into one
 * allocation.  Every copied file the manifest lists must be present (the
 * rule tpverify applies too), and config.json must hold the manifest's
 * embedded config ("config.json differs from the config in manifest.json");
 * without a listed config.json the manifest's copy is used.  opts NULL: the
 * defaults (verify on, all cores, progress bar on a terminal). */
int tp_load_rank(tp_loaded_rank *lr, const char *path, int rank, const tp_load_opts *opts, tp_err *err);
/* Completes a rank opened with defer_tensors as tp_load_rank without it
 * would have (decoded, checked, with the options it was opened with); 0 and
 * nothing done when lr is not deferred.  On failure lr is freed.  For a
 * caller that has work to do between reading the copied files and touching
 * the weights (tprun parses the tokenizer first, so that its transient
 * memory is not added to the weights' in the peak RSS). */
int tp_loaded_rank_materialise(tp_loaded_rank *lr, tp_err *err);
const tp_loaded_tensor *tp_loaded_find(const tp_loaded_rank *lr, const char *name);
void tp_loaded_rank_free(tp_loaded_rank *lr);
/* Frees the tensors (decompressed memory, the rank file's mapping or image)
 * and keeps the manifest, the copied files and the statistics: for a caller
 * that has copied the weights it needs (the CPU model converts them to fp32). */
void tp_loaded_rank_drop_tensors(tp_loaded_rank *lr);

/* -------------------------------------------------------------- streaming */

/* Where tp_load_stream puts the decoded bytes.  All three callbacks run on
 * the thread that called tp_load_stream, never concurrently. */
typedef struct tp_stream_sink {
    /* A buffer of at least bytes bytes (bytes <= the max_piece this stream
     * reported, see tp_load_stream_max_piece), e.g. pinned memory; may block
     * until one is free.  The stream holds at most max_held acquired,
     * undelivered buffers at a time, so a sink with max_held buffers of its
     * own never waits on the stream.  NULL with err set stops the stream. */
    void *(*acquire)(void *arg, size_t bytes, tp_err *err);
    /* Bytes [offset, offset + bytes) of tensor (its index in lr->tensors),
     * decoded (and checked, see tp_stream_opts.verify) in buf.  The sink
     * owns buf from here until it recycles it.  Pieces come in file order,
     * each tensor's in order of offset, without gaps; a tensor of 0 bytes
     * gets none.  -1 with err set stops the stream. */
    int (*deliver)(void *arg, size_t tensor, uint64_t offset, void *buf, size_t bytes, tp_err *err);
    /* Takes back a buffer acquired but never delivered (the stream stopped
     * on an error).  May be NULL when the sink needs no such notice. */
    void (*release)(void *arg, void *buf);
    size_t max_held;          /* >= 1 */
} tp_stream_sink;

typedef struct tp_stream_opts {
    /* Check every chunk's XXH3 (stored bytes, on the decoding thread) and
     * every tensor's XXH3 (raw bytes, a streamed state over its pieces in
     * order) before the tensor's last piece is delivered.  A mismatch stops
     * the stream: "SOURCE: rank R: FILE: tensor T: chunk C checksum mismatch
     * (stored bytes corrupted)" or "...: tensor T: checksum of the decoded
     * bytes mismatch (data corrupted)".  (A tensor's earlier pieces are
     * delivered before its hash can be known: on an error the sink must
     * treat what it got as garbage.) */
    bool verify;
    int threads;              /* decoding threads, 0 = all cores */
    bool quiet;               /* no progress bar (it draws on a terminal only) */
    size_t piece_bytes;       /* target piece size, 0 = 4 MiB; a zstd piece is one chunk */
    const bool *select;       /* lr->n_tensors flags: stream only these; NULL = all */
} tp_stream_opts;

typedef struct tp_stream_stats {
    uint64_t bytes;           /* raw bytes delivered */
    uint64_t stored_bytes;    /* bytes read from the rank file (0 from memory) */
    size_t pieces;
    double seconds;           /* tp_load_stream's wall time, sink included */
} tp_stream_stats;

/* The largest piece tp_load_stream will ask the sink for with these opts
 * (max of piece_bytes and the largest chunk of a selected tensor). */
size_t tp_load_stream_max_piece(const tp_loaded_rank *lr, const tp_stream_opts *opts);

/* Walks the selected tensors of lr in file order and hands every decoded
 * piece to the sink.  Deferred tensors (defer_tensors) are read from the
 * rank file: codec "none" pieces are whole chunks copied out of the mapping,
 * zstd pieces one chunk each, decoded by opts->threads threads straight
 * into acquired buffers while earlier pieces are delivered (up to
 * sink->max_held at once).  Tensors already in memory (tp_load_rank
 * without defer_tensors, or a rank built by hand) are copied from there in
 * piece_bytes pieces, unhashed (tp_load_rank checked them).  On the first
 * error (a checksum, a decode, the sink's own) the stream waits for the
 * pieces in flight, hands their buffers back through release and returns -1
 * with that error.  opts NULL: lr's own verify / threads / quiet, all
 * tensors.  stats may be NULL. */
int tp_load_stream(const tp_loaded_rank *lr, const tp_stream_sink *sink, void *arg,
                   const tp_stream_opts *opts, tp_stream_stats *stats, tp_err *err);

/* Reads only the manifest (directory or bundle): tprun learns the world size. */
int tp_load_manifest(const char *path, tp_manifest *m, tp_err *err);

/* -------------------------------------------------------------- verification */

typedef struct tp_verify_report {
    size_t ranks, tensors, chunks;
    uint64_t bytes;
    size_t compared_tensors;     /* with --against */
} tp_verify_report;

/* Every checksum of every rank file listed in dir's manifest, and the
 * manifest's consistency (sizes, index checksums, conversion id, tensor
 * counts and bytes per rank, the same tensors on every rank, the copied
 * files present with the manifest's size and XXH3).  For the safetensors export: each file's XXH3 and
 * structure.  Memory: one decoded tensor at a time. */
int tp_verify_dir(const char *dir, int threads, bool quiet, tp_verify_report *rep, tp_err *err);
/* Everything tp_verify_dir checks (each tensor is decoded with its
 * checksums), plus: every rank's local tensor is compared bit for bit with
 * the region of the source model's tensor its split names (slice by slice,
 * without building full tensors); replicated tensors must equal the source
 * on every rank, ranks that share a range (kv heads) must each equal it,
 * and every index of the split dimension must be held by some rank.
 * Tensors of the source that the conversion dropped, or extra ones, are
 * errors.  Messages name the rank, the tensor and the first differing
 * element.  The safetensors export's splits come from its __metadata__
 * "tp_splits". */
int tp_verify_against(const char *dir, const char *model_dir, int threads, bool quiet,
                      tp_verify_report *rep, tp_err *err);

/* ------------------------------------------------------------------ bundles */

/* Packs dir into ceil(tp / ranks_per_node) tars "node-NNNNN-of-MMMMM.tar" in
 * out_dir (created if missing; NULL: "."), each with the manifest (first),
 * the copied files and its ranks' files (ranks [n*K, min((n+1)*K, tp))).
 * Crash-safe (tmp + fsync + rename).  out_paths / n_out may be NULL; else
 * *out_paths is a malloc'd array of malloc'd paths. */
int tp_bundle_pack(const char *dir, int ranks_per_node, const char *out_dir, bool quiet,
                   char ***out_paths, size_t *n_out, tp_err *err);
/* Extracts into dest_dir (created; must be empty).  Refuses absolute paths,
 * "..", any '/', links, devices, directories, duplicate or unexpected names,
 * a manifest that is not the first entry, rank entries whose size differs
 * from the manifest's, copied files over 64 MiB or whose size or XXH3
 * differs from the manifest's.  Files are extracted to
 * temporary names and renamed at the end; on any error everything
 * extracted is removed (and dest_dir, if this call created it). */
int tp_bundle_unpack(const char *tar_path, const char *dest_dir, tp_err *err);
/* Checks the bundle's manifest, its entries (as unpack would), the size and
 * XXH3 of its copied files and every checksum of the rank files it holds (each read into memory in turn).
 * *n_ranks (may be NULL) gets the number of rank files. */
int tp_bundle_verify(const char *tar_path, size_t *n_ranks, tp_err *err);

#ifdef __cplusplus
}
#endif
#endif
