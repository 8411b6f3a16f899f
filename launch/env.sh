# Shared environment defaults for every diloco launch (launch scripts, docker/compose.yaml, SLURM).
# Source it, don't run it:   export NPROC_PER_NODE=4; . launch/env.sh
# Every variable is only a default: a value already set in the environment wins.
#
# OMP_NUM_THREADS   CPU threads per process = cores on this host / processes on this host, where
#                   the process count is DILOCO_PROCS_PER_HOST, else NPROC_PER_NODE. With
#                   neither set it is left alone: torchrun then sets 1 when it starts more than
#                   one process, and `diloco train` gives a lone process cores / LOCAL_WORLD_SIZE.
#                   Left at the default, processes sharing a host's cores can run ~50x slower.
# DILOCO_PROCS_PER_HOST
#                   training processes sharing this host's cores, when that is not NPROC_PER_NODE
#                   (e.g. 2 when two single-process "nodes" run on one machine, as in compose).
# TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1
#                   without it, a torchrun restart (--max-restarts) on gloo fails with
#                   "Gloo connectFullMesh failed ... Connection refused" (stale rendezvous keys,
#                   pytorch#135712).
# PYTHONUNBUFFERED=1
#                   log lines appear as they are written (containers, SLURM logs).

_diloco_procs="${DILOCO_PROCS_PER_HOST:-${NPROC_PER_NODE:-}}"
if [ -z "${OMP_NUM_THREADS:-}" ] && [ -n "${_diloco_procs}" ] && [ "${_diloco_procs}" -gt 0 ]; then
    _diloco_cores="$(nproc 2>/dev/null || getconf _NPROCESSORS_ONLN 2>/dev/null || echo 1)"
    OMP_NUM_THREADS=$(( _diloco_cores / _diloco_procs ))
    [ "${OMP_NUM_THREADS}" -ge 1 ] || OMP_NUM_THREADS=1
    export OMP_NUM_THREADS
fi
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE="${TORCH_DISABLE_SHARE_RDZV_TCP_STORE:-1}"
export PYTHONUNBUFFERED="${PYTHONUNBUFFERED:-1}"
unset _diloco_procs _diloco_cores
