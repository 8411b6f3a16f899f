"""``diloco launch ray``: Ray places and supervises the G·S workers; the training is ``train()``.

What Ray adds over ``torchrun`` and what it does not change:

* **Placement.** A Ray Train ``TorchTrainer`` with ``ScalingConfig(num_workers=G·S,
  resources_per_worker={"CPU": c[, "GPU": 1]}, placement_strategy="PACK")``. Ray Train gives
  the workers of one node contiguous world ranks, and a group is the contiguous block of ranks
  g·S … g·S+S−1 (:mod:`diloco.comm.topology`), so **a group stays on one node whenever every node
  holds a multiple of S workers** (PACK fills nodes first). Each node's rank 0 checks this and
  warns if a group spans nodes (its FSDP traffic would then cross the network).
* **Process group.** ``TorchConfig(backend=gloo|nccl, timeout_s=topology.timeout_s)`` creates
  it and sets RANK/WORLD_SIZE/LOCAL_RANK; :func:`diloco.comm.topology.init_runtime` then builds the
  (G, S) mesh on it. The worker function is :func:`diloco.job.train.train`, unchanged: rank 0 writes
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

* **Elastic groups** (``--elastic`` or ``topology.elastic``): one Ray Train run per worker group
  and a coordinator actor; a failed group restarts alone (:mod:`diloco.launchers.ray_elastic`).

Before ``fit()`` the cluster's resources are checked
(:func:`diloco.launchers.ray_plan.check_resources`): a job that cannot be placed fails at once
with one line instead of waiting for resources forever. The worker function is
:func:`diloco.launchers.ray_worker.train_worker`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from diloco.config import Config, config_to_dict, load_config
from diloco.errors import ConfigError, DilocoError
from diloco.files import read_json, write_text_atomic
from diloco.job.elastic import group_config
from diloco.launchers.ray_env import (
    check_reachable,
    import_ray,
    local_gpus,
    ray_env,
    ray_tmpdir,
)
from diloco.launchers.ray_plan import (
    RayLaunchError,
    WorkerPlan,
    check_resources,
    failure_detail,
    find_diloco_error,
    plan_workers,
)
from diloco.launchers.ray_worker import train_worker

__all__ = ["add_arguments", "fit_error", "launch_ray", "run_from_args"]

#: Seconds between the Ray Train controller's polls of the workers, unless
#: ``RAY_TRAIN_HEALTH_CHECK_INTERVAL_S`` is set (Ray's default, 2 s, holds every report up to 2 s).
HEALTH_CHECK_INTERVAL_S = "0.5"


# ---------------------------------------------------------------------------------------------
# the driver


def _worker_env(plan: WorkerPlan) -> dict[str, str]:
    """Environment of the Ray workers: thread count, unbuffered logs, torchft's log level,
    diloco's test hooks."""
    env = {
        "OMP_NUM_THREADS": os.environ.get(
            "OMP_NUM_THREADS", str(max(1, int(plan.cpus_per_worker)))
        ),
        "PYTHONUNBUFFERED": "1",
        "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",  # diloco's stderr lines once, as written
        "RUST_LOG": os.environ.get("RUST_LOG", "warn"),  # torchft's clients (elastic groups)
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
    from diloco.persist.resume import plan_resume

    if resume == "never":
        plan_resume(cfg, "never", force, is_main=True)
        return None, False
    plan_resume(cfg, resume, force, is_main=False)  # read-only: missing/incompatible → error
    return resume, force


def _prepare_group_resume(cfg: Config, resume: str | None, force: bool) -> tuple[str | None, bool]:
    """:func:`_prepare_resume` for every elastic group's own run directory (``RUN_DIR/group<g>``).

    Raises:
        ConfigError: ``--resume PATH`` (each group resumes its own checkpoints).
    """
    if resume not in (None, "auto", "never"):
        raise ConfigError(
            f"--resume {resume} does not fit elastic groups: each group resumes its own "
            "RUN_DIR/group<g>/checkpoints; use --resume auto or never"
        )
    first = (resume, force)
    for g in range(cfg.topology.groups):
        topology = dataclasses.replace(cfg.topology, group_id=g)
        first = _prepare_resume(group_config(dataclasses.replace(cfg, topology=topology)),
                                resume, force)  # fmt: skip
    return first


def launch_ray(
    cfg: Config,
    address: str | None = None,
    resume: str | None = None,
    force: bool = False,
    max_failures: int = 2,
    cpus_per_worker: float = 1.0,
    storage_path: str | None = None,
    coordinator_port: int = 0,
) -> dict[str, Any]:
    """Train ``cfg`` on G·S Ray workers; returns the run's summary (``summary.json``).

    ``topology.elastic``: one Ray Train run per group and a coordinator actor
    (:mod:`diloco.launchers.ray_elastic`; ``coordinator_port``: its port, 0 = a free one); the
    summary is then group 0's with ``restarts`` per group (each group's is in its directory).

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
    elastic = cfg.topology.elastic
    address = address or os.environ.get("RAY_ADDRESS") or "local"
    if elastic and address.startswith("ray://"):
        raise RayLaunchError(
            "elastic groups need the driver on a cluster node (the coordinator runs on it): "
            "use --address auto there, or ray job submit, not Ray Client (ray://)"
        )
    resume, force = (_prepare_group_resume if elastic else _prepare_resume)(cfg, resume, force)
    connected = "ray" in sys.modules and sys.modules["ray"].is_initialized()
    local = address == "local" and not connected  # a private Ray, started (and stopped) here
    ray_env(local)
    if local:
        gpus = local_gpus()
        plan = plan_workers(cfg, cpus_per_worker, gpus_available=gpus > 0)
        # The cluster is sized from the topology; only GPUs can be missing.
        cluster = [{"CPU": plan.cpus_per_worker * plan.workers, "GPU": float(gpus)}]
        check_resources(plan, cluster, whole_groups=elastic)
    elif not connected:
        check_reachable(address)
    ray = import_ray()
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
                _temp_dir=ray_tmpdir(),
            )
        else:
            try:
                ray.init(address=address)
            except (ConnectionError, RuntimeError) as e:
                lines = [line for line in str(e).splitlines() if line.strip()]
                raise RayLaunchError(
                    f"cannot connect to Ray at --address {address}: "
                    f"{lines[-1].strip() if lines else type(e).__name__}"
                ) from None
        started = True
    init_s = time.perf_counter() - t0
    try:
        nodes = _node_resources(ray)
        if not local:
            gpus_seen = sum(n.get("GPU", 0.0) for n in nodes) > 0
            plan = plan_workers(cfg, cpus_per_worker, gpus_available=gpus_seen)
        note = check_resources(plan, nodes, whole_groups=elastic)
        if note:
            print(f"diloco: warning: {note}", file=sys.stderr, flush=True)
        run = (resume, force, max_failures, storage_path)
        return _fit(ray, cfg, plan, run, init_s, coordinator_port)
    finally:
        if started:
            ray.shutdown()


def _fit(
    ray,
    cfg: Config,
    plan: WorkerPlan,
    run: tuple[str | None, bool, int, str | None],
    init_s: float,
    coordinator_port: int,
) -> dict[str, Any]:
    """``fit()`` the job (``run``: resume, force, max_failures, storage_path); its summary."""
    from ray.train import (
        CheckpointConfig,
        FailureConfig,
        RunConfig,
        ScalingConfig,
    )
    from ray.train.torch import TorchConfig, TorchTrainer

    resume, force, max_failures, storage_path = run
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

    def make_trainer(
        run_name: str, workers: int, placement: str, topology: dict[str, Any], env: dict[str, str]
    ) -> TorchTrainer:
        return TorchTrainer(
            train_worker,
            train_loop_config={
                "config": {**config, "topology": {**config["topology"], **topology}},
                "resume": resume,
                "force": force,
                "cwd": os.getcwd(),
                "ray_dir": str(ray_dir),
                "run_name": run_name,
            },
            torch_config=TorchConfig(backend=plan.backend, timeout_s=cfg.topology.timeout_s),
            scaling_config=ScalingConfig(
                num_workers=workers,
                use_gpu=plan.use_gpu,
                resources_per_worker=plan.resources,
                placement_strategy=placement,
            ),
            run_config=RunConfig(
                name=run_name,
                storage_path=storage_path or str(ray_dir),
                failure_config=FailureConfig(max_failures=max_failures),
                checkpoint_config=CheckpointConfig(num_to_keep=cfg.train.keep_last),
                worker_runtime_env={"env_vars": {**_worker_env(plan), **env}},
            ),
        )

    # Ray's controller polls each worker for one report per interval (default 2 s); this run
    # reports once per log step. Ray passes the variable on to the controller and the workers.
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", HEALTH_CHECK_INTERVAL_S)
    if cfg.topology.elastic:
        from diloco.launchers.ray_elastic import run_groups

        return run_groups(
            ray, cfg, plan, name, ray_dir, make_trainer, max_failures, init_s, coordinator_port
        )
    trainer = make_trainer(name, plan.workers, "PACK", {}, {})
    print(
        f"diloco: Ray run {name}: {plan.workers} workers ({plan.layout}, "
        f"{plan.resources} each, {plan.backend}); Ray connected "
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
    summary = read_json(summary_path)
    summary["ray_init_s"] = init_s
    summary["ray_fit_s"] = time.perf_counter() - t0
    write_text_atomic(summary_path, json.dumps(summary, indent=2) + "\n")
    return summary


def fit_error(e: BaseException, max_failures: int) -> DilocoError:
    """One line for a failed ``fit()``: a worker's DilocoError as it is, else what died where."""
    failures = getattr(e, "worker_failures", None) or {}
    for _rank, err in sorted(failures.items()):
        found = find_diloco_error(err)
        if found is not None:
            return found
    if failures:
        return RayLaunchError(
            f"Ray workers failed after {max_failures} restart(s) (--max-failures); "
            f"{failure_detail(e)}"
        )
    return RayLaunchError(f"Ray training failed: {failure_detail(e)}")


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
        help="worker-group restarts after a failure (Ray FailureConfig; with --elastic per "
        "group; default: %(default)s)",
    )
    p.add_argument(
        "--cpus-per-worker",
        type=float,
        default=1.0,
        help="CPUs Ray reserves per worker (default: %(default)s); also the workers' "
        "OMP_NUM_THREADS unless that is set",
    )
    p.add_argument(
        "--elastic",
        action="store_true",
        help="topology.elastic=true: one Ray Train run per worker group (its workers on one "
        "node) and a coordinator actor; a failed group restarts alone (docs/ray.md)",
    )
    p.add_argument(
        "--coordinator-port",
        type=int,
        default=0,
        metavar="PORT",
        help="elastic: the coordinator's port on the driver's node (PORT+1 too; default: free)",
    )
    p.add_argument(
        "--storage-path",
        help="where Ray keeps its copies of the reported checkpoints (default: RUN_DIR/ray; "
        "a path on shared storage or s3://… on a multi-node cluster)",
    )


