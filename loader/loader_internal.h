/* loader_internal.h - helpers shared by the loader's files (not public). */
#ifndef TP_LOADER_INTERNAL_H
#define TP_LOADER_INTERNAL_H

#include "loader.h"

#include <pthread.h>

struct archive;
struct archive_entry;

/* Largest manifest or copied file we read into memory: the copied files'
 * limit is shardfmt's, the one the converter and the manifest apply too. */
#define TP_SMALL_FILE_CAP TP_MAX_COPIED_FILE

/* ------------------------------------------------------- first error of many */

/* Collects the first error reported by parallel jobs. */
typedef struct tp_ld_err_once {
    pthread_mutex_t mu;
    bool failed;
    tp_err err;
} tp_ld_err_once;

void tp_ld_err_once_init(tp_ld_err_once *e);
void tp_ld_err_once_set(tp_ld_err_once *e, const tp_err *err);
bool tp_ld_err_once_failed(tp_ld_err_once *e);
/* Copies the stored error into err and returns -1 when one was set, else 0. */
int tp_ld_err_once_take(tp_ld_err_once *e, tp_err *err);
void tp_ld_err_once_destroy(tp_ld_err_once *e);

/* --------------------------------------------------------------- manifests */

/* What a name in a conversion is: the manifest, a copied file, or a rank. */
typedef enum tp_ld_entry_kind {
    TP_LD_ENTRY_UNKNOWN = 0,
    TP_LD_ENTRY_MANIFEST,
    TP_LD_ENTRY_COPIED,
    TP_LD_ENTRY_RANK,
} tp_ld_entry_kind;

/* *rank gets the rank for TP_LD_ENTRY_RANK (may be NULL). */
tp_ld_entry_kind tp_ld_manifest_classify(const tp_manifest *m, const char *name, int *rank);
bool tp_ld_manifest_lists_file(const tp_manifest *m, const char *name);
/* The manifest's entry for a copied file, NULL when not listed. */
const tp_manifest_file *tp_ld_manifest_file(const tp_manifest *m, const char *name);
/* A copied file against its manifest entry: size ("NAME: N bytes, the
 * manifest says M"), XXH3 ("NAME: checksum mismatch (file corrupted or
 * replaced)").  Messages start with src.  _data checks both, the checksum
 * only when verify is set (like rank data under tp_load_opts.verify). */
int tp_ld_check_copied_size(const tp_manifest_file *f, const char *src, uint64_t size, tp_err *err);
int tp_ld_check_copied_sum(const tp_manifest_file *f, const char *src, uint64_t xxh3, tp_err *err);
int tp_ld_check_copied_data(const tp_manifest_file *f, const char *src, const void *data, size_t len,
                            bool verify, tp_err *err);
/* The one rule for the copied files of a converted directory, shared by
 * tp_load_rank and tp_verify_dir: every file the manifest lists must be a
 * regular file in dir with the manifest's size and (with verify) XXH3, and
 * config.json must hold the manifest's embedded config
 * (tp_manifest_check_config_copy).  Each file's text (NUL-terminated,
 * malloc'd) is handed to take, which owns it from then on. */
typedef int (*tp_ld_copied_fn)(void *arg, const tp_manifest_file *f, char *text, size_t len, tp_err *err);
int tp_ld_check_copied_files(const char *dir, const tp_manifest *m, bool verify, tp_ld_copied_fn take, void *arg,
                             tp_err *err);
/* Checks format-level facts every reader relies on (tp >= 1, one entry per
 * rank in order, flat file names).  Messages start with src. */
int tp_ld_manifest_sanity(const tp_manifest *m, const char *src, tp_err *err);

/* ------------------------------------------------------------------ bundles */

/* Checks an entry name of a bundle: not empty, not absolute, no "..", no
 * '/' (bundles are flat).  Messages start with "bundle: entry NAME". */
int tp_ld_bundle_check_name(const char *bundle, const char *name, tp_err *err);
/* Checks an entry is a plain regular file (no link, device, directory,
 * sparse file). */
int tp_ld_bundle_check_type(const char *bundle, struct archive_entry *e, tp_err *err);

