#!/usr/bin/env bash
# torchrun with diloco's environment defaults; every argument is passed through to torchrun.
#
#   launch/torchrun.sh --nproc-per-node 4 -m diloco train --config configs/tiny_diloco_2x2_cpu.yaml
#   launch/torchrun.sh --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d \
#       --rdzv-endpoint node0:29400 --rdzv-id run1 -m diloco train --config ... \
#       --set topology.groups=2 --set topology.shards=8
#
# Sets (only when not already set, via launch/env.sh): OMP_NUM_THREADS = cores / processes on
# this node (read from --nproc-per-node), TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 (gloo restarts),
# PYTHONUNBUFFERED=1. Uses $TORCHRUN if set, else torchrun, else python -m torch.distributed.run.
set -euo pipefail

if [[ -z "${NPROC_PER_NODE:-}" ]]; then
    prev=""
    for arg in "$@"; do
        case "$arg" in
            --nproc-per-node=*|--nproc_per_node=*) NPROC_PER_NODE="${arg#*=}" ;;
        esac
        if [[ "$prev" == "--nproc-per-node" || "$prev" == "--nproc_per_node" ]]; then
            NPROC_PER_NODE="$arg"
        fi
        prev="$arg"
    done
    # torchrun also accepts "gpu", "cpu" or "auto" here; those fall back to one share per core.
    if [[ -n "${NPROC_PER_NODE:-}" && ! "$NPROC_PER_NODE" =~ ^[0-9]+$ ]]; then
        unset NPROC_PER_NODE
    fi
fi
if [[ -n "${NPROC_PER_NODE:-}" ]]; then
    export NPROC_PER_NODE
fi

# shellcheck source=launch/env.sh
. "$(dirname "${BASH_SOURCE[0]}")/env.sh"

if [[ -n "${TORCHRUN:-}" ]]; then
    exec ${TORCHRUN} "$@"
elif command -v torchrun >/dev/null 2>&1; then
    exec torchrun "$@"
else
    exec python -m torch.distributed.run "$@"
fi
