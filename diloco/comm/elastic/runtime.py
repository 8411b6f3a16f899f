"""The runtime of one rank of an elastic worker group (``topology.elastic=true``).

An elastic group is its own ``torch.distributed`` world of S ranks (one ``torchrun`` per group,
or a plain process when S = 1): FSDP2 shards the model over a (1, S) mesh of that world, and the
groups never share a process group except the per-round cross-group ones of
:class:`~.membership.Membership`. :func:`init_elastic_runtime` builds the
:class:`~diloco.comm.topology.Runtime` (``group`` = ``topology.group_id``, ``groups`` = G,
``rank``/``world``/``mesh``: the group's own) with an :class:`~.reducer.ElasticReducer`.
"""

from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist

from diloco.comm.elastic.coordinator import CoordinatorSettings, require_torchft
from diloco.comm.elastic.membership import Membership
from diloco.comm.elastic.reducer import ElasticReducer
from diloco.comm.topology import (
    Runtime,
    resolve_backend,
    resolve_device,
    resolve_mixed_precision,
    set_threads,
)
from diloco.config import TopologyConfig
from diloco.errors import TopologyError

__all__ = ["init_elastic_runtime"]


def init_elastic_runtime(
    topology: TopologyConfig,
    device: str = "auto",
    compress: str = "none",
    compress_block: int = 256,
    fingerprint: str = "",
) -> Runtime:
    """This rank's runtime in elastic group ``topology.group_id`` (module docstring).

    WORLD_SIZE (1 when unset) must equal ``topology.shards``: each group is launched on its own.
    Nothing talks to the coordinator yet; the training job starts the membership once it knows
    its round (:meth:`Membership.start`).

    Raises:
        TopologyError: the world is not one group of S ranks, or NCCL without CUDA.
    """
    require_torchft()
    S = topology.shards
    world = int(os.environ.get("WORLD_SIZE", "1"))
    set_threads(int(os.environ.get("LOCAL_WORLD_SIZE", world)))
    if world != S:
        raise TopologyError(
            f"world size {world} != topology.shards = {S}: with topology.elastic=true each "
            f"worker group is launched on its own (torchrun --nproc-per-node {S} per group)"
        )
    dev = resolve_device(device)
    backend = resolve_backend(topology.backend, dev)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    rank, mesh, owns = 0, None, False
    if S > 1:
        rank = int(os.environ["RANK"])
        owns = not dist.is_initialized()
        if owns:
            dist.init_process_group(backend, timeout=timedelta(seconds=topology.timeout_s))
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh(dev.type, (1, S), mesh_dim_names=("group", "shard"))
    membership = Membership(
        coordinator=topology.coordinator,
        settings=CoordinatorSettings.from_topology(topology),
        group=topology.group_id,
        shard=rank,
        shards=S,
        group_pg=dist.group.WORLD if S > 1 else None,
        backend=backend,
        timeout_s=topology.timeout_s,
        quorum_timeout_s=topology.quorum_timeout_s,
        fingerprint=fingerprint,
    )
    comm_device = dev if backend == "nccl" else torch.device("cpu")
    reducer = ElasticReducer(
        membership, topology.groups, comm_device, compress=compress, block=compress_block
    )
    return Runtime(
        device=dev,
        rank=rank,
        world=S,
        group=topology.group_id,
        groups=topology.groups,
        shard=rank,
        shards=S,
        reducer=reducer,
        mesh=mesh,
        precision=resolve_mixed_precision(topology.mixed_precision, dev),
        owns_process_group=owns,
        membership=membership,
    )
