"""Running the benchmark's trainings: cached, several at once, on a fixed number of CPU slots.

A run is one :func:`diloco.job.train.train` call (G=1, in a worker process of a pool) or one
``torchrun`` job of G ranks (G>1, launched from the calling thread), writing into
``OUT/runs/<key>``. ``key`` hashes the run's resolved config, so a run whose ``summary.json``
(or, for a diverged run, ``failed.json``) exists is read back instead of run again: an
interrupted benchmark continues where it stopped.

Concurrency: the machine is divided into ``jobs`` slots of ``threads`` torch threads each. A
G=1 run takes one slot, a G-rank run ``min(G, jobs)``. Slots are handed out strictly in
priority order (tuning runs first, so that dependent tuning stages start early; then the most
expensive runs first, so the tail is short); a run needing two slots waits at the head of the
queue rather than being overtaken forever. Results do not depend on ``jobs``: every run is
seeded and single-process runs use the same thread count as before.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import json
import math
import multiprocessing
import os
import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path
from typing import Any

from diloco.bench.spec import RunSpec, settings_label
from diloco.config import config_from_dict, dump_config
from diloco.errors import DilocoError
from diloco.launchers.local import child_env, torchrun_cmd

__all__ = ["Runner", "execute", "load_result", "read_curve"]


class RunnerStopped(DilocoError):
    """The runner was stopped (another run failed): queued runs are not started."""


class _LaunchFailed(DilocoError):
    """A torchrun subprocess failed (not cached: the next invocation tries again)."""


class _Slots:
    """``capacity`` slots handed out in priority order (lowest first)."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self._free = capacity
        self._queue: list[tuple[Any, int]] = []
        self._tickets = itertools.count()
        self._cond = threading.Condition()
        self._stopped = False

    @contextlib.contextmanager
    def take(self, n: int, priority: Any) -> Iterator[None]:
        n = min(n, self.capacity)
        with self._cond:
            ticket = (priority, next(self._tickets))
            heapq.heappush(self._queue, ticket)
            while not self._stopped and (self._queue[0] != ticket or self._free < n):
                self._cond.wait()
            if self._stopped:
                self._queue.remove(ticket)
                heapq.heapify(self._queue)
                raise RunnerStopped("the benchmark stopped before this run started")
            heapq.heappop(self._queue)
            self._free -= n
            self._cond.notify_all()  # the next ticket may fit in what is left
        try:
            yield
        finally:
            with self._cond:
                self._free += n
                self._cond.notify_all()

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify_all()


