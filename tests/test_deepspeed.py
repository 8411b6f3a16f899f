"""Specification of DeepSpeed ZeRO as a group's inner engine (``inner.engine=deepspeed``).

Real DeepSpeed under torchrun, on the CPU over gloo, tiny model (2 layers, width 32, 16 steps,
K = 4, mid-round evaluations of θ at steps 6 and 12):

* G=2 × S=2 with ZeRO-1, ZeRO-2 and ZeRO-3 follows the FSDP2 run of the same config: losses,
  val losses, pseudo-gradient norms and final θ;
* G=1 with ZeRO-2 is SNOO: equal to the plain single-process run (S=2 under torchrun, and S=1
  as one process);
* a run resumed from a DeepSpeed checkpoint (DeepSpeed's own save/load per group, plus θ and
  the outer state) logs exactly what the uninterrupted run logged and ends with the same θ.

Why ZeRO and FSDP2 are not bitwise equal: both average the gradient over the S shard ranks, but
FSDP2 reduce-scatters each parameter while ZeRO reduces flat buckets of several parameters, and
the gradient norm for clipping is summed over different pieces in a different order; AdamW
itself runs on flat partitions instead of per-parameter tensors. These are float32 rounding
differences. Measured maximum absolute differences over the 16 steps (losses, val losses,
pseudo-gradient norms and final θ; torch 2.13 CPU, DeepSpeed 0.19.8): ZeRO-1, ZeRO-2 and ZeRO-3
vs FSDP2 at G=2 × S=2 4.8e-7 each (the logged values alone 1.2e-7, 1.2e-7, 2.4e-7); G=1 ZeRO-2
vs the single-process run 3.6e-7 (S=2) and 4.8e-7 (S=1, where only the flat AdamW and the norm's
summation order differ). The tests allow 2e-6.
"""

from __future__ import annotations

import importlib.util
import math
import os
import sys
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from helpers import run_cli, run_torchrun, same_fields, tiny_overrides

from diloco.errors import CheckpointError, ConfigError
from diloco.job.metrics import read_metrics

needs_deepspeed = pytest.mark.skipif(
    importlib.util.find_spec("deepspeed") is None, reason="needs pip install -e '.[deepspeed]'"
)

STEPS, K = 16, 4
TOLERANCE = 2e-6  # about 4x the measured differences (module docstring)
TIMEOUT_S = 300
TINY = tiny_overrides(
    STEPS,
    K,
    "outer.momentum=0.9",
    "train.eval_every=6",  # mid-round: θ is swapped into the fast partitions and back
    "train.log_every=2",
)
G2S2 = ["topology.groups=2", "topology.shards=2"]
CHECKPOINTS = ["train.checkpoint_every=2"]  # rounds 2 and 4: steps 8 and 16


def zero(stage: int) -> list[str]:
    return ["inner.engine=deepspeed", f"inner.zero_stage={stage}"]


# name -> (processes, overrides); 1 process: ``python -m diloco train`` without torchrun.
# In start order: the runs that are resumed first, so that their resumed runs start early.
LAUNCHES = {
    "zero2": (4, [*G2S2, *zero(2), *CHECKPOINTS]),
    "zero3": (4, [*G2S2, *zero(3), *CHECKPOINTS]),
    "fsdp2": (4, G2S2),
    "zero1": (4, [*G2S2, *zero(1)]),
    "zero2_g1s2": (2, ["topology.shards=2", *zero(2)]),
    "zero2_g1s1": (1, zero(2)),
    "snoo": (1, []),
}
RESUME_AT = 8  # the checkpoint at the end of round 2 of the runs with CHECKPOINTS


def _env() -> dict[str, str]:
    """DeepSpeed's JIT-compiled ops (none are built on this path) go to a stable cache."""
    cache = os.environ.get("TORCH_EXTENSIONS_DIR") or str(
        Path.home() / ".cache" / "diloco_torch_extensions"
    )
    return {"TORCH_EXTENSIONS_DIR": cache, "DS_ACCELERATOR": "cpu"}