#: Placeholders that let an elastic config load in the driver; each group gets its own.
ELASTIC_PROBE = ("topology.group_id=0", "topology.coordinator=127.0.0.1:1")


def _load(args: argparse.Namespace) -> Config:
    """The job's config; with ``--elastic`` or ``topology.elastic: true`` in it, loaded with
    :data:`ELASTIC_PROBE` (the per-group keys the launcher sets)."""
    if args.elastic:
        return load_config(args.config, [*args.overrides, "topology.elastic=true", *ELASTIC_PROBE])
    try:
        return load_config(args.config, args.overrides)
    except ConfigError as e:
        try:  # the config itself may ask for elastic groups
            cfg = load_config(args.config, [*args.overrides, *ELASTIC_PROBE])
        except ConfigError:
            raise e from None
        if not cfg.topology.elastic:
            raise e from None
        return cfg


def run_from_args(args: argparse.Namespace) -> int:
    cfg = _load(args)
    summary = launch_ray(
        cfg,
        address=args.address,
        resume=args.resume,
        force=args.force,
        max_failures=args.max_failures,
        cpus_per_worker=args.cpus_per_worker,
        storage_path=args.storage_path,
        coordinator_port=args.coordinator_port,
    )
    restarts = f"; restarts per group {summary['restarts']}" if "restarts" in summary else ""
    print(
        f"final val loss {summary['final_val_loss']:.4f} after {summary['steps']} steps "
        f"({summary['tokens']} tokens, {summary['wall_s']:.1f} s; Ray start "
        f"{summary['ray_init_s']:.1f} s, fit {summary['ray_fit_s']:.1f} s{restarts}); outputs "
        f"in {cfg.run.out_dir}"
    )
    return 0
