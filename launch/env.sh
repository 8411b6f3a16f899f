# Shared environment defaults for every diloco launch (torchrun scripts, docker/compose.yaml).
# Source it, don't run it:   . launch/env.sh
# Every variable is only a default: a value already set in the environment wins.
#
# OMP_NUM_THREADS   CPU threads per process. torchrun sets it to 1 only when it starts more than
#                   one process per node; a single process left at the default on a shared host
#                   can run ~50x slower. Default: cores on this host / DILOCO_PROCS_PER_HOST.
# DILOCO_PROCS_PER_HOST
#                   training processes sharing this host's cores (default: NPROC_PER_NODE, else 1).
#                   Set it to 2 when two single-process "nodes" run on one machine (compose).
# TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1
#                   without it, a torchrun restart (--max-restarts) on gloo fails with
#                   "Gloo connectFullMesh failed ... Connection refused" (stale rendezvous keys,
#                   pytorch#135712).
# PYTHONUNBUFFERED=1
#                   log lines appear as they are written (containers, SLURM logs).

_diloco_procs="${DILOCO_PROCS_PER_HOST:-${NPROC_PER_NODE:-1}}"
_diloco_cores="$(nproc 2>/dev/null || getconf _NPROCESSORS_ONLN 2>/dev/null || echo 1)"
_diloco_threads=$(( _diloco_cores / (_diloco_procs > 0 ? _diloco_procs : 1) ))
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(( _diloco_threads > 0 ? _diloco_threads : 1 ))}"
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE="${TORCH_DISABLE_SHARE_RDZV_TCP_STORE:-1}"
export PYTHONUNBUFFERED="${PYTHONUNBUFFERED:-1}"
unset _diloco_procs _diloco_cores _diloco_threads
