"""Where this process sits: rank, worker group, shard, device, and the collectives between them.

A run has G worker groups of S shard ranks each (world = G·S). With one process and no process
group the run is SNOO on a single device. Otherwise the layout comes from the standard
``torchrun`` variables (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT), so any launcher
that sets them works, and is one 2-D ``DeviceMesh`` of shape (G, S) with dims
``("group", "shard")``. Groups are contiguous blocks of S ranks (rank = g·S + s), so a group can
sit on one node:

    world ranks   0 .. S-1  |  S .. 2S-1  | ... |  (G-1)·S .. G·S-1
    group              0    |      1      | ... |       G-1

Inside a group the fast weights are FSDP2-sharded over the ``"shard"`` sub-mesh and the group
batch is split across its S ranks; the pseudo-gradient is averaged over the ``"group"`` sub-mesh
(:class:`diloco.comm.mesh.MeshReducer`).
"""

from __future__ import annotations

import contextlib
import gc
import os
from dataclasses import dataclass, field
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from diloco.algorithm.reducer import PseudoGradientReducer, SingleGroup
from diloco.comm.mesh import MeshReducer
from diloco.config import TopologyConfig
from diloco.errors import TopologyError

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh

__all__ = [
    "Runtime",
    "destroy_process_groups",
    "init_runtime",
    "resolve_backend",
    "resolve_device",
    "resolve_mixed_precision",
    "set_threads",
]


