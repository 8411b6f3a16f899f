"""Placing a ``diloco launch ray`` job: G·S workers and the resources each needs (no Ray needed).

:func:`plan_workers` turns the topology and the per-worker CPU/GPU request into a
:class:`WorkerPlan`; :func:`check_resources` says, before ``fit()``, whether a cluster (its
nodes' resources) can place it, so that a job that cannot be placed fails at once with one line
instead of waiting for resources forever. :func:`failure_detail` says in one line why a
``fit()`` failed.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from diloco.config import Config
from diloco.errors import DilocoError, TopologyError

__all__ = [
    "RayLaunchError",
    "RayResourceError",
    "WorkerPlan",
    "check_resources",
    "failure_detail",
    "find_diloco_error",
    "plan_workers",
]


class RayLaunchError(DilocoError):
    """The Ray job could not be started, or its workers failed for good."""


class RayResourceError(TopologyError):
    """The cluster cannot place G·S workers with the requested resources."""


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

    @property
    def layout(self) -> str:
        """``2 groups × 2 shards``."""
        return f"{_count(self.groups, 'group')} × {_count(self.shards, 'shard')}"


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


def check_resources(
    plan: WorkerPlan, nodes: Sequence[Mapping[str, float]], whole_groups: bool = False
) -> str | None:
    """Raise if the alive ``nodes`` (their total resources) cannot hold every worker.

    A worker needs all of ``plan.resources`` on one node, so node n holds
    min over r of floor(node[r] / need[r]) workers. ``whole_groups`` (elastic groups, placed
    ``STRICT_PACK``): each group's S workers must also share one node, so node n holds
    floor(workers_n / S) groups. Returns a warning when the workers fit but not every group fits
    on one node (FSDP traffic would cross nodes), else None.

    Raises:
        RayResourceError: one line: what is needed, what the cluster has, what to change.
    """
    need = plan.resources

    def capacity(node: Mapping[str, float]) -> int:
        return min(int(node.get(r, 0.0) / amount + 1e-9) for r, amount in need.items())

    caps = [capacity(n) for n in nodes]
    per_node_groups = sum(c // plan.shards for c in caps)
    if sum(caps) >= plan.workers and not (whole_groups and per_node_groups < plan.groups):
        if plan.shards > 1 and per_node_groups < plan.groups:
            return (
                f"the cluster's nodes hold only {_count(per_node_groups, 'whole group')} of "
                f"{plan.shards} workers: some of the {plan.groups} groups will span nodes "
                "(their FSDP traffic crosses the network)"
            )
        return None
    layout = plan.layout
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
    if sum(caps) >= plan.workers:  # enough workers, but a group would have to span nodes
        raise RayResourceError(
            f"the cluster's nodes can hold only {per_node_groups} of the {layout} as whole "
            f"groups (elastic: a group's {plan.shards} workers share one node, each needs "
            f"{need_text}); lower topology.shards or --cpus-per-worker, or add larger nodes"
        )
    raise RayResourceError(
        f"the cluster's nodes can hold only {sum(caps)} of the {plan.workers} workers for "
        f"{layout} (each needs {need_text} on one node); lower --cpus-per-worker or "
        "topology.groups/shards, or add nodes"
    )


def find_diloco_error(err: BaseException | None) -> DilocoError | None:
    """The DilocoError behind a (possibly wrapped) worker exception, if any."""
    seen = 0
    while err is not None and seen < 8:
        if isinstance(err, DilocoError):
            return err
        err = getattr(err, "cause", None) or err.__cause__ or err.__context__
        seen += 1
    return None


def failure_detail(e: BaseException) -> str:
    """One line on a failed ``fit()``: a worker's DilocoError as it is, else what died where
    (``rank R: Type: message``; a long message, such as Ray's report of a dead worker, is cut to
    its first sentence and the worker's pid)."""
    failures = getattr(e, "worker_failures", None) or {}
    for _rank, err in sorted(failures.items()):
        found = find_diloco_error(err)
        if found is not None:
            return str(found)
    if failures:
        rank, err = sorted(failures.items())[0]
        return f"rank {rank}: {type(err).__name__}: {_brief(str(err))}"
    return f"{type(e).__name__}: {_brief(str(e))}"


def _brief(message: str, limit: int = 200) -> str:
    text = " ".join(message.split())
    if len(text) <= limit:
        return text
    pid = re.search(r"\bpid=(\d+)", text)
    return text.split(". ")[0][:limit] + (f" (worker pid {pid.group(1)})" if pid else "") + " …"
