"""The Ray Train worker of ``diloco launch ray``: the same ``train()`` as ``diloco train``.

Each worker counts its attempt (``RUN_DIR/ray/<run name>.attempts``), chooses where to resume
from on a restart (:func:`choose_resume`: the newest of the run directory's checkpoint and the
one Ray hands back), reports its placement, and trains with callbacks that report metrics to
Ray on every log step and hand each checkpoint to Ray as a hard-linked snapshot
(:func:`stage_checkpoint`).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from diloco.config import config_from_dict
from diloco.errors import DilocoError, note, warn, write_line
from diloco.job import events
from diloco.job.elastic import group_dir

__all__ = ["choose_resume", "stage_checkpoint", "train_worker"]

#: Ray metrics reported on every log step (when present in the record).
REPORTED = ("step", "outer_step", "loss", "val_loss", "tokens_per_s", "lr")


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _count_attempt(path: Path, rank: int) -> int:
    """This attempt's number (0 first): every rank reads the count, then rank 0 bumps it."""
    try:
        attempt = int(path.read_text().strip() or 0)
    except FileNotFoundError:
        attempt = 0
    _barrier()
    if rank == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(f"{attempt + 1}\n")
        tmp.replace(path)
    return attempt


def _ray_checkpoint_dir() -> Path | None:
    """``ray.train.get_checkpoint()`` as a local directory (downloaded if on remote storage)."""
    import ray.train

    ckpt = ray.train.get_checkpoint()
    if ckpt is None:
        return None
    try:
        import pyarrow.fs

        if isinstance(ckpt.filesystem, pyarrow.fs.LocalFileSystem):
            return Path(ckpt.path)
    except ImportError:
        pass
    return Path(ckpt.to_directory(tempfile.mkdtemp(prefix="diloco-ray-ckpt-")))


def choose_resume(
    run_dir: Path, ray_ckpt: Path | None, first: tuple[str | None, bool], is_main: bool
) -> tuple[str | None, bool]:
    """(resume, force) of a restarted attempt: the newest of the run directory's newest
    complete checkpoint, Ray's checkpoint and the first attempt's ``--resume PATH``, by the
    step stored in their meta.json (ties: run directory, then Ray, then PATH).

    None of them: the first attempt's (resume, force) again. Unreadable candidates are skipped.
    """
    from diloco.errors import CheckpointError, warn
    from diloco.persist.resume import newest_checkpoint, read_meta

    candidates: list[tuple[int, int, str | None, bool, str]] = []  # step, tie rank, resume, …
    try:
        found = newest_checkpoint(run_dir, announce=is_main)
    except CheckpointError:
        found = None
    if found is not None:
        candidates.append((found[1]["step"], 2, None, False, str(found[0])))
    if ray_ckpt is not None:
        try:
            meta = read_meta(ray_ckpt)
            candidates.append((meta["step"], 1, str(ray_ckpt), False, f"Ray's {ray_ckpt}"))
        except CheckpointError as e:
            warn(f"ignoring the checkpoint Ray handed back: {e}", is_main)
    resume, force = first
    if resume not in (None, "auto") and (Path(resume) / "meta.json").exists():
        try:
            meta = read_meta(resume)
            candidates.append((meta["step"], 0, resume, force, resume))
        except CheckpointError:
            pass
    if not candidates:
        return first
    step, _, chosen, chosen_force, label = max(candidates, key=lambda c: (c[0], c[1]))
    if is_main:
        note(f"Ray restart: resuming from {label} (step {step})")
    return chosen, chosen_force


def stage_checkpoint(path: Path, staging: Path) -> Path:
    """A copy of checkpoint directory ``path`` under ``staging`` made of hard links: instant,
    and it survives the pruning or renaming of ``path`` (checkpoint files are never rewritten).
    Falls back to a real copy where hard links are not possible (another filesystem)."""
    staging.mkdir(parents=True, exist_ok=True)
    dest = staging / f"{path.name}-{time.time_ns()}"
    try:
        shutil.copytree(path, dest, copy_function=os.link)
    except OSError:
        shutil.rmtree(dest, ignore_errors=True)
        shutil.copytree(path, dest)
    return dest


