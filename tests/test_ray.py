"""Specification of ``diloco launch ray``: Ray places and restarts the workers, the maths is
``diloco train``'s.

The end-to-end tests run real Ray (``--address local``: a private cluster on loopback) and real
torchrun on the CPU with a tiny model; the four jobs run side by side in one module fixture
(most of their time is Ray and torch start-up, not compute). The resume choice, the resource
check, the checkpoint snapshot and the error reporting are also tested as plain functions.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from helpers import child_env, run_cli, run_torchrun, same_fields, sets, tiny_overrides

from diloco.config import load_config
from diloco.errors import CheckpointError, DataError
from diloco.job.metrics import read_metrics
from diloco.launchers.ray_launcher import fit_error, launch_ray
from diloco.launchers.ray_plan import (
    RayLaunchError,
    RayResourceError,
    check_resources,
    plan_workers,
)
from diloco.launchers.ray_worker import choose_resume, stage_checkpoint
from diloco.testing import faults

pytest.importorskip("ray")

pytestmark = pytest.mark.slow

STEPS, K = 24, 4
TINY = tiny_overrides(
    STEPS,
    K,
    "train.eval_every=8",
    "train.log_every=4",
    "train.checkpoint_every=2",  # rounds 2, 4, 6 = steps 8, 16, 24
    "topology.groups=2",
)
TIMEOUT_S = 420
# Three jobs share two busy cores here: give Ray Train's worker group more than its default 60 s
# to start (imports in every worker process) before it counts a failed start.
RAY_ENV = {"RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "300"}


def ray_launch(out: Path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return run_cli(
        "launch", "ray", *sets([*TINY, f"run.out_dir={out}"]), "--address", "local", *args,
        env={**RAY_ENV, **(env or {})}, timeout=TIMEOUT_S,
    )  # fmt: skip


def on_small_cluster(out: Path) -> subprocess.CompletedProcess:
    """``diloco launch ray`` for a 2×2 job in a driver already connected to a 1-CPU Ray."""
    argv = ["launch", "ray", *sets([*TINY, "topology.shards=2", f"run.out_dir={out}"])]
    script = textwrap.dedent(f"""
        import os, sys
        os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
        import ray
        ray.init(num_cpus=1, include_dashboard=False, object_store_memory=128 * 2**20,
                 _temp_dir=f"/tmp/ray-{{os.getuid()}}")
        from diloco.cli import main
        code = main({argv!r})
        ray.shutdown()
        sys.exit(code)
    """)
    return subprocess.run(
        [sys.executable, "-c", script], env=child_env(), capture_output=True, text=True,
        timeout=TIMEOUT_S,
    )  # fmt: skip


class Jobs:
    """The torchrun baseline, the Ray run, the Ray run with a killed worker and the job that is
    too big for its cluster; three at a time (the last starts when torchrun is done): more Ray
    clusters at once can starve a raylet past Ray's fixed 30 s start-up limit on two cores."""

    def __init__(self, root: Path, pool: ThreadPoolExecutor):
        self.root = root
        self._jobs = {
            "torchrun": pool.submit(
                run_torchrun, 2, [*TINY, f"run.out_dir={root / 'torchrun'}"], timeout=TIMEOUT_S
            ),
            "ray": pool.submit(ray_launch, root / "ray"),
            "killed": pool.submit(
                ray_launch,
                root / "killed",
                "--max-failures",
                "1",
                env={faults.RAY_EXIT_AFTER_ROUND: "2"},  # rank 1 exits after step 8's checkpoint
            ),
            "small_cluster": pool.submit(on_small_cluster, root / "small_cluster"),
        }

    def result(self, name: str) -> subprocess.CompletedProcess:
        proc = self._jobs[name].result()
        (self.root / f"{name}.log").write_text(proc.stdout + proc.stderr)  # for a post-mortem
        return proc

    def get(self, name: str) -> tuple[Path, subprocess.CompletedProcess]:
        proc = self.result(name)
        log = self.root / f"{name}.log"
        assert proc.returncode == 0, f"{name} failed (whole log: {log}):\n{proc.stderr[-6000:]}"
        return self.root / name, proc


