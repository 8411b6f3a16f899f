"""The training job's side of elastic worker groups (``topology.elastic=true``).

* :func:`group_config` — each group is a run of its own, in ``RUN_DIR/group<g>/`` (config,
  metrics, summary, checkpoints, final model); the launcher's logs go to ``RUN_DIR/logs/``.
* :class:`GroupState` — what a group shares with a joining one (the
  :class:`~diloco.comm.elastic.heal.HealState` the elastic reducer heals from): θ and the outer
  state, the wrapper's counters and the LR schedule's position. The inner optimiser state and the
  data position stay the group's own (restored from its own checkpoint, when it has one).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from torch import Tensor

from diloco.algorithm.wrapper import DiLoCo
from diloco.config import Config
from diloco.job.metrics import read_metrics

__all__ = ["GroupState", "group_config", "group_dir", "heal_records"]


def group_dir(run_dir: str | Path, group: int) -> Path:
    """Where elastic group ``group`` of the run in ``run_dir`` writes its outputs."""
    return Path(run_dir) / f"group{group}"


def group_config(cfg: Config) -> Config:
    """``cfg`` with ``run.out_dir`` set to this group's own directory (elastic runs only)."""
    out_dir = group_dir(cfg.run.out_dir, cfg.topology.group_id)
    return dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, out_dir=str(out_dir)))


class GroupState:
    """A group's shared state, for healing (donor side) and being healed (joiner side).

    ``restored``: the group resumed from a checkpoint, so its θ is trained even at round 0.
    """

    def __init__(self, dl: DiLoCo, scheduler: Any, restored: bool):
        self.dl, self.scheduler, self.restored = dl, scheduler, restored
        #: Wall time and bytes of the last heal this group received (for the job's metrics).
        self.healed: dict[str, float] | None = None

    def rounds(self) -> int:
        return self.dl.outer_steps

    def trained(self) -> bool:
        return self.restored or self.dl.outer_steps > 0

    def heal_tensors(self) -> list[Tensor]:
        return self.dl.shared_tensors()

    def heal_meta(self) -> dict[str, Any]:
        return {"wrapper": self.dl.shared_state(), "scheduler": self.scheduler.state_dict()}

    def load_heal_meta(self, meta: dict[str, Any]) -> None:
        self.dl.load_shared_state(meta["wrapper"])
        self.scheduler.load_state_dict(meta["scheduler"])
        self.restored = True

    def checksum_tensors(self) -> list[Tensor]:
        return self.dl.slow_tensors()


def elastic_summary(rounds: list[dict[str, Any]], runtime: Any, dl: DiLoCo) -> dict[str, Any]:
    """summary.json's elastic part, from this group's per-round reducer statistics.

    ``group_rounds``: Σ over this group's rounds of the groups whose Δ was averaged (× K: the
    inner steps that reached θ); ``rounds_below_groups``: rounds averaged over fewer than G
    groups; ``heals``: the rounds in
    which groups were healed (who, bytes moved by this group); ``healed_self``: when this group
    was healed; ``pids``: the process ids of the group's ranks; ``theta_sum``/``theta_sumsq``:
    the final θ's checksum (every group's must be equal).
    """
    import os

    import torch
    import torch.distributed as dist

    pids = [os.getpid()]
    if runtime.world > 1:
        gathered: list[Any] = [None] * runtime.world
        dist.all_gather_object(gathered, os.getpid())
        pids = gathered
    local = torch.zeros(2, dtype=torch.float64)
    for t in dl.slow_tensors():
        x = t.detach().to("cpu", torch.float64)
        local[0] += x.sum()
        local[1] += x.square().sum()
    total = runtime.reducer.sum_over_shards(local)
    return {
        "elastic": True,
        "group": runtime.group,
        "pids": pids,
        "rounds": len(rounds),
        "group_rounds": sum(r["participants"] for r in rounds),
        "rounds_below_groups": sum(1 for r in rounds if r["participants"] < runtime.groups),
        "exchanges_redone": sum(r["exchanges_redone"] for r in rounds),
        "quorum_wait_s": sum(r["quorum_wait_s"] for r in rounds),
        "coordinator_kept_rounds": sum(1 for r in rounds if r["coordinator_kept"]),
        "heals": [
            {"round": r["round"], "groups": r["healed_groups"], "bytes": r["heal_bytes"]}
            for r in rounds
            if r["healed_groups"]
        ],
        "healed_self": [
            {"at": r["healed_at"], "bytes": r["heal_bytes"]} for r in rounds if r.get("healed_self")
        ],
        "theta_sum": float(total[0]),
        "theta_sumsq": float(total[1]),
    }


def heal_records(metrics: Path) -> list[dict[str, Any]]:
    """The records of the rounds in which a group was healed back into the quorum
    (``healed_self``; with ``healed_at``, the wall time, and ``heal_bytes``), from its
    ``metrics.jsonl``; none while the file is not written yet."""
    try:
        return [r for r in read_metrics(metrics) if r.get("healed_self")]
    except FileNotFoundError:
        return []
