/* tp_xxhash.h - libxxhash's XXH3, the checksum of every format here.
 *
 * Include this instead of <xxhash.h>.  On x86 it routes XXH3_64bits and
 * XXH3_64bits_update to libxxhash's runtime dispatch (xxh_x86dispatch.h:
 * AVX-512, AVX2 or SSE2, picked from the CPU once), which Debian's library
 * exports beside the baseline functions.  The values are the same; the
 * baseline build is SSE2 only and hashed 4.5 GB/s on one core of the
 * development Xeon, the dispatched one 10.9 GB/s, which is most of the time
 * of loading an uncompressed rank with its checksums verified. */
#ifndef TP_XXHASH_H
#define TP_XXHASH_H

#include <xxhash.h>
#if defined(__x86_64__) || defined(__i386__)
#include <xxh_x86dispatch.h>
#endif

#endif