@pytest.fixture(scope="module")
def jobs(tmp_path_factory) -> Iterator[Jobs]:
    with ThreadPoolExecutor(max_workers=3) as pool:
        yield Jobs(tmp_path_factory.mktemp("ray"), pool)


# --------------------------------------------------------------------------------------------
# end to end


def test_ray_g2s1_logs_the_same_metrics_as_torchrun(jobs):
    ray_dir, proc = jobs.get("ray")
    torchrun_dir, _ = jobs.get("torchrun")
    ray_records = same_fields(ray_dir / "metrics.jsonl")
    assert [r["step"] for r in ray_records] == [0, 4, 8, 12, 16, 20, 24]
    assert ray_records == same_fields(torchrun_dir / "metrics.jsonl")
    summary = json.loads((ray_dir / "summary.json").read_text())
    expected = json.loads((torchrun_dir / "summary.json").read_text())
    assert summary["final_val_loss"] == expected["final_val_loss"]
    assert "final val loss" in proc.stdout and "Ray start" in proc.stdout
    assert "diloco: node 127.0.0.1: ranks 0-1, groups 0-1" in proc.stderr  # loopback, one node


def test_ray_keeps_copies_of_the_reported_checkpoints_with_their_round(jobs):
    ray_dir, _ = jobs.get("ray")
    (run,) = [p for p in (ray_dir / "ray").iterdir() if p.is_dir()]
    copies = sorted(run.glob("checkpoint_*/meta.json"))
    assert [json.loads(m.read_text())["round"] for m in copies] == [4, 6]  # keep_last = 2
    assert (ray_dir / "ray" / f"{run.name}.attempts").read_text().strip() == "1"


def test_a_killed_worker_is_restarted_and_the_run_ends_as_if_uninterrupted(jobs):
    killed_dir, proc = jobs.get("killed")
    ray_dir, _ = jobs.get("ray")
    assert "Ray restart: resuming from" in proc.stderr and "(step 8)" in proc.stderr
    assert "diloco: resumed from" in proc.stderr
    (attempts,) = (killed_dir / "ray").glob("*.attempts")
    assert attempts.read_text().strip() == "2"
    final = json.loads((killed_dir / "summary.json").read_text())["final_val_loss"]
    assert final == json.loads((ray_dir / "summary.json").read_text())["final_val_loss"]
    assert same_fields(killed_dir / "metrics.jsonl") == same_fields(ray_dir / "metrics.jsonl")
    assert math.isfinite(read_metrics(killed_dir / "metrics.jsonl")[-1]["val_loss"])


def test_asking_for_more_gpus_than_the_machine_has_fails_at_once(tmp_path):
    proc = run_cli(
        "launch", "ray", *sets([*TINY, "run.device=cuda", f"run.out_dir={tmp_path}"]),
        "--address", "local", timeout=120,
    )  # fmt: skip
    if "the cluster has 0" not in proc.stderr:
        pytest.skip("this machine has GPUs")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == (
        "diloco: error: needs 2 GPUs for 2 groups × 1 shard (1 GPU per worker), the cluster "
        "has 0; lower topology.groups/shards, or add nodes"
    )


def test_asking_for_more_cpus_than_a_running_cluster_has_fails_at_once(jobs):
    """A real 1-CPU Ray cluster and a 2×2 job: one line, exit 2, no wait for resources."""
    proc = jobs.result("small_cluster")
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines()[-1] == (
        "diloco: error: needs 4 CPUs for 2 groups × 2 shards (1 CPU per worker), the cluster "
        "has 1; lower topology.groups/shards or --cpus-per-worker, or add nodes"
    )


# --------------------------------------------------------------------------------------------
# plain functions


