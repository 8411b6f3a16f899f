"""``diloco launch ray``: Ray places and supervises the G·S workers; the training is ``train()``.

What Ray adds over ``torchrun`` and what it does not change:

* **Placement.** A Ray Train ``TorchTrainer`` with ``ScalingConfig(num_workers=G·S,
  resources_per_worker={"CPU": c[, "GPU": 1]}, placement_strategy="PACK")``. Ray Train gives
  the workers of one node contiguous world ranks, and a group is the contiguous block of ranks
  g·S … g·S+S−1 (:mod:`diloco.topology`), so **a group stays on one node whenever every node
  holds a multiple of S workers** (PACK fills nodes first). Each node's rank 0 checks this and
  warns if a group spans nodes (its FSDP traffic would then cross the network).
* **Process group.** ``TorchConfig(backend=gloo|nccl, timeout_s=topology.timeout_s)`` creates
  it and sets RANK/WORLD_SIZE/LOCAL_RANK; :func:`diloco.topology.init_runtime` then builds the
  (G, S) mesh on it. The worker function is :func:`diloco.train.train`, unchanged: rank 0 writes
  ``metrics.jsonl``, ``summary.json``, checkpoints and ``final_model.pt`` into ``run.out_dir``
  exactly as under torchrun (so on several nodes ``run.out_dir`` must be shared storage).
* **Metrics.** Every log step every rank calls ``ray.train.report`` with ``step``,
  ``outer_step``, ``loss``, ``tokens_per_s``, ``lr`` and ``val_loss`` when measured (rank 0's
  values reach the Ray dashboard).
* **Checkpoints and restarts.** After each DCP checkpoint (``RUN_DIR/checkpoints/step_<N>``)
  rank 0 reports it with ``ray.train.report(checkpoint=Checkpoint.from_directory(…))`` (a
  hard-linked snapshot, uploaded in the background): Ray copies it to its storage (default
  ``RUN_DIR/ray/<run name>/``, keeping ``train.keep_last``).
  ``FailureConfig(max_failures=N)`` restarts the whole worker group after a failure. On a
  restart every rank resumes from the newest of (a) the newest complete checkpoint in the run
  directory and (b) ``ray.train.get_checkpoint()``, compared by the step stored in their
  meta.json: Ray can hand back an older checkpoint than the last one reported, and a resume
  never goes back behind a checkpoint already on disk. The first attempt uses ``--resume`` /
  ``--force`` like ``diloco train``; attempts are counted in ``RUN_DIR/ray/<run name>.attempts``.
* **Local mode** (``--address local``, the default without ``RAY_ADDRESS``): a private Ray with
  G·S·c logical CPUs (and the visible GPUs), no dashboard, every service on 127.0.0.1, its
  files under ``$RAY_TMPDIR`` (default ``/tmp/ray-<uid>``: Unix socket paths must stay short);
  shut down at the end.

Before ``fit()`` the cluster's resources are checked (:func:`check_resources`): a job that
cannot be placed fails at once with one line instead of waiting for resources forever.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from diloco import faults
from diloco.config import Config, config_from_dict, config_to_dict, load_config
from diloco.errors import ConfigError, DilocoError, TopologyError

__all__ = [
    "RayLaunchError",
    "RayResourceError",
    "WorkerPlan",
    "add_arguments",
    "check_resources",
    "choose_resume",
    "fit_error",
    "launch_ray",
    "plan_workers",
    "run_from_args",
]

RAY_MISSING = "Ray is not installed; install it with: pip install -e '.[ray]'"
#: Seconds between the Ray Train controller's polls of the workers, unless
#: ``RAY_TRAIN_HEALTH_CHECK_INTERVAL_S`` is set (Ray's default, 2 s, holds every report up to 2 s).
HEALTH_CHECK_INTERVAL_S = "0.5"
#: Ray metrics reported on every log step (when present in the record).
REPORTED = ("step", "outer_step", "loss", "val_loss", "tokens_per_s", "lr")


class RayLaunchError(DilocoError):
    """The Ray job could not be started, or its workers failed for good."""


class RayResourceError(TopologyError):
    """The cluster cannot place G·S workers with the requested resources."""


# ---------------------------------------------------------------------------------------------
# planning (no Ray needed)


@dataclass(frozen=True)
class WorkerPlan:
    """The Ray workers of a config: ``workers`` = G·S, each with ``resources``."""

    groups: int
    shards: int
    use_gpu: bool
    cpus_per_worker: float
    backend: str

    @property
    def workers(self) -> int:
        return self.groups * self.shards

    @property
    def resources(self) -> dict[str, float]:
        res = {"CPU": self.cpus_per_worker}
        if self.use_gpu:
            res["GPU"] = 1.0
        return res


def plan_workers(
    cfg: Config, cpus_per_worker: float = 1.0, gpus_available: bool = False
) -> WorkerPlan:
    """G·S workers, one GPU each if ``run.device`` is cuda (or auto and GPUs are available).

    Raises:
        TopologyError: ``topology.backend=nccl`` without GPUs.
    """
    if cpus_per_worker <= 0:
        raise RayLaunchError(f"--cpus-per-worker must be > 0, got {cpus_per_worker}")
    device = cfg.run.device
    use_gpu = device == "cuda" or (device == "auto" and gpus_available)
    backend = cfg.topology.backend
    if backend == "auto":
        backend = "nccl" if use_gpu else "gloo"
    if backend == "nccl" and not use_gpu:
        raise TopologyError(
            f"topology.backend=nccl needs GPU workers but run.device is {device} and the "
            "cluster has no GPUs; use topology.backend=gloo or run on GPUs"
        )
    G, S = cfg.topology.groups, cfg.topology.shards
    return WorkerPlan(G, S, use_gpu, float(cpus_per_worker), backend)


def _fmt(x: float) -> str:
    return f"{x:g}"


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def check_resources(plan: WorkerPlan, nodes: Sequence[Mapping[str, float]]) -> str | None:
    """Raise if the alive ``nodes`` (their total resources) cannot hold every worker.

    A worker needs all of ``plan.resources`` on one node, so node n holds
    min over r of floor(node[r] / need[r]) workers. Returns a warning when the workers fit but
    not every group fits on one node (FSDP traffic would cross nodes), else None.

    Raises:
        RayResourceError: one line: what is needed, what the cluster has, what to change.
    """
    need = plan.resources

    def capacity(node: Mapping[str, float]) -> int:
        return min(int(node.get(r, 0.0) / amount + 1e-9) for r, amount in need.items())

    caps = [capacity(n) for n in nodes]
    if sum(caps) >= plan.workers:
        per_node_groups = sum(c // plan.shards for c in caps)
        if plan.shards > 1 and per_node_groups < plan.groups:
            return (
                f"the cluster's nodes hold only {_count(per_node_groups, 'whole group')} of "
                f"{plan.shards} workers: some of the {plan.groups} groups will span nodes "
                "(their FSDP traffic crosses the network)"
            )
        return None
    layout = f"{_count(plan.groups, 'group')} × {_count(plan.shards, 'shard')}"
    for r, amount in need.items():
        total = sum(n.get(r, 0.0) for n in nodes)
        wanted = amount * plan.workers
        if total < wanted:
            raise RayResourceError(
                f"needs {_fmt(wanted)} {r}s for {layout} ({_fmt(amount)} {r} per worker), the "
                f"cluster has {_fmt(total)}; lower topology.groups/shards"
                f"{' or --cpus-per-worker' if r == 'CPU' else ''}, or add nodes"
            )
    need_text = ", ".join(f"{_fmt(v)} {k}" for k, v in need.items())
    raise RayResourceError(
        f"the cluster's nodes can hold only {sum(caps)} of the {plan.workers} workers for "
        f"{layout} (each needs {need_text} on one node); lower --cpus-per-worker or "
        "topology.groups/shards, or add nodes"
    )


# ---------------------------------------------------------------------------------------------
# the driver


def _import_ray():
    try:
        import ray
        import ray.train  # noqa: F401
        import ray.train.torch  # noqa: F401
    except ImportError:
        raise RayLaunchError(RAY_MISSING) from None
    return ray


#: Forwarded worker log lines the driver skips (``RAY_DEDUP_LOGS_SKIP_REGEX``; set it, or
#: ``RAY_DEDUP_LOGS=0``, to see everything): Ray Train's two INFO lines per report and worker,
#: and, without a dashboard (``ray[train]`` has none), its placement-group cleaner's warning
#: every second that the State API is missing.
QUIET_LINES = (
    r"Reporting training result \d+: |Checkpoint successfully created at: |"
    r"Failed to query Ray Train Controller actor state"
)


def _ray_env(local: bool) -> None:
    """Environment Ray reads when it is imported (set on the imported modules if it already was).

    Always: skip :data:`QUIET_LINES` in forwarded logs. Local mode: advertise 127.0.0.1 (so
    MASTER_ADDR is loopback), send no usage statistics, and start no preemption watcher (one
    process less; a private one-machine cluster has no node to preempt).
    """
    os.environ.setdefault("RAY_DEDUP_LOGS_SKIP_REGEX", QUIET_LINES)
    if local:
        os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    constants = sys.modules.get("ray._private.ray_constants")
    if constants is not None:
        if local:
            constants.ENABLE_RAY_CLUSTER = False
        logs = sys.modules.get("ray._private.ray_logging")
        for dedup in (
            getattr(logs, "stdout_deduplicator", None),
            getattr(logs, "stderr_deduplicator", None),
        ):
            if dedup is not None and getattr(dedup, "skip_re", None) is None:
                dedup.skip_re = re.compile(os.environ["RAY_DEDUP_LOGS_SKIP_REGEX"])


def _ray_tmpdir() -> str:
    path = os.environ.get("RAY_TMPDIR") or f"/tmp/ray-{os.getuid()}"
    os.environ["RAY_TMPDIR"] = path
    Path(path).mkdir(parents=True, exist_ok=True)
    return path


def _local_gpus() -> int:
    try:
        import torch

        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    except Exception:  # a broken CUDA install: the job then runs on CPUs
        return 0


def _worker_env(plan: WorkerPlan) -> dict[str, str]:
    """Environment of the Ray workers: thread count, unbuffered logs, diloco's test hooks."""
    env = {
        "OMP_NUM_THREADS": os.environ.get(
            "OMP_NUM_THREADS", str(max(1, int(plan.cpus_per_worker)))
        ),
        "PYTHONUNBUFFERED": "1",
        "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",  # diloco's stderr lines once, as written
    }
    env.update({k: v for k, v in os.environ.items() if k.startswith("DILOCO_")})
    return env