class Runner:
    """Runs :class:`RunSpec` s into ``out/runs/<key>`` (``jobs`` at a time) and reads finished
    ones back from there. Thread-safe: call :meth:`run` / :meth:`run_all` from any thread.
    ``total`` is the runs planned, for the progress lines (``[n/total]``, ``[n/total+extra]``
    once grid extensions add runs)."""

    def __init__(
        self, out: Path, total: int, jobs: int, threads: int | None, log: Callable = print
    ):
        self.runs_dir = out / "runs"
        self.total = total
        self.jobs = jobs
        self.threads = threads
        self.log = log
        self.results: dict[str, dict[str, Any]] = {}
        self.executed = 0
        self.reused = 0
        self._lock = threading.Lock()
        self._pending: dict[str, Future] = {}
        self._slots = _Slots(jobs)
        self._pool = ProcessPoolExecutor(
            max_workers=jobs,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=_set_threads,
            initargs=(threads,),
        )

    def __enter__(self) -> Runner:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop queued runs; runs already started finish (and are cached)."""
        self._slots.stop()
        self._pool.shutdown(wait=True, cancel_futures=True)

    def run_all(self, specs: list[RunSpec]) -> list[dict[str, Any]]:
        """:meth:`run` every spec concurrently; results in the order of ``specs``."""
        if len(specs) <= 1:
            return [self.run(s) for s in specs]
        with ThreadPoolExecutor(max_workers=len(specs)) as threads:
            return list(threads.map(self.run, specs))

    def run(self, spec: RunSpec) -> dict[str, Any]:
        """The result of ``spec``: from memory, from its run directory, or by running it."""
        key = spec.key
        with self._lock:
            if key in self.results:
                return self.results[key]
            owner = key not in self._pending
            if owner:
                self._pending[key] = Future()
            pending = self._pending[key]
        if not owner:
            return pending.result()
        try:
            result = self._run_once(spec, key)
        except BaseException as e:
            pending.set_exception(e)
            raise
        pending.set_result(result)
        return result

    def _run_once(self, spec: RunSpec, key: str) -> dict[str, Any]:
        run_dir = self.runs_dir / key
        meta = {
            "key": key,
            "method": spec.method,
            "size": spec.size,
            "steps": spec.steps,
            "seed": spec.seed,
            "settings": spec.settings,
        }
        cached = load_result(run_dir)
        if cached is None:
            with self._slots.take(spec.groups, (not spec.tuning, -spec.cost())):
                if run_dir.exists():
                    shutil.rmtree(run_dir)  # an interrupted run: start it over
                if spec.groups == 1:
                    outcome = self._pool.submit(execute, spec.cfg, str(run_dir), 1).result()
                else:
                    outcome = execute(spec.cfg, str(run_dir), spec.groups, self.threads)
            note = f"{outcome['wall_s']:.1f} s"
        else:
            outcome, note = cached, "cached"
        result = {**meta, **outcome}
        with self._lock:
            self.results[key] = result
            if cached is None:
                self.executed += 1
            else:
                self.reused += 1
            n = self.executed + self.reused
        loss = result["final_val_loss"]
        shown = f"{loss:.4f}" if loss is not None else result["status"]
        counted = f"{self.total}" if n <= self.total else f"{self.total}+{n - self.total}"
        self.log(
            f"[{n}/{counted}] {spec.size} {spec.method} {spec.steps} steps seed {spec.seed} "
            f"{settings_label(spec.settings)} -> {shown} ({note})",
            flush=True,
        )
        return result


def _set_threads(threads: int | None) -> None:
    """Pool worker start-up: ``threads`` torch threads (``train`` honours OMP_NUM_THREADS)."""
    if threads:
        os.environ["OMP_NUM_THREADS"] = str(threads)
        import torch

        torch.set_num_threads(threads)


# --- one run -------------------------------------------------------------------------------------


def execute(
    cfg_dict: dict, run_dir: str, groups: int, threads: int | None = None
) -> dict[str, Any]:
    """Train ``cfg_dict`` into ``run_dir`` (in this process for one group, else by torchrun);
    a diverged run is a result like any other and is cached as ``failed.json``."""
    from diloco.algorithm.wrapper import NonFiniteError
    from diloco.config import Config

    path = Path(run_dir)
    cfg_dict = json.loads(json.dumps(cfg_dict))  # a private copy
    cfg_dict["run"]["out_dir"] = run_dir
    cfg: Config = config_from_dict(cfg_dict)
    start = time.perf_counter()
    try:
        if groups == 1:
            from diloco.job.train import train

            train(cfg)
        else:
            _launch(cfg, groups, path, threads)
    except NonFiniteError as e:
        failed = {
            "status": "diverged",
            "final_val_loss": None,
            "tokens": 0,
            "wall_s": time.perf_counter() - start,
            "curve": read_curve(path),
            "error": str(e),
        }
        path.mkdir(parents=True, exist_ok=True)
        (path / "failed.json").write_text(json.dumps(failed, indent=1) + "\n")
        return failed
    except _LaunchFailed as e:  # not cached: the next invocation tries again
        return {
            "status": "failed",
            "final_val_loss": None,
            "tokens": 0,
            "wall_s": time.perf_counter() - start,
            "curve": [],
            "error": str(e),
        }
    result = load_result(path)
    assert result is not None, f"{run_dir}: training returned without a summary.json"
    return result


def load_result(run_dir: Path) -> dict[str, Any] | None:
    """A finished run's result read from its directory, or None if it has not finished."""
    summary, failed = run_dir / "summary.json", run_dir / "failed.json"
    if failed.exists():
        return json.loads(failed.read_text())
    if not summary.exists():
        return None
    s = json.loads(summary.read_text())
    final = _finite_or_none(s["final_val_loss"])
    return {
        "status": "ok" if final is not None else "diverged",
        "final_val_loss": final,
        "tokens": s["tokens"],
        "wall_s": s["wall_s"],
        "groups": s.get("groups", 1),
        "curve": read_curve(run_dir),
    }


def read_curve(run_dir: Path) -> list[list[float]]:
    """``[step, tokens, val_loss]`` of every evaluation in ``metrics.jsonl``."""
    from diloco.job.metrics import read_metrics

    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [
        [r["step"], r["tokens"], float(r["val_loss"])]
        for r in read_metrics(path)
        if "val_loss" in r
    ]


def _finite_or_none(x: Any) -> float | None:
    return float(x) if isinstance(x, (int, float)) and math.isfinite(x) else None


def _launch(cfg: Any, nproc: int, run_dir: Path, threads: int | None) -> None:
    """One ``torchrun --nproc-per-node nproc -m diloco train`` run (G groups of S=1)."""
    from diloco.algorithm.wrapper import NonFiniteError

    run_dir.mkdir(parents=True, exist_ok=True)
    launch_cfg = run_dir / "launch.yaml"
    dump_config(cfg, launch_cfg)
    cmd = torchrun_cmd(nproc, "-m", "diloco", "train", "--config", str(launch_cfg))
    env = child_env({"OMP_NUM_THREADS": str(threads or 1)})
    log_path = run_dir / "launch.log"
    with open(log_path, "w", encoding="utf-8") as log:
        rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env).returncode
    summary = run_dir / "summary.json"
    if rc != 0 or not summary.exists():
        lines = log_path.read_text(errors="replace").strip().splitlines()
        diverged = [line for line in lines if "pseudo-gradient was non-finite" in line]
        if diverged:  # a rank stopped on NonFiniteError: a result, cached like in-process
            raise NonFiniteError(diverged[-1])
        raise _LaunchFailed(f"torchrun exited with {rc}: {' | '.join(lines[-3:])}")
    groups = json.loads(summary.read_text()).get("groups", 1)
    if groups != nproc:
        summary.unlink()
        raise _LaunchFailed(f"the run reports groups={groups}, not {nproc}")
