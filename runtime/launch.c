/* launch.c - where this process sits in the job: --rank, or the variables
 * that torchrun, mpirun and srun set.  A malformed value is an error that
 * names the variable; a launcher that sets the rank but not the size is one
 * too. */
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "runtime.h"

/* One launcher's spelling of rank / size / local rank / ranks on this node. */
typedef struct launcher_vars {
    const char *rank, *size, *local_rank, *local_size;
    bool mpi;
} launcher_vars;

static const launcher_vars launchers[] = {
    { "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", false },                       /* torchrun */
    { "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK",
      "OMPI_COMM_WORLD_LOCAL_SIZE", true },                                                   /* Open MPI */
    { "PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID", "MPI_LOCALNRANKS", true },                  /* MPICH, Intel MPI */
    { "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID", "SLURM_NTASKS_PER_NODE", false },                      /* srun */
};

/* Reads a non-negative integer variable: 1 when set, 0 when unset, -1 on a
 * malformed value. */
static int env_int(const char *name, int *out, tp_err *err)
{
    const char *s = name ? getenv(name) : NULL;
    if (!s)
        return 0;
    char *end;
    errno = 0;
    long v = strtol(s, &end, 10);
    while (*end == ' ' || *end == '\n')
        end++;
    if (errno || end == s || *end || v < 0 || v > 1000000)
        return tp_errorf(err, "%s=%s is not a non-negative integer", name, s);
    *out = (int)v;
    return 1;
}

int tp_launch_detect(tp_launch *l, int cli_rank, tp_err *err)
{
    memset(l, 0, sizeof *l);
    l->world = 1;
    l->local_world = 1;
    l->source = "default";

    const launcher_vars *found = NULL;
    int rank = 0, world = 0;
    for (size_t i = 0; i < sizeof launchers / sizeof launchers[0] && !found; i++) {
        int rc = env_int(launchers[i].rank, &rank, err);
        if (rc < 0)
            return -1;
        if (rc == 0)
            continue;
        found = &launchers[i];
        rc = env_int(found->size, &world, err);
        if (rc < 0)
            return -1;
        if (rc == 0)
            return tp_errorf(err, "%s is set but %s is not (a launcher sets both)", found->rank, found->size);
        if (world < 1)
            return tp_errorf(err, "%s=%d: the world size must be at least 1", found->size, world);
        if (rank >= world)
            return tp_errorf(err, "%s=%d is not below %s=%d", found->rank, rank, found->size, world);
    }

    if (found) {
        l->rank = rank;
        l->world = world;
        l->source = found->rank;
        l->world_source = found->size;
        l->under_mpirun = found->mpi;
        int v;
        int rc = env_int(found->local_rank, &v, err);
        if (rc < 0)
            return -1;
        l->local_rank = rc ? v : rank;
        rc = env_int(found->local_size, &v, err);
        if (rc < 0)
            return -1;
        /* Not told how many ranks share this node: assume all of them, which
         * at worst leaves cores idle rather than oversubscribing them. */
        l->local_world = rc && v >= 1 ? v : world;
    }

    if (cli_rank >= 0) {
        if (found && cli_rank != rank)
            return tp_errorf(err, "--rank %d contradicts %s=%d", cli_rank, found->rank, rank);
        if (!found) {
            /* --rank alone: the world size comes from the manifest (tp). */
            l->rank = cli_rank;
            l->world = 0;
            l->local_rank = cli_rank;
            l->local_world = 0;
            l->world_source = NULL;
        }
        l->source = "--rank";
    }
    return 0;
}