def _run_name(out_dir: Path) -> str:
    return f"{out_dir.name or 'run'}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"


def _node_resources(ray) -> list[dict[str, float]]:
    return [dict(n["Resources"]) for n in ray.nodes() if n.get("Alive")]


def _prepare_resume(cfg: Config, resume: str | None, force: bool) -> tuple[str | None, bool]:
    """Check ``--resume``/``--force`` in the driver (fail before any worker starts).

    ``never`` is settled here (refused, or the old checkpoints set aside with ``--force``), so
    the workers continue with auto semantics. Returns the (resume, force) of the first attempt.
    """
    from diloco.resume import plan_resume

    if resume == "never":
        plan_resume(cfg, "never", force, is_main=True)
        return None, False
    plan_resume(cfg, resume, force, is_main=False)  # read-only: missing/incompatible → error
    return resume, force


def launch_ray(
    cfg: Config,
    address: str | None = None,
    resume: str | None = None,
    force: bool = False,
    max_failures: int = 2,
    cpus_per_worker: float = 1.0,
    storage_path: str | None = None,
) -> dict[str, Any]:
    """Train ``cfg`` on G·S Ray workers; returns the run's summary (``summary.json``).

    ``address``: ``local`` (start a private Ray on this machine and stop it at the end),
    ``auto`` (the running cluster), ``ray://host:port`` or ``host:port``; None: ``RAY_ADDRESS``
    if set, else ``local``. If this process is already connected to Ray, that connection is used.
    ``storage_path``: where Ray keeps its copies of the reported checkpoints (default
    ``RUN_DIR/ray``; any ``pyarrow`` URI such as ``s3://…`` works).

    Raises:
        RayResourceError: the cluster cannot place the workers.
        RayLaunchError: Ray is missing, or the job failed after ``max_failures`` restarts.
        DilocoError: a worker's user error (bad corpus, incompatible checkpoint, …).
    """
    if max_failures < 0:
        raise RayLaunchError(f"--max-failures must be >= 0, got {max_failures}")
    resume, force = _prepare_resume(cfg, resume, force)
    address = address or os.environ.get("RAY_ADDRESS") or "local"
    connected = "ray" in sys.modules and sys.modules["ray"].is_initialized()
    local = address == "local" and not connected  # a private Ray, started (and stopped) here
    _ray_env(local)
    if local:
        gpus = _local_gpus()
        plan = plan_workers(cfg, cpus_per_worker, gpus_available=gpus > 0)
        # The cluster is sized from the topology; only GPUs can be missing.
        check_resources(plan, [{"CPU": plan.cpus_per_worker * plan.workers, "GPU": float(gpus)}])
    ray = _import_ray()
    started = False
    t0 = time.perf_counter()
    if not ray.is_initialized():
        if local:
            ray.init(
                address="local",
                num_cpus=int(plan.cpus_per_worker * plan.workers + 0.999),
                num_gpus=gpus,
                include_dashboard=False,
                object_store_memory=256 * 2**20,
                _temp_dir=_ray_tmpdir(),
            )
        else:
            ray.init(address=address)
        started = True
    init_s = time.perf_counter() - t0
    try:
        nodes = _node_resources(ray)
        if not local:
            gpus_seen = sum(n.get("GPU", 0.0) for n in nodes) > 0
            plan = plan_workers(cfg, cpus_per_worker, gpus_available=gpus_seen)
        note = check_resources(plan, nodes)
        if note:
            print(f"diloco: warning: {note}", file=sys.stderr, flush=True)
        return _fit(ray, cfg, plan, resume, force, max_failures, storage_path, init_s)
    finally:
        if started:
            ray.shutdown()