/* Opens a tar for reading (tar formats only, no compression). */
int tp_ld_tar_open_read(const char *path, struct archive **out, tp_err *err);
void tp_ld_tar_close_read(struct archive *a);
/* Reads the first entry, which must be manifest.json, parses it and checks
 * it (tp_ld_manifest_sanity); on failure *m is left zeroed. */
int tp_ld_tar_read_manifest(struct archive *a, const char *path, tp_manifest *m, tp_err *err);

/* An entry after the manifest, as tp_ld_tar_walk hands it to on_entry: its
 * name and type passed the bundle checks, the manifest lists it, and no
 * earlier entry had its name. */
typedef struct tp_ld_tar_entry {
    struct archive *a;            /* read its data here, or not: the walk skips what is left */
    struct archive_entry *e;
    const char *name;
    int64_t size;                 /* from the header, >= 0 */
    tp_ld_entry_kind kind;        /* TP_LD_ENTRY_RANK or TP_LD_ENTRY_COPIED */
    int rank;                     /* RANK: which one */
    const tp_manifest_file *file; /* COPIED: its manifest entry */
} tp_ld_tar_entry;

/* The callbacks of a walk; each returns 0, or -1 with err filled, which ends
 * the walk with that error. */
typedef struct tp_ld_tar_walker {
    /* Once the manifest is read and checked, before any other entry (may be
     * NULL); json and len are its bytes. */
    int (*on_manifest)(void *arg, const tp_manifest *m, const uint8_t *json, size_t len, tp_err *err);
    int (*on_entry)(void *arg, const tp_ld_tar_entry *ent, tp_err *err);
    /* After the last entry (may be NULL): which ranks and which copied files
     * (in m->files order) the bundle held. */
    int (*on_end)(void *arg, const bool *seen_rank, const bool *seen_file, tp_err *err);
} tp_ld_tar_walker;

/* The one walk over a bundle, shared by tp_bundle_unpack, tp_bundle_verify
 * and tp_load_rank: opens path (tp_ld_tar_open_read), reads the manifest
 * (tp_ld_tar_read_manifest's rules) into *m, then checks each further entry
 * (tp_ld_bundle_check_name, tp_ld_bundle_check_type, "PATH: entry NAME is
 * not listed in the bundle's manifest", "PATH: entry NAME appears twice")
 * and hands it to on_entry; an unreadable header is "PATH: <libarchive's
 * reason>".  Closes the tar before it returns.  *m is zeroed first; the
 * caller frees it (tp_manifest_free) whether the walk succeeded or not. */
int tp_ld_tar_walk(const char *path, tp_manifest *m, const tp_ld_tar_walker *w, void *arg, tp_err *err);
/* Reads the current entry's data (exactly its header size, which must be
 * <= cap) into a malloc'd buffer with a NUL after it. */
int tp_ld_tar_read_entry(struct archive *a, struct archive_entry *e, const char *path, size_t cap,
                         uint8_t **out, size_t *out_len, tp_err *err);
/* "0-1", "0,2,5-7" or "none" for the ranks marked in have[0..tp). */
void tp_ld_format_rank_set(const bool *have, int tp, char *out, size_t cap);

bool tp_ld_is_directory(const char *path);

/* ------------------------------------------------------------- rank checks */

/* Checks a parsed tpshard index against the manifest entry for rank: the
 * conversion id, rank, tp, index checksum and size.  file names the file. */
int tp_ld_check_index(const tp_shard_index *ix, const tp_manifest *m, int rank, const char *file,
                      uint64_t actual_size, tp_err *err);

/* ------------------------------------------------------------ rank data */

/* "SOURCE: rank R: <message>" for a chunk error of tp_shard_read_chunk /
 * tp_shard_decode_chunk (which names the file, the tensor and the chunk). */
int tp_ld_rank_err_prefix(tp_err *err, const tp_loaded_rank *lr);
/* "SOURCE: rank R: tensor T: checksum of the decoded bytes mismatch (data
 * corrupted)".  Returns -1.  Shared by load.c and stream.c. */
int tp_ld_tensor_sum_mismatch(tp_err *err, const tp_loaded_rank *lr, const tp_shard_tensor *t);

#endif
