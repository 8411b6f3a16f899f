"""Specification of checkpoints across processes: G=2 groups × S=2 FSDP2 shards under torchrun.

* a rank SIGKILLed mid-run under ``torchrun --max-restarts 1`` makes the job restart, resume
  from the newest checkpoint on its own and write the same ``metrics.jsonl`` as an uninterrupted
  run (so the same final val loss) — resume-equality with sharded, per-group state;
* a checkpoint written at S=2 resumes at S=1 (DCP resharding) and follows the S=2 run's losses;
* a checkpoint written at G=2 resumes at G=1, one written at G=1 at G=2, each with a warning
  saying what happens to the groups;
* ``diloco export`` turns the sharded θ into one plain ``GPT`` state dict.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import torch
from helpers import run_torchrun, same_fields, tiny_overrides
from safetensors.torch import load_file

from diloco.cli import main
from diloco.comm.topology import Runtime
from diloco.config import load_config
from diloco.job.data import eval_batches, load_corpus
from diloco.job.metrics import read_metrics
from diloco.job.train import evaluate, train
from diloco.launchers.local import REPO
from diloco.models import GPT, GPTConfig
from diloco.testing import faults

pytestmark = pytest.mark.slow

STEPS, K = 24, 4
TIMEOUT_S = 240


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text("\n\n".join(p.read_text() for p in sorted((REPO / "diloco").rglob("*.py"))))
    return path


def tiny(corpus: Path, out_dir: Path, groups: int, shards: int, *extra: str) -> list[str]:
    return tiny_overrides(
        STEPS,
        K,
        f"data.source=text:{corpus}",
        "model.n_head=2",
        "outer.momentum=0.9",
        "train.eval_every=8",
        "train.log_every=2",
        "train.checkpoint_every=2",
        f"topology.groups={groups}",
        f"topology.shards={shards}",
        f"run.out_dir={out_dir}",
        *extra,
    )


def torchrun(
    overrides: list[str], nproc: int, *args: str, env: dict | None = None, restarts: int = 0
) -> subprocess.CompletedProcess:
    """``torchrun --standalone`` (c10d rendezvous: on gloo, restarts work only with it;
    docs/troubleshooting.md)."""
    proc = run_torchrun(nproc, overrides, *args, env=env, timeout=TIMEOUT_S, restarts=restarts)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


@pytest.fixture(scope="module")
def baseline(corpus, tmp_path_factory) -> Path:
    """An uninterrupted 2×2 run; checkpoints at steps 16 and 24 kept."""
    out = tmp_path_factory.mktemp("baseline")
    torchrun(tiny(corpus, out, 2, 2), 4)
    return out


def test_sigkill_of_one_rank_restarts_resumes_and_matches(corpus, baseline, tmp_path):
    out = tmp_path / "killed"
    proc = torchrun(
        tiny(corpus, out, 2, 2),
        4,
        restarts=1,
        env={faults.KILL_AT_STEP: "14", faults.KILL_RANK: "3"},
    )
    assert "diloco: resumed from" in proc.stderr and "step_8" in proc.stderr
    assert same_fields(out / "metrics.jsonl") == same_fields(baseline / "metrics.jsonl")


def test_resume_at_fewer_shards_reshards(corpus, baseline, tmp_path):
    out = tmp_path / "s1"
    ckpt = baseline / "checkpoints" / "step_16"
    proc = torchrun(tiny(corpus, out, 2, 1), 2, "--resume", str(ckpt))
    assert "resharding checkpoint" in proc.stderr and "from 2 to 1 shards" in proc.stderr
    ref = {r["step"]: r for r in read_metrics(baseline / "metrics.jsonl")}
    got = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in got] == list(range(18, STEPS + 1, 2))
    for r in got:  # same maths, only the reduction order differs
        assert r["loss"] == pytest.approx(ref[r["step"]]["loss"], abs=1e-4)
        if "val_loss" in r:
            assert r["val_loss"] == pytest.approx(ref[r["step"]]["val_loss"], abs=1e-4)


def test_resume_with_fewer_groups_warns_how(corpus, baseline, tmp_path, capsys):
    out = tmp_path / "g1"
    cfg = load_config(None, tiny(corpus, out, 1, 1))
    summary = train(cfg, resume=str(baseline / "checkpoints" / "step_16"))
    err = capsys.readouterr().err
    assert (
        "diloco: warning: checkpoint " in err
        and "has 2 groups, this run has 1: the inner states and data positions of groups 1..1 "
        "are dropped; RNG streams are re-seeded"
        in err
    )
    assert summary["steps"] == STEPS
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl")][0] == 18


def test_resume_with_more_groups_warns_how_new_groups_start(corpus, tmp_path, capsys):
    one = tmp_path / "g1"
    train(load_config(None, tiny(corpus, one, 1, 1, "train.steps=16")))
    capsys.readouterr()
    out = tmp_path / "g2"
    proc = torchrun(tiny(corpus, out, 2, 1), 2, "--resume", str(one / "checkpoints" / "step_16"))
    assert (
        "has 1 groups, this run has 2: new groups 1..1 start from a copy of group (g mod 1)'s "
        "inner optimiser state and fresh data streams" in proc.stderr
    )
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl")][0] == 18


def test_export_of_a_sharded_checkpoint_gives_the_final_val_loss(baseline, tmp_path):
    path = tmp_path / "model.safetensors"
    assert main(["export", str(baseline), "--out", str(path)]) == 0
    cfg = load_config(baseline / "config.yaml")
    model = GPT(GPTConfig(**vars(cfg.model)))
    model.load_state_dict(load_file(path))
    corpus = load_corpus(cfg.data.source, cfg.model.block_size)
    val = eval_batches(
        corpus.val, cfg.data.batch_size, cfg.model.block_size, cfg.train.eval_batches
    )
    final = read_metrics(baseline / "metrics.jsonl")[-1]["val_loss"]
    loss = evaluate(model, val, Runtime(device=torch.device("cpu")))
    assert loss == pytest.approx(final, abs=1e-6)  # the run averaged 2 shards' means