def _fit(
    ray,
    cfg: Config,
    plan: WorkerPlan,
    resume: str | None,
    force: bool,
    max_failures: int,
    storage_path: str | None,
    init_s: float,
) -> dict[str, Any]:
    from ray.train import (
        CheckpointConfig,
        FailureConfig,
        RunConfig,
        ScalingConfig,
    )
    from ray.train.torch import TorchConfig, TorchTrainer

    out_dir = Path(cfg.run.out_dir).absolute()
    name = _run_name(out_dir)
    ray_dir = out_dir / "ray"
    try:
        ray_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(
            f"run.out_dir={str(out_dir)!r} is not writable ({e.strerror}); choose another directory"
        ) from None
    config = config_to_dict(cfg)
    config["run"]["out_dir"] = str(out_dir)  # absolute: not part of the resume fingerprint
    trainer = TorchTrainer(
        _train_worker,
        train_loop_config={
            "config": config,
            "resume": resume,
            "force": force,
            "cwd": os.getcwd(),
            "ray_dir": str(ray_dir),
            "run_name": name,
        },
        torch_config=TorchConfig(backend=plan.backend, timeout_s=cfg.topology.timeout_s),
        scaling_config=ScalingConfig(
            num_workers=plan.workers,
            use_gpu=plan.use_gpu,
            resources_per_worker=plan.resources,
            placement_strategy="PACK",
        ),
        run_config=RunConfig(
            name=name,
            storage_path=storage_path or str(ray_dir),
            failure_config=FailureConfig(max_failures=max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.train.keep_last),
            worker_runtime_env={"env_vars": _worker_env(plan)},
        ),
    )
    # Ray's controller polls each worker for one report per interval (default 2 s); this run
    # reports once per log step. Ray passes the variable on to the controller and the workers.
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", HEALTH_CHECK_INTERVAL_S)
    print(
        f"diloco: Ray run {name}: {plan.workers} workers ({_count(plan.groups, 'group')} × "
        f"{_count(plan.shards, 'shard')}, {plan.resources} each, {plan.backend}); Ray connected "
        f"in {init_s:.1f} s",
        file=sys.stderr,
        flush=True,
    )
    t0 = time.perf_counter()
    try:
        trainer.fit()
    except Exception as e:
        raise fit_error(e, max_failures) from None
    finally:  # snapshots whose upload a failure cut short
        shutil.rmtree(ray_dir / f"{name}.staging", ignore_errors=True)
    summary_path = out_dir / "summary.json"  # rank 0's; the driver adds Ray's two timings
    summary = json.loads(summary_path.read_text(encoding="utf-8"))
    summary["ray_init_s"] = init_s
    summary["ray_fit_s"] = time.perf_counter() - t0
    summary_path.write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def fit_error(e: BaseException, max_failures: int) -> DilocoError:
    """One line for a failed ``fit()``: a worker's DilocoError as it is, else what died where."""
    failures = getattr(e, "worker_failures", None) or {}
    for _rank, err in sorted(failures.items()):
        found = _find_diloco_error(err)
        if found is not None:
            return found
    if failures:
        rank, err = sorted(failures.items())[0]
        what = " ".join(str(err).split())[:300]
        return RayLaunchError(
            f"Ray workers failed after {max_failures} restart(s) (--max-failures); rank {rank}: "
            f"{type(err).__name__}: {what}"
        )
    return RayLaunchError(
        f"Ray training failed: {type(e).__name__}: {' '.join(str(e).split())[:300]}"
    )


