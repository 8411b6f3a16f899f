"""Where this process sits: rank, worker group, shard, device, and the collectives between them.

A run has G worker groups of S shard ranks each (world = G·S). With one process and no process
group the run is SNOO on a single device; the distributed layout is set up from the standard
``torchrun`` variables (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
from torch import nn

from diloco.config import TopologyConfig
from diloco.errors import TopologyError
from diloco.reduce import PseudoGradientReducer, SingleGroup

__all__ = ["Runtime", "init_runtime", "resolve_device"]


def resolve_device(device: str) -> torch.device:
    """``auto`` is CUDA (this process's LOCAL_RANK) when available, else CPU."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device(device)


@dataclass
class Runtime:
    """This process's place in the (groups × shards) layout."""

    device: torch.device
    rank: int = 0
    world: int = 1
    group: int = 0
    groups: int = 1
    shard: int = 0
    shards: int = 1
    reducer: PseudoGradientReducer = field(default_factory=SingleGroup)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def parallelize(self, model: nn.Module, mixed_precision: str = "auto") -> nn.Module:
        """Place the model on this rank's device (one rank per group: nothing to shard)."""
        return model.to(self.device)

    def mean(self, value: float) -> float:
        """Mean of a scalar over all ranks."""
        return value

    def close(self) -> None:
        """Tear down the process group, if any."""


def init_runtime(topology: TopologyConfig, device: str = "auto") -> Runtime:
    """The runtime of this process for ``topology`` (single process: G = S = 1)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world != topology.groups * topology.shards:
        raise TopologyError(
            f"world size {world} != topology.groups × topology.shards = "
            f"{topology.groups} × {topology.shards}; launch {topology.groups * topology.shards} "
            "processes or change the topology"
        )
    return Runtime(device=resolve_device(device))
