"""Specification of what a GPU run uses for speed, checked on the CPU: ``train.compile``, the
batch prefetcher, and the device metrics (MFU, memory, timings) of :mod:`diloco.job.device`."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from diloco.bench.gpu_check import CONFIG
from diloco.config import load_config
from diloco.job.batches import Prefetcher
from diloco.job.data import BatchStream, shard_batch
from diloco.job.device import Clock, flops_per_token, memory_fields, mfu, peak_bf16_flops
from diloco.job.metrics import read_metrics
from diloco.job.train import train
from diloco.launchers.local import child_env
from diloco.models import GPTConfig

TINY = [
    "model.n_layer=2",
    "model.n_embd=32",
    "model.n_head=2",
    "model.block_size=32",
    "data.batch_size=8",
    "train.steps=12",
    "outer.sync_every=4",
    "inner.warmup_steps=2",
    "train.eval_every=6",
    "train.eval_batches=2",
    "train.log_every=2",
    "run.device=cpu",
    "run.progress=false",
]


@pytest.mark.slow
def test_compiled_model_trains_like_the_eager_one(tmp_path: Path):
    """``train.compile=true`` (inductor on the CPU) trains: losses within 1e-5 of the eager run
    (inductor fuses and reorders float ops, so roundings differ; 5e-7 measured)."""
    eager = train(load_config(None, [*TINY, f"run.out_dir={tmp_path / 'eager'}"]))
    compiled = train(
        load_config(None, [*TINY, f"run.out_dir={tmp_path / 'compiled'}", "train.compile=true"])
    )
    assert math.isclose(compiled["final_val_loss"], eager["final_val_loss"], abs_tol=1e-5)
    a = read_metrics(tmp_path / "eager" / "metrics.jsonl")
    b = read_metrics(tmp_path / "compiled" / "metrics.jsonl")
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for x, y in zip(a, b, strict=True):
        for key in ("loss", "val_loss"):
            assert math.isclose(x.get(key, 0.0), y.get(key, 0.0), abs_tol=1e-5), (key, x["step"])


def test_prefetched_batches_and_positions_are_those_of_drawing_in_line():
    """Shard 1 of 2: the same rows as drawing in line; ``state_dict`` is the position after the
    batches handed out (not after the one drawn ahead); loading a state continues from it."""
    tokens = torch.randint(0, 256, (5000,), generator=torch.Generator().manual_seed(0))
    inline = BatchStream(tokens, 8, 16, seed=1, stream=3)
    ahead = Prefetcher(BatchStream(tokens, 8, 16, seed=1, stream=3), 1, 2, torch.device("cpu"))
    try:
        positions = []
        for _ in range(4):
            want = shard_batch(*inline.next(), 1, 2)
            got = ahead.next()
            assert all(torch.equal(u, v) for u, v in zip(got, want, strict=True))
            assert ahead.state_dict()["batches"] == inline.batches
            positions.append(ahead.state_dict())
        ahead.load_state_dict(positions[1])  # back to after batch 2: batch 3 comes again
        inline.load_state_dict(positions[1])
        want = shard_batch(*inline.next(), 1, 2)
        assert all(torch.equal(u, v) for u, v in zip(ahead.next(), want, strict=True))
    finally:
        ahead.close()


def test_flops_per_token_is_6n_plus_attention_for_gpt2_small():
    """F = 6·N + 12·L·C·T, N = V·C + L·(12·C² + 2·C) + C (tied head, no biases, without the
    position embedding): about 0.85 GFLOP per token for GPT-2 124M at T = 1024."""
    V, T, L, C = 50304, 1024, 12, 768
    config = GPTConfig(vocab_size=V, block_size=T, n_layer=L, n_head=12, n_embd=C)
    n = V * C + L * (12 * C * C + 2 * C) + C
    assert flops_per_token(config) == 6 * n + 12 * L * C * T
    assert 0.84e9 < flops_per_token(config) < 0.86e9


@pytest.mark.parametrize(
    "name, peak",
    [
        ("NVIDIA H100 80GB HBM3", 989e12),
        ("NVIDIA H100 PCIe", 756e12),
        ("NVIDIA H200", 989e12),
        ("NVIDIA A100-SXM4-80GB", 312e12),
        ("NVIDIA A10", 125e12),
        ("NVIDIA L40S", 362e12),
        ("NVIDIA L4", 121e12),
        ("Tesla V100-SXM2-16GB", None),  # no bf16 tensor cores: no MFU
    ],
)
def test_peak_bf16_flops_by_device_name(name, peak):
    assert peak_bf16_flops(name) == peak


def test_mfu_is_per_device_throughput_times_flops_over_peak():
    assert math.isclose(mfu(8e5, devices=8, flops=1e9, peak=1e15), 0.1)


def test_off_cuda_timings_are_wall_seconds_and_there_is_no_gpu_memory():
    clock = Clock(torch.device("cpu"))
    a = clock.mark()
    b = clock.mark()
    assert clock.seconds(a, b) >= 0.0
    assert memory_fields(torch.device("cpu")) == {}


def gpu_check(*args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "diloco.bench.gpu_check", *args]
    return subprocess.run(cmd, env=child_env(), capture_output=True, text=True, timeout=120)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU: the check runs")
def test_gpu_check_refuses_without_cuda_in_one_line():
    result = gpu_check("--quick")
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.splitlines() == [
        "diloco.bench.gpu_check: needs a CUDA GPU (torch.cuda.is_available() is False); "
        "nothing was run"
    ]


def test_gpu_check_plans_adamw_and_snoo_with_and_without_compile():
    """``--plan`` (any machine): four ``diloco train`` runs of the 124M config on CUDA."""
    result = gpu_check("--plan", "--steps", "50", "--out", "OUT")
    assert result.returncode == 0, result.stderr
    runs = [line.split(" --set ") for line in result.stdout.splitlines()]
    assert len(runs) == 4
    assert all(r[0].endswith("-m diloco train --config " + str(CONFIG)) for r in runs)
    assert all({"train.steps=50", "run.device=cuda"} <= set(r) for r in runs)
    pairs = [(s, c) for r in runs for s in r if s.startswith("outer.method") for c in r
             if c.startswith("train.compile")]  # fmt: skip
    assert sorted(pairs) == [
        ("outer.method=nesterov", "train.compile=false"),
        ("outer.method=nesterov", "train.compile=true"),
        ("outer.method=none", "train.compile=false"),
        ("outer.method=none", "train.compile=true"),
    ]
