"""Specification of checkpoints in one process: layout, atomic write, resume, export, NaN guard.

A resumed run must write the same ``metrics.jsonl`` as an uninterrupted one (same steps, same
losses, bit for bit on the CPU); timing fields aside. Crashes are simulated in-process (an
exception out of the loop) or, where the process itself must die, in a subprocess with the
test-only environment variables of :mod:`diloco.testing.faults`.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import diloco.job.train as train_module
from diloco.cli import main
from diloco.comm.topology import Runtime
from diloco.config import load_config
from diloco.job import events
from diloco.job.data import eval_batches, load_corpus
from diloco.job.metrics import read_metrics
from diloco.job.train import evaluate, train
from diloco.launchers.local import REPO, child_env
from diloco.models import GPT, GPTConfig
from diloco.persist.resume import list_checkpoints, read_meta
from diloco.testing import faults

STEPS, K = 24, 4


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """A ~150 KB UTF-8 text corpus (this package's sources): loads in milliseconds."""
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text("\n\n".join(p.read_text() for p in sorted((REPO / "diloco").rglob("*.py"))))
    return path


def tiny(corpus: Path, out_dir: Path, *extra: str) -> list[str]:
    """``--set`` overrides of the tiny test run (2 layers, 32 wide, K=4, 24 steps)."""
    return [
        f"data.source=text:{corpus}",
        "model.n_layer=2",
        "model.n_embd=32",
        "model.n_head=2",
        "model.block_size=32",
        "data.batch_size=8",
        f"train.steps={STEPS}",
        f"outer.sync_every={K}",
        "inner.warmup_steps=4",
        "train.eval_every=8",
        "train.eval_batches=2",
        "train.log_every=2",
        "train.checkpoint_every=2",
        "run.device=cpu",
        "run.progress=false",
        f"run.out_dir={out_dir}",
        *extra,
    ]


class Crash(Exception):
    """Stands in for a process dying in the middle of a step."""


def crash_at(step: int):
    """An observer of the job's events that crashes after the backward pass of ``step``."""

    def observer(name, **info):
        if name == "after_backward" and info["step"] == step:
            raise Crash(f"crash at step {step}")

    return observer


def same_fields(path: Path) -> list[dict]:
    """Every record of a metrics.jsonl without its timings (the keys ending in ``_s``)."""
    return [{k: v for k, v in r.items() if not k.endswith("_s")} for r in read_metrics(path)]


@pytest.fixture(scope="module")
def reference(corpus, tmp_path_factory) -> tuple[Path, dict]:
    """An uninterrupted run (checkpoints every 2 rounds) and its summary."""
    out = tmp_path_factory.mktemp("reference")
    summary = train(load_config(None, tiny(corpus, out)))
    return out, summary


def test_checkpoint_layout_meta_and_keep_last(reference):
    out, _ = reference
    ckpts = list_checkpoints(out)
    assert [p.name for p in ckpts] == ["step_24", "step_16"]  # keep_last=2 of 8, 16, 24
    assert not list((out / "checkpoints").glob("*.tmp"))
    meta = read_meta(ckpts[0])
    assert meta["complete"] is True and meta["format_version"] == 1
    assert (meta["step"], meta["round"], meta["groups"], meta["shards"]) == (24, 6, 1, 1)
    assert meta["model_shapes"]["wte.weight"] == [256, 32]
    assert meta["config"]["outer"]["sync_every"] == K
    for part in ("outer/.metadata", "group0/.metadata", "extra/group0.pt", "extra/rank0.pt"):
        assert (ckpts[0] / part).is_file()
    assert set(meta["files"]) >= {"outer/.metadata", "group0/.metadata"}


def test_metrics_record_checkpoint_time(reference):
    out, summary = reference
    records = read_metrics(out / "metrics.jsonl")
    assert any("checkpoint_s" in r for r in records)
    assert summary["checkpoints"] == 3 and summary["checkpoint_s"] > 0


@pytest.mark.parametrize(
    "variant",
    [
        [],
        ["outer.method=ema_nesterov", "outer.ema_warmup=0.2", "outer.ema_rest=0.1"],
        ["inner.optimizer=muon"],
        ["outer.method=none"],
    ],
    ids=["nesterov-adamw", "ema_nesterov", "muon", "no-outer"],
)
def test_resume_after_crash_gives_identical_metrics(corpus, tmp_path, monkeypatch, variant):
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    expected = train(load_config(None, tiny(corpus, full, *variant)))
    cfg = load_config(None, tiny(corpus, resumed, *variant))
    with events.observing(crash_at(14)), pytest.raises(Crash):
        train(cfg)
    assert [p.name for p in list_checkpoints(resumed)] == ["step_8"]
    summary = train(cfg)  # default: resume from the newest checkpoint
    assert same_fields(resumed / "metrics.jsonl") == same_fields(full / "metrics.jsonl")
    assert summary["final_val_loss"] == expected["final_val_loss"]


def test_crash_between_write_and_rename_resumes_from_previous(corpus, reference, tmp_path):
    out = tmp_path / "run"
    env = child_env({faults.CRASH_BEFORE_RENAME: "16"})
    sets = [a for o in tiny(corpus, out) for a in ("--set", o)]
    proc = subprocess.run(
        [sys.executable, "-m", "diloco", "train", *sets],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert (out / "checkpoints" / "step_16.tmp" / "meta.json").is_file()  # written, not renamed
    assert [p.name for p in list_checkpoints(out)] == ["step_8"]
    assert main(["train", *sets, "--resume", "auto"]) == 0
    assert same_fields(out / "metrics.jsonl") == same_fields(reference[0] / "metrics.jsonl")
    assert not list((out / "checkpoints").glob("*.tmp"))


def test_finished_run_extends_with_more_steps(corpus, reference, tmp_path):
    out = tmp_path / "run"
    train(load_config(None, tiny(corpus, out)))
    summary = train(load_config(None, tiny(corpus, out, "train.steps=32")))
    steps = [r["step"] for r in read_metrics(out / "metrics.jsonl")]
    assert steps == list(range(0, 33, 2))
    assert summary["steps"] == 32 and list_checkpoints(out)[0].name == "step_32"


def test_resumed_summary_counts_only_the_tokens_of_its_own_steps(corpus, reference, tmp_path):
    """A run extended from step 24 to 32 reports 8 steps' tokens over its own wall time."""
    out = tmp_path / "run"
    train(load_config(None, tiny(corpus, out)))
    summary = train(load_config(None, tiny(corpus, out, "train.steps=32")))
    tokens_per_step = 8 * 32  # data.batch_size × model.block_size, one group
    assert summary["tokens"] == 32 * tokens_per_step
    assert math.isclose(summary["tokens_per_s"] * summary["wall_s"], 8 * tokens_per_step)


def test_first_throughput_window_starts_after_the_step_0_evaluation(corpus, tmp_path, monkeypatch):
    """tokens_per_s of the first log step measures steps 1..2 only, not the evaluation of θ
    before step 1 (here made to take 2 s)."""
    evaluate = train_module.evaluate
    calls = []

    def slow_first_evaluation(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            time.sleep(2.0)
        return evaluate(*args, **kwargs)

    monkeypatch.setattr(train_module, "evaluate", slow_first_evaluation)
    train(load_config(None, tiny(corpus, tmp_path / "run", "train.steps=6")))
    first = read_metrics(tmp_path / "run" / "metrics.jsonl")[1]
    assert first["step"] == 2 and first["tokens"] / first["tokens_per_s"] < 2.0


def test_resume_never_force_starts_over_and_keeps_old_checkpoints(corpus, reference, tmp_path):
    out = tmp_path / "run"
    train(load_config(None, tiny(corpus, out)))
    assert (
        main(
            [
                "train",
                *[a for o in tiny(corpus, out) for a in ("--set", o)],
                "--resume",
                "never",
                "--force",
            ]
        )
        == 0
    )
    assert len(list(out.glob("checkpoints.replaced-*"))) == 1
    assert same_fields(out / "metrics.jsonl") == same_fields(reference[0] / "metrics.jsonl")


def test_auto_skips_a_broken_newest_checkpoint_with_a_warning(reference, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(reference[0], out)
    part = out / "checkpoints" / "step_24" / "outer" / "__0_0.distcp"
    part.write_bytes(part.read_bytes()[:100])  # truncated
    cfg = load_config(out / "config.yaml", [f"run.out_dir={out}"])
    summary = train(cfg, resume="auto")
    err = capsys.readouterr().err
    assert "diloco: warning: checkpoint" in err and "is 100 bytes, expected" in err
    assert "skipping it and trying the previous checkpoint" in err
    assert "diloco: resumed from" in err and "step_16" in err
    assert same_fields(out / "metrics.jsonl") == same_fields(reference[0] / "metrics.jsonl")
    assert summary["final_val_loss"] == reference[1]["final_val_loss"]
    assert read_meta(out / "checkpoints" / "step_24")["step"] == 24  # rewritten whole


def test_forced_resume_with_a_changed_config_uses_the_new_settings(reference, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(reference[0], out)
    cfg = load_config(out / "config.yaml", [f"run.out_dir={out}", "inner.lr=1e-3"])
    train(cfg, resume=str(out / "checkpoints" / "step_16"), force=True)
    err = capsys.readouterr().err
    assert "diloco: warning: --force: resuming" in err and "(inner.lr 0.003 -> 0.001)" in err
    ref = {r["step"]: r for r in read_metrics(reference[0] / "metrics.jsonl")}
    got = {r["step"]: r for r in read_metrics(out / "metrics.jsonl")}
    assert got[16] == ref[16]  # kept from before the checkpoint
    for step in (18, 20, 24):  # same schedule position, a third of the peak LR
        assert got[step]["lr"] == pytest.approx(ref[step]["lr"] / 3, rel=1e-12)


def test_resume_from_an_older_checkpoint_sets_newer_ones_aside(corpus, reference, tmp_path):
    out = tmp_path / "run"
    train(load_config(None, tiny(corpus, out)))
    train(load_config(None, tiny(corpus, out)), resume=str(out / "checkpoints" / "step_16"))
    assert (out / "checkpoints" / "step_24.abandoned" / "meta.json").is_file()
    assert [p.name for p in list_checkpoints(out)] == ["step_24", "step_16"]
    assert same_fields(out / "metrics.jsonl") == same_fields(reference[0] / "metrics.jsonl")


# ------------------------------------------------------------------------------- export


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_export_loads_into_gpt_in_one_line_with_the_final_val_loss(reference, tmp_path, suffix):
    out, summary = reference
    path = tmp_path / f"model{suffix}"
    assert main(["export", str(out), "--out", str(path)]) == 0
    cfg = load_config(out / "config.yaml")
    model = GPT(GPTConfig(**vars(cfg.model)))
    if suffix == ".safetensors":
        from safetensors.torch import load_file

        model.load_state_dict(load_file(path))
    else:
        model.load_state_dict(torch.load(path, weights_only=True))
    corpus = load_corpus(cfg.data.source, cfg.model.block_size)
    val = eval_batches(
        corpus.val, cfg.data.batch_size, cfg.model.block_size, cfg.train.eval_batches
    )
    assert evaluate(model, val, Runtime(device=torch.device("cpu"))) == summary["final_val_loss"]


# ------------------------------------------------------------------------------- NaN guard


def test_nan_round_is_skipped_with_a_warning_and_training_recovers(
    corpus, tmp_path, monkeypatch, capsys
):
    out = tmp_path / "run"
    monkeypatch.setenv(faults.NAN_AT_STEP, "8")  # the last step of round 2
    summary = train(load_config(None, tiny(corpus, out, "train.log_every=4")))
    err = capsys.readouterr().err
    warning = "diloco: warning: round 2 (step 8): non-finite pseudo-gradient; outer step skipped"
    assert warning in err
    rec = {r["step"]: r for r in read_metrics(out / "metrics.jsonl")}
    assert rec[8]["outer_skipped"] is True and rec[8]["pseudo_grad_norm"] == "nan"
    assert rec[12]["outer_skipped"] is False
    assert torch.isfinite(torch.tensor(summary["final_val_loss"]))


def test_nan_rounds_in_a_row_abort_with_one_clear_line(corpus, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(faults.NAN_AT_STEP, "4,8,12")
    sets = [
        a for o in tiny(corpus, tmp_path / "run", "train.max_bad_rounds=3") for a in ("--set", o)
    ]
    assert main(["train", *sets]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == (
        "diloco: error: pseudo-gradient was non-finite for 3 rounds in a row (last: round 3); "
        "lower inner.lr or raise train.max_bad_rounds"
    )
    assert sum("non-finite pseudo-gradient; outer step skipped" in line for line in err) == 2
    assert not any("Traceback" in line for line in err)


def test_meta_json_is_plain_json(reference):
    meta = json.loads((list_checkpoints(reference[0])[0] / "meta.json").read_text())
    assert meta["loop"]["val_loss"] == reference[1]["final_val_loss"]


def test_offloaded_state_is_saved_from_and_loaded_into_host_memory(tmp_path):
    """θ kept on the host (``outer.offload=cpu``) beside a sharded parameter on a device (the
    meta device stands in for a GPU here): its DCP target is a view of the host tensor itself
    with the parameter's global shape, so a checkpoint is written from and read into host
    memory, with no copy to the device and back."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.tensor import DTensor, Shard

    from diloco.persist.checkpoint_files import dcp_save, dcp_view, load_dcp

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        device_mesh = DeviceMesh("meta", torch.arange(1), _init_backend=False)
        param = DTensor.from_local(torch.empty(6, 4, device="meta"), device_mesh, [Shard(0)])
        theta = torch.randn(6, 4)
        target = dcp_view(param, theta)
        assert target.shape == param.shape and target.to_local().data_ptr() == theta.data_ptr()
        dcp_save({"slow": {"w": target}}, tmp_path / "outer", None)
        restored = torch.zeros(6, 4)
        load_dcp({"slow": {"w": dcp_view(param, restored)}}, tmp_path / "outer")
        assert torch.equal(restored, theta)
    finally:
        dist.destroy_process_group()