def _find_diloco_error(err: BaseException | None) -> DilocoError | None:
    """The DilocoError behind a (possibly wrapped) worker exception, if any."""
    seen = 0
    while err is not None and seen < 8:
        if isinstance(err, DilocoError):
            return err
        err = getattr(err, "cause", None) or err.__cause__ or err.__context__
        seen += 1
    return None


# ---------------------------------------------------------------------------------------------
# the workers


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
    from diloco.resume import newest_checkpoint, read_meta

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
        print(f"diloco: Ray restart: resuming from {label} (step {step})", file=sys.stderr)
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
        faults.after_ray_checkpoint(meta["round"], self.rank, self.world, self.attempt)


def _report_placement(rank: int, shards: int) -> None:
    """Each node's first worker prints which ranks and groups it holds, and warns if a group
    spans nodes (Ray Train gives a node's workers contiguous ranks)."""
    if os.environ.get("LOCAL_RANK", "0") != "0":
        return
    import ray

    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    last = rank + local_world - 1
    print(
        f"diloco: node {ray.util.get_node_ip_address()}: ranks {rank}-{last}, "
        f"groups {rank // shards}-{last // shards}",
        file=sys.stderr,
        flush=True,
    )
    if rank % shards or local_world % shards:
        print(
            f"diloco: warning: this node runs {local_world} workers, not a multiple of "
            f"topology.shards={shards}: a group spans nodes and its FSDP traffic crosses the "
            "network",
            file=sys.stderr,
            flush=True,
        )


