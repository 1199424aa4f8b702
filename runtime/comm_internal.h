/* comm_internal.h - what comm.c shares with its backends (private). */
#ifndef TP_COMM_INTERNAL_H
#define TP_COMM_INTERNAL_H

#include "runtime.h"

/* Each opener fills (*c)->ops and (*c)->impl; rank, world and timeout_s are
 * already set by tp_comm_open. */
/* conversion_id (may be NULL) travels in the hello (tp_launch.conversion_id). */
int tp_comm_tcp_open(tp_comm *c, const char *conversion_id, tp_err *err);
#ifdef TP_HAVE_MPI
int tp_comm_mpi_open(tp_comm *c, tp_err *err);
void tp_comm_mpi_abort(tp_comm *c, int code);
extern const tp_comm_ops tp_comm_mpi_ops;
#endif
#ifdef TP_HAVE_CUDA
/* runtime/cuda/comm_nccl.cu (C linkage) */
int tp_comm_nccl_open(tp_comm *c, const tp_launch *l, tp_err *err);
void tp_comm_nccl_abort(tp_comm *c, int code);
extern const tp_comm_ops tp_comm_nccl_ops;
#endif

/* The wording every backend uses when a collective runs out of time;
 * waiting_for < 0 when the backend cannot tell which rank is missing. */
int tp_comm_timeout_error(const tp_comm *c, const char *op, int waiting_for, tp_err *err);

#endif