class Runs:
    """Starts every job of LAUNCHES (three at a time) and hands back their run directories."""

    def __init__(self, root: Path, pool: ThreadPoolExecutor):
        self.root = root
        self.jobs: dict[str, Future] = {}
        for name, (nproc, overrides) in LAUNCHES.items():
            self.jobs[name] = pool.submit(self._launch, name, nproc, overrides, ())
            if name == "zero3":  # queue the resumed runs right after the runs they resume
                for base in ("zero2", "zero3"):
                    self.jobs[f"{base}_resumed"] = pool.submit(self._resume, base)

    def _launch(self, name: str, nproc: int, overrides: list[str], args: tuple[str, ...]) -> Path:
        out = self.root / name
        sets = [*TINY, *overrides, f"run.out_dir={out}"]
        if nproc == 1:
            flags = [a for o in sets for a in ("--set", o)]
            result = run_cli("train", *flags, *args, env=_env(), timeout=TIMEOUT_S)
        else:
            result = run_torchrun(nproc, sets, *args, env=_env(), timeout=TIMEOUT_S)
        assert result.returncode == 0, f"{name} failed:\n{result.stderr[-4000:]}"
        return out

    def get(self, name: str) -> Path:
        return self.jobs[name].result()

    def _resume(self, name: str) -> Path:
        """Job ``name`` again in a new directory, resumed from its checkpoint at RESUME_AT."""
        ckpt = self.get(name) / "checkpoints" / f"step_{RESUME_AT}"
        nproc, overrides = LAUNCHES[name]
        return self._launch(f"{name}_resumed", nproc, overrides, ("--resume", str(ckpt)))


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Iterator[Runs]:
    with ThreadPoolExecutor(max_workers=3) as pool:
        yield Runs(tmp_path_factory.mktemp("deepspeed"), pool)


def max_difference(a: Path, b: Path) -> float:
    """Largest |a − b| over the logged losses, val losses, pseudo-gradient norms and final θ;
    also checks that both runs logged the same records."""
    ra, rb = read_metrics(a / "metrics.jsonl"), read_metrics(b / "metrics.jsonl")
    assert [r["step"] for r in ra] == [r["step"] for r in rb]
    worst = 0.0
    for x, y in zip(ra, rb, strict=True):
        for key in ("loss", "val_loss", "pseudo_grad_norm"):
            assert (key in x) == (key in y), (key, x["step"])
            if key in x:
                assert math.isfinite(x[key])
                worst = max(worst, abs(x[key] - y[key]))
    theta_a = torch.load(a / "final_model.pt", map_location="cpu")
    theta_b = torch.load(b / "final_model.pt", map_location="cpu")
    assert theta_a.keys() == theta_b.keys()
    for name in theta_a:
        assert theta_a[name].shape == theta_b[name].shape, name
        worst = max(worst, float((theta_a[name] - theta_b[name]).abs().max()))
    return worst


@pytest.mark.slow
@needs_deepspeed
@pytest.mark.parametrize("stage", [1, 2, 3])
def test_zero_groups_follow_the_fsdp2_run(runs, stage):
    """G=2 × S=2: ZeRO-1/2/3 give FSDP2's curves and θ up to float32 rounding (docstring)."""
    assert max_difference(runs.get(f"zero{stage}"), runs.get("fsdp2")) < TOLERANCE


@pytest.mark.slow
@needs_deepspeed
def test_pseudo_gradient_traffic_is_this_ranks_partition(runs):
    """The outer step works on 1/S of the model per rank: rank 0 sends 2(G−1)/G · 4 · P/S bytes
    (P rounded up to ZeRO's partition padding), as FSDP2 does, not the full model."""
    theta = torch.load(runs.get("zero2") / "final_model.pt", map_location="cpu")
    del theta["lm_head.weight"]  # tied to wte.weight: one parameter
    params = sum(t.numel() for t in theta.values())
    rounds = [r for r in read_metrics(runs.get("zero2") / "metrics.jsonl") if "bytes_sent" in r]
    assert len(rounds) == STEPS // K
    for r in rounds:
        per_rank = r["bytes_sent"] / (2 * (2 - 1) / 2 * 4)  # fp32 elements of rank 0's partition
        assert params / 2 <= per_rank <= params / 2 + 64


