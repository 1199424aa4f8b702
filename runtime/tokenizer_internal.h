/* tokenizer_internal.h - pieces of runtime/tokenizer.c exposed for its unit
 * test (tests/test_tokenizer.c); not part of the runtime's public API. */
#ifndef TP_TOKENIZER_INTERNAL_H
#define TP_TOKENIZER_INTERNAL_H

#include <stddef.h>
#include <stdint.h>
#include <stdbool.h>

/* Largest tokenizer.json accepted (after zstd decompression). */
#define TP_TOK_MAX_JSON (512u << 20)
/* Largest token id accepted: ids index dense tables. */
#define TP_TOK_MAX_ID ((1 << 24) - 1)

/* GPT-2's bytes_to_unicode(): the code point each byte is shown as in a
 * byte-level vocabulary (printable Latin-1 bytes map to themselves, the
 * other 68 to U+0100..U+0143 in byte order). */
void tp_tok_bytes_to_unicode(uint32_t table[256]);

/* Appends s[0..n) to *out as UTF-8, invalid sequences replaced by U+FFFD
 * the way Rust's String::from_utf8_lossy does it (one U+FFFD per maximal
 * invalid subpart).  When final is false, an incomplete but so far valid
 * sequence at the end is not consumed: *consumed says how many bytes were.
 * Returns false when out of memory. */
typedef struct tp_tok_buf {
    char *p;
    size_t n, cap;
} tp_tok_buf;
bool tp_tok_buf_append(tp_tok_buf *b, const void *data, size_t n);
bool tp_tok_utf8_lossy(tp_tok_buf *out, const uint8_t *s, size_t n, bool final, size_t *consumed);

#endif