def resolve_device(device: str) -> torch.device:
    """``auto`` is CUDA (this process's LOCAL_RANK) when available, else CPU."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device(device)


def resolve_mixed_precision(mixed_precision: str, device: torch.device) -> str:
    """``auto`` is bf16 compute on CUDA, fp32 on CPU; ``fp32``, ``bf16`` and ``fp64`` are kept."""
    if mixed_precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    return mixed_precision


@dataclass
class Runtime:
    """This process's place in the (groups × shards) layout.

    ``mesh`` is the (G, S) ``DeviceMesh`` with dims ``("group", "shard")``, or None for a single
    process without a process group.
    """

    device: torch.device
    rank: int = 0
    world: int = 1
    group: int = 0
    groups: int = 1
    shard: int = 0
    shards: int = 1
    reducer: PseudoGradientReducer = field(default_factory=SingleGroup)
    mesh: DeviceMesh | None = None
    precision: str = "fp32"  # resolved compute precision: fp32, bf16 or fp64
    _sharded: bool = False
    owns_process_group: bool = False  # False when a launcher (e.g. Ray Train) created it
    #: Elastic worker groups: this rank's :class:`~diloco.comm.elastic.membership.Membership`
    #: (None on the mesh path). ``group``/``groups`` are then the group id and G, and ``rank``,
    #: ``world`` and ``mesh`` (a (1, S) mesh, or None for S = 1) are the group's own world.
    membership: Any = None

    @property
    def elastic(self) -> bool:
        return self.membership is not None

    def alive(self) -> None:
        """The training loop made progress (elastic: keeps the heartbeats going)."""
        if self.membership is not None:
            self.membership.progress()

    def busy(self) -> contextlib.AbstractContextManager:
        """A long phase that is not a hang (evaluation, checkpoint): heartbeats continue."""
        return self.membership.busy() if self.membership is not None else contextlib.nullcontext()

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def parallelize(self, model: nn.Module, mixed_precision: str | None = None) -> nn.Module:
        """Place the model on this rank's device; with S > 1 shard it with FSDP2.

        Each transformer block (``model.blocks[i]``: the GPT's blocks, a Hugging Face model's
        decoder layers) is ``fully_shard``-ed over the ``"shard"`` sub-mesh, then the root
        (embeddings, final norm, tied head). Every rank must hold the
        same full initial weights (``build_model`` seeds before construction): the shards are
        cut from them. With bf16 the policy computes in bf16 and reduces gradients in fp32; the
        sharded parameters (the fast weights φ) stay fp32. With S = 1 the model stays a plain
        module and bf16 compute comes from :meth:`autocast`. With fp64 the parameters (and so
        every gradient, optimiser state, slow weight and exchanged Δ) are float64.
        """
        if mixed_precision is not None:
            self.precision = resolve_mixed_precision(mixed_precision, self.device)
        dtype = torch.float64 if self.precision == "fp64" else None
        model = model.to(self.device, dtype)
        if self.mesh is None or self.shards == 1:
            return model
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        if self.precision == "bf16":
            policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        else:
            policy = MixedPrecisionPolicy()
        shard_mesh = self.mesh["shard"]
        for block in getattr(model, "blocks", []):
            fully_shard(block, mesh=shard_mesh, mp_policy=policy)
        fully_shard(model, mesh=shard_mesh, mp_policy=policy)
        self._sharded = True
        return model

    def autocast(self) -> contextlib.AbstractContextManager:
        """bf16 autocast for an unsharded model with bf16 precision; otherwise a no-op.

        (A sharded model computes in bf16 through its FSDP2 mixed-precision policy.)
        """
        if self.precision == "bf16" and not self._sharded:
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def mean(self, value: float) -> float:
        """Mean of a scalar over all ranks (every rank must call it)."""
        if self.mesh is None:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self._comm_device())
        dist.all_reduce(t)
        return float(t) / self.world

    def check_groups_agree(self, tensors: list[Tensor]) -> list[tuple[float, float]]:
        """Checksums of this rank's shards of ``tensors`` in every group; raise if they differ.

        Per rank: (Σx, Σx²) in float64 over its local tensors, placed in slot (g, s) of a
        [G, S, 2] table that one all-reduce over the world fills in, so every rank sees every
        checksum and all take the same decision. Groups must agree shard by shard (relative
        tolerance 1e-6, for reductions that are not bitwise identical). Returns the per-group
        totals [(Σx, Σx²) summed over shards] (group 0 first). With G = 1 nothing is sent and
        the list holds this group's local values.

        Raises:
            TopologyError: a group's checksum differs from group 0's.
        """
        dev = self._comm_device()
        local = torch.zeros(2, dtype=torch.float64, device=dev)
        for t in tensors:
            x = t.detach().to(dev, torch.float64)
            local[0] += x.sum()
            local[1] += x.square().sum()
        if self.mesh is None or self.groups == 1:
            totals = self._sum_shards(local)
            return [(float(totals[0]), float(totals[1]))]
        table = torch.zeros(self.groups, self.shards, 2, dtype=torch.float64, device=dev)
        table[self.group, self.shard] = local
        dist.all_reduce(table)
        table = table.cpu()
        ref = table[0]
        for g in range(1, self.groups):
            if not torch.allclose(table[g], ref, rtol=1e-6, atol=1e-12):
                s = int((table[g] - ref).abs().sum(dim=1).argmax())
                raise TopologyError(
                    f"group {g} weights differ from group 0's (shard {s}: sum/sumsq "
                    f"{table[g, s, 0].item():.9g}/{table[g, s, 1].item():.9g} vs "
                    f"{ref[s, 0].item():.9g}/{ref[s, 1].item():.9g})"
                )
        totals = table.sum(dim=1)
        return [(float(a), float(b)) for a, b in totals]

    def _sum_shards(self, value: Tensor) -> Tensor:
        return self.reducer.sum_over_shards(value)

    def _comm_device(self) -> torch.device:
        """Where collective inputs live: the CUDA device with NCCL, else the CPU."""
        if self.mesh is not None and self.mesh.device_type == "cuda":
            return self.device
        return torch.device("cpu")

    def barrier(self) -> None:
        """Wait until every rank gets here (nothing to wait for in one process)."""
        if dist.is_available() and dist.is_initialized():
            dist.barrier()

    def close(self) -> None:
        """Tear down the process group if this runtime created it (see
        :func:`destroy_process_groups`); the mesh and reducer are dropped with it."""
        if self.membership is not None:
            self.membership.close()
            self.membership = None
            self.reducer = SingleGroup()
        if self.owns_process_group:
            self.mesh, self.reducer = None, SingleGroup()
            destroy_process_groups()
        self.owns_process_group = False


def destroy_process_groups() -> None:
    """``destroy_process_group()`` of every group, then free them now, not at interpreter exit.

    A gloo process group owns worker and transport threads. One still referenced when Python
    shuts down is destroyed during finalisation, where a finished 2-rank job was seen to abort
    (``terminate called without an active exception``, SIGABRT, exit code -6) in about 1 run in
    100 on a loaded 2-core machine. The caller drops its own references first (meshes, reducers,
    FSDP modules); this removes torch's and collects the cycles while the interpreter is whole.
    """
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    gc.collect()


def resolve_backend(backend: str, device: torch.device) -> str:
    """``auto`` is NCCL on CUDA, else gloo.

    Raises:
        TopologyError: NCCL without CUDA.
    """
    if backend == "auto":
        backend = "nccl" if device.type == "cuda" else "gloo"
    if backend == "nccl" and device.type != "cuda":
        raise TopologyError(
            f"topology.backend=nccl needs CUDA but run.device is {device.type}; "
            "use topology.backend=gloo or run on GPUs"
        )
    return backend


def set_threads(world_on_node: int) -> None:
    """Without OMP_NUM_THREADS, give each local process an equal share of the cores."""
    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, world_on_node)))


def init_runtime(
    topology: TopologyConfig,
    device: str = "auto",
    compress: str = "none",
    compress_block: int = 256,
) -> Runtime:
    """The runtime of this process for ``topology``.

    ``compress``/``compress_block`` (``outer.compress``, ``outer.compress_block``) configure how
    the :class:`~diloco.comm.mesh.MeshReducer` exchanges the pseudo-gradient (nothing with G = 1).

    One process (no WORLD_SIZE, or WORLD_SIZE = 1) with G·S = 1: no process group. Otherwise
    WORLD_SIZE must equal G·S (checked on every rank before any connection is made, so a wrong
    launch fails at once everywhere), then ``init_process_group`` with ``topology.backend``
    (``auto``: NCCL with CUDA, else gloo) and ``topology.timeout_s``, and the (G, S) mesh.

    Raises:
        TopologyError: the world size does not match the topology, or NCCL without CUDA.
    """
    G, S = topology.groups, topology.shards
    world = int(os.environ.get("WORLD_SIZE", "1"))
    set_threads(int(os.environ.get("LOCAL_WORLD_SIZE", world)))
    if world != G * S:
        raise TopologyError(
            f"world size {world} != topology.groups × topology.shards = {G} × {S}; "
            f"launch {G * S} processes or change the topology"
        )
    dev = resolve_device(device)
    precision = resolve_mixed_precision(topology.mixed_precision, dev)
    if world == 1:
        return Runtime(device=dev, precision=precision)
    backend = resolve_backend(topology.backend, dev)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    rank = int(os.environ["RANK"])
    owns = not dist.is_initialized()  # a launcher may have set it up already (Ray Train)
    if owns:
        dist.init_process_group(backend, timeout=timedelta(seconds=topology.timeout_s))
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh(dev.type, (G, S), mesh_dim_names=("group", "shard"))
    return Runtime(
        device=dev,
        rank=rank,
        world=world,
        group=rank // S,
        groups=G,
        shard=rank % S,
        shards=S,
        reducer=MeshReducer(mesh, compress=compress, block=compress_block),
        mesh=mesh,
        precision=precision,
        owns_process_group=owns,
    )