@pytest.mark.slow
@needs_deepspeed
@pytest.mark.parametrize("shards", [2, 1])
def test_one_zero2_group_is_snoo(runs, shards):
    """G=1 with ZeRO-2 equals the plain single-process SNOO run (S=2 splits the batch over two
    ranks: FSDP2-like rounding; S=1 is one process, DeepSpeed on a one-rank process group)."""
    assert max_difference(runs.get(f"zero2_g1s{shards}"), runs.get("snoo")) < TOLERANCE


@pytest.mark.slow
@needs_deepspeed
@pytest.mark.parametrize("stage", [2, 3])
def test_resume_from_a_deepspeed_checkpoint_is_exact(runs, stage):
    """Resumed at step 8 (the end of round 2) from DeepSpeed's per-group checkpoints plus θ and
    the outer state: the same records from step 9 on, and bitwise the same final θ."""
    full = runs.get(f"zero{stage}")
    ckpt = full / "checkpoints" / f"step_{RESUME_AT}"
    assert {p.name for p in ckpt.iterdir()} >= {"meta.json", "outer", "group0", "group1"}
    assert (ckpt / "group1" / "inner").is_dir()  # DeepSpeed's own files, one directory per group
    resumed = runs.get(f"zero{stage}_resumed")
    after = [r for r in same_fields(full / "metrics.jsonl") if r["step"] > RESUME_AT]
    assert same_fields(resumed / "metrics.jsonl") == after
    theta_full = torch.load(full / "final_model.pt", map_location="cpu")
    theta_resumed = torch.load(resumed / "final_model.pt", map_location="cpu")
    assert theta_full.keys() == theta_resumed.keys()
    for name, t in theta_full.items():
        assert torch.equal(theta_resumed[name], t), name


@pytest.mark.slow
@needs_deepspeed
def test_resume_with_another_shard_count_is_refused(runs):
    """ZeRO partitions (and θ shaped like them) are laid out for S: another S is refused
    before anything is loaded."""
    from diloco.job.engines.deepspeed import DeepSpeedCheckpointer

    ckpt = runs.get("zero2") / "checkpoints" / f"step_{RESUME_AT}"
    checkpointer = DeepSpeedCheckpointer.__new__(DeepSpeedCheckpointer)
    checkpointer.runtime = SimpleNamespace(shards=1)
    with pytest.raises(CheckpointError, match="has 2 shards per group, this run has 1"):
        checkpointer.load(ckpt)


def test_missing_deepspeed_is_a_config_error(monkeypatch):
    from diloco.job.engines.deepspeed import import_deepspeed

    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    monkeypatch.setitem(sys.modules, "deepspeed", None)  # import deepspeed raises ImportError
    with pytest.raises(ConfigError, match=r"pip install -e '\.\[deepspeed\]'"):
        import_deepspeed(torch.device("cpu"))


def test_deepspeed_config_merges_the_passthrough_under_what_diloco_sets():
    from diloco.config import load_config
    from diloco.config.rules import DEEPSPEED_RESERVED
    from diloco.job.engines.deepspeed import deepspeed_config

    passthrough = "inner.deepspeed={zero_optimization: {overlap_comm: false}, steps_per_print: 5}"
    cfg = load_config(None, [*TINY, *zero(3), "inner.grad_clip=0.5", passthrough])
    ds = deepspeed_config(cfg, shards=2)
    assert ds["zero_optimization"] == {"overlap_comm": False, "stage": 3}
    assert (ds["train_batch_size"], ds["train_micro_batch_size_per_gpu"]) == (8, 4)
    assert (ds["gradient_accumulation_steps"], ds["gradient_clipping"]) == (1, 0.5)
    assert ds["steps_per_print"] == 5
    assert "optimizer" not in ds and "scheduler" not in ds  # ours go in as objects
    for dotted in set(DEEPSPEED_RESERVED) - {"optimizer", "scheduler"}:
        section, _, key = dotted.rpartition(".")
        assert key in (ds[section] if section else ds), dotted
    assert cfg.inner.deepspeed["zero_optimization"] == {"overlap_comm": False}  # not modified