def test_resource_check_counts_whole_workers_per_node():
    plan = plan_workers(load_config(None, ["topology.groups=2", "topology.shards=2"]))
    assert check_resources(plan, [{"CPU": 4.0}]) is None
    assert check_resources(plan, [{"CPU": 2.0}, {"CPU": 2.0}]) is None  # one group per node
    assert "will span nodes" in check_resources(plan, [{"CPU": 3.0}, {"CPU": 1.0}])
    with pytest.raises(RayResourceError, match="can hold only 3 of the 4 workers"):
        check_resources(plan, [{"CPU": 3.0}, {"CPU": 0.5}, {"CPU": 0.5}])
    gpu = plan_workers(load_config(None, ["topology.groups=2", "run.device=cuda"]))
    assert gpu.resources == {"CPU": 1.0, "GPU": 1.0} and gpu.backend == "nccl"
    with pytest.raises(RayResourceError, match="needs 2 GPUs"):
        check_resources(gpu, [{"CPU": 8.0, "GPU": 1.0}])


def _fake_checkpoint(path: Path, step: int) -> Path:
    path.mkdir(parents=True)
    meta = {"format_version": 1, "complete": True, "step": step, "round": step // K, "files": {}}
    (path / "meta.json").write_text(json.dumps(meta))
    return path


def test_a_restart_never_resumes_behind_the_newest_checkpoint_on_disk(tmp_path):
    run = tmp_path / "run"
    _fake_checkpoint(run / "checkpoints" / "step_8", 8)
    older = _fake_checkpoint(tmp_path / "ray" / "checkpoint_a", 4)  # Ray's stale answer
    assert choose_resume(run, older, (None, False), True) == (None, False)  # auto: step_8
    newer = _fake_checkpoint(tmp_path / "ray" / "checkpoint_b", 12)  # run dir lost step_12
    assert choose_resume(run, newer, (None, False), True) == (str(newer), False)
    assert choose_resume(tmp_path / "empty", None, ("auto", True), True) == ("auto", True)


def test_an_unreadable_ray_checkpoint_is_skipped(tmp_path, capsys):
    run = tmp_path / "run"
    _fake_checkpoint(run / "checkpoints" / "step_8", 8)
    broken = tmp_path / "ray" / "checkpoint_x"
    broken.mkdir(parents=True)
    assert choose_resume(run, broken, (None, False), True) == (None, False)
    assert "ignoring the checkpoint Ray handed back" in capsys.readouterr().err


def test_a_worker_user_error_ends_the_job_with_its_own_line():
    from ray.train import WorkerGroupError

    wrapped = RuntimeError("worker 1 failed")
    wrapped.__cause__ = DataError("text corpus /x does not exist or is not a file; fix data.source")
    failed = WorkerGroupError("…", {0: RuntimeError("peer closed"), 1: wrapped})
    err = fit_error(failed, 2)
    assert isinstance(err, DataError) and "fix data.source" in str(err)
    crash = fit_error(WorkerGroupError("…", {1: RuntimeError("killed by signal 9")}), 2)
    assert isinstance(crash, RayLaunchError)
    assert str(crash) == (
        "Ray workers failed after 2 restart(s) (--max-failures); rank 1: RuntimeError: "
        "killed by signal 9"
    )


def test_a_staged_checkpoint_survives_the_pruning_of_the_original(tmp_path):
    ckpt = _fake_checkpoint(tmp_path / "run" / "checkpoints" / "step_8", 8)
    (ckpt / "outer").mkdir()
    (ckpt / "outer" / "shard.distcp").write_bytes(b"theta")
    staged = stage_checkpoint(ckpt, tmp_path / "run" / "ray" / "r.staging")
    shutil.rmtree(ckpt)  # what Checkpointer._prune does to an old checkpoint
    assert (staged / "outer" / "shard.distcp").read_bytes() == b"theta"
    assert json.loads((staged / "meta.json").read_text())["step"] == 8


def test_resume_never_into_a_run_with_checkpoints_is_refused_before_ray_starts(tmp_path):
    _fake_checkpoint(tmp_path / "checkpoints" / "step_8", 8)
    cfg = load_config(None, [*TINY, f"run.out_dir={tmp_path}"])
    with pytest.raises(CheckpointError, match="already holds checkpoints"):
        launch_ray(cfg, address="local", resume="never")