def _train_worker(config: dict[str, Any]) -> None:
    """The Ray Train worker function: the same ``train()`` as ``diloco train``."""
    from diloco.train import train

    cwd = config.get("cwd")
    if cwd and os.path.isdir(cwd):
        os.chdir(cwd)  # relative paths in the config mean what they meant for the driver
    cfg = config_from_dict(config["config"])
    rank = int(os.environ.get("RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    _report_placement(rank, cfg.topology.shards)
    ray_dir, name = Path(config["ray_dir"]), config["run_name"]
    attempt = _count_attempt(ray_dir / f"{name}.attempts", rank)
    first = (config["resume"], config["force"])
    if attempt == 0:
        resume, force = first
    else:
        resume, force = choose_resume(
            Path(cfg.run.out_dir), _ray_checkpoint_dir(), first, rank == 0
        )
    reporter = _RayReporter(rank, world, attempt, ray_dir / f"{name}.staging")
    try:
        train(cfg, resume=resume, force=force, on_log=reporter.on_log,
              on_checkpoint=reporter.on_checkpoint)  # fmt: skip
    except DilocoError as e:
        print(f"diloco: error: {e}", file=sys.stderr, flush=True)
        raise


# ---------------------------------------------------------------------------------------------
# command line


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``diloco launch ray`` (besides --config/--set)."""
    p.add_argument(
        "--address",
        help="local = start a private Ray here (stopped at the end), auto = the running "
        "cluster, or ray://HOST:PORT / HOST:PORT (default: $RAY_ADDRESS, else local)",
    )
    p.add_argument(
        "--resume",
        metavar="auto|never|PATH",
        help="as for diloco train (first attempt; Ray restarts resume from the newest checkpoint)",
    )
    p.add_argument("--force", action="store_true", help="as for diloco train")
    p.add_argument(
        "--max-failures",
        type=int,
        default=2,
        help="worker-group restarts after a failure (Ray FailureConfig; default: %(default)s)",
    )
    p.add_argument(
        "--cpus-per-worker",
        type=float,
        default=1.0,
        help="CPUs Ray reserves per worker (default: %(default)s); also the workers' "
        "OMP_NUM_THREADS unless that is set",
    )
    p.add_argument(
        "--storage-path",
        help="where Ray keeps its copies of the reported checkpoints (default: RUN_DIR/ray; "
        "a path on shared storage or s3://… on a multi-node cluster)",
    )


def run_from_args(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    summary = launch_ray(
        cfg,
        address=args.address,
        resume=args.resume,
        force=args.force,
        max_failures=args.max_failures,
        cpus_per_worker=args.cpus_per_worker,
        storage_path=args.storage_path,
    )
    print(
        f"final val loss {summary['final_val_loss']:.4f} after {summary['steps']} steps "
        f"({summary['tokens']} tokens, {summary['wall_s']:.1f} s; Ray start "
        f"{summary['ray_init_s']:.1f} s, fit {summary['ray_fit_s']:.1f} s); outputs in "
        f"{cfg.run.out_dir}"
    )
    return 0