class _RayReporter:
    """``train()`` hooks that report metrics and checkpoints to Ray (called on every rank).

    Every ``report`` is a barrier over the workers (through a Ray actor), after which Ray's
    controller takes one report per worker per health-check interval. So every report is handed
    over in the background (``CheckpointUploadMode.ASYNC``: still in order, and flushed by Ray
    when the worker function returns) and training waits for neither the controller nor the
    copy of a checkpoint to Ray's storage. Rank 0 reports a hard-linked snapshot of the
    checkpoint (:func:`stage_checkpoint`), which Ray copies and then deletes, so the copy is
    whole even if the training loop prunes the checkpoint meanwhile.
    """

    def __init__(self, rank: int, world: int, attempt: int, staging: Path):
        import ray.train

        self.train = ray.train
        self.rank, self.world, self.attempt, self.staging = rank, world, attempt, staging
        self.last: dict[str, Any] = {}

    def on_log(self, record: dict[str, Any]) -> None:
        metrics = {k: record[k] for k in REPORTED if isinstance(record.get(k), (int, float))}
        self.last = metrics
        self.train.report(metrics, checkpoint_upload_mode=self.train.CheckpointUploadMode.ASYNC)

    def on_checkpoint(self, path: Path) -> None:
        meta = json.loads((path / "meta.json").read_text(encoding="utf-8"))
        metrics = {**self.last, "step": meta["step"], "round": meta["round"]}
        ckpt = None
        if self.rank == 0:
            staged = stage_checkpoint(path, self.staging)
            ckpt = self.train.Checkpoint.from_directory(str(staged))
        self.train.report(
            metrics,
            checkpoint=ckpt,
            checkpoint_upload_mode=self.train.CheckpointUploadMode.ASYNC,
            delete_local_checkpoint_after_upload=True,
        )
        events.emit(
            "ray_checkpoint_reported",
            round=meta["round"],
            rank=self.rank,
            world=self.world,
            attempt=self.attempt,
        )


def _report_placement(rank: int, shards: int, group: int, elastic: bool) -> None:
    """Each node's first worker prints which ranks and groups it holds, and warns if a group
    spans nodes (Ray Train gives a node's workers contiguous ranks). ``elastic``: the ranks are
    those of elastic group ``group``'s own world."""
    if os.environ.get("LOCAL_RANK", "0") != "0":
        return
    import ray

    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    last = rank + local_world - 1
    groups = f"group {group}" if elastic else f"groups {rank // shards}-{last // shards}"
    note(f"node {ray.util.get_node_ip_address()}: ranks {rank}-{last}, {groups}")
    if rank % shards or local_world % shards:
        warn(
            f"this node runs {local_world} workers, not a multiple of "
            f"topology.shards={shards}: a group spans nodes and its FSDP traffic crosses the "
            "network"
        )


def train_worker(config: dict[str, Any]) -> None:
    """The Ray Train worker function: the same ``train()`` as ``diloco train``."""
    from diloco.job.train import train

    cwd = config.get("cwd")
    if cwd and os.path.isdir(cwd):
        os.chdir(cwd)  # relative paths in the config mean what they meant for the driver
    cfg = config_from_dict(config["config"])
    rank = int(os.environ.get("RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    topology = cfg.topology
    _report_placement(rank, topology.shards, topology.group_id, topology.elastic)
    run_dir = Path(cfg.run.out_dir)
    if topology.elastic:  # the group's own run directory
        run_dir = group_dir(run_dir, topology.group_id)
    ray_dir, name = Path(config["ray_dir"]), config["run_name"]
    attempt = _count_attempt(ray_dir / f"{name}.attempts", rank)
    first = (config["resume"], config["force"])
    if attempt == 0:
        resume, force = first
    else:
        resume, force = choose_resume(run_dir, _ray_checkpoint_dir(), first, rank == 0)
    reporter = _RayReporter(rank, world, attempt, ray_dir / f"{name}.staging")
    try:
        train(cfg, resume=resume, force=force, on_log=reporter.on_log,
              on_checkpoint=reporter.on_checkpoint)  # fmt: skip
    except DilocoError as e:
        write_line(f"diloco: error: {e}")
        raise
