/* shard_internal.h - writer knobs that only tests need.  Not part of the
 * public API: tpconvert writes every tensor of a file with one codec. */
#ifndef TP_SHARD_INTERNAL_H
#define TP_SHARD_INTERNAL_H

#include "shardfmt.h"

/* Changes the codec and level of the tensors added from now on, so that a
 * test can put tensors of both codecs into one file (the format allows it:
 * the codec is recorded per tensor). */
void tp_shard_writer_set_codec(tp_shard_writer *w, tp_codec codec, int level);

/* Header layout (FORMAT.md, "Header"). */
#define TP_SHARD_HEADER_SIZE 4096u
#define TP_SHARD_HEADER_HASHED 48u   /* header_xxh3 covers bytes [0, 48) */
#define TP_SHARD_MAX_CHUNK (1u << 30)

#endif
