"""Specification of the checks before any work (issue 15, classes 4 and 5): the device exists,
and the run's memory estimate fits what a process has."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
import torch

from diloco.config import config_from_dict, load_config
from diloco.errors import ConfigError
from diloco.job import preflight
from diloco.launchers.local import child_env

GIB = 2**30


def estimate(*overrides: str) -> dict[str, float]:
    return preflight.estimate_memory(load_config(None, list(overrides)))


def test_estimate_counts_parameters_gradients_and_adamw_state_per_parameter():
    parts = estimate("outer.method=none")
    assert parts["gradients"] == parts["parameters"]
    assert parts["inner state"] == 2 * parts["parameters"]
    assert parts["outer state"] == 0


@pytest.mark.parametrize(
    ("method", "factor"), [("sgd", 1), ("nesterov", 2), ("ema_nesterov", 2), ("none", 0)]
)
def test_outer_state_is_theta_plus_a_buffer_where_the_method_keeps_one(method, factor):
    parts = estimate(f"outer.method={method}")
    assert parts["outer state"] == factor * parts["parameters"]


def test_shards_divide_what_one_process_holds():
    one, four = estimate(), estimate("topology.shards=4")
    for part in ("parameters", "gradients", "inner state", "outer state"):
        assert four[part] == pytest.approx(one[part] / 4)


def test_compressed_exchange_with_several_groups_adds_its_buffers():
    assert estimate("topology.groups=2")["exchange"] > 0
    plain = estimate("topology.groups=2")["exchange"]
    assert estimate("topology.groups=2", "outer.compress=int8")["exchange"] > plain
    assert estimate("outer.compress=int8")["exchange"] == 0  # one group sends nothing


def test_activations_grow_linearly_with_the_tokens_of_a_batch():
    base = estimate()["activations"]
    assert estimate("data.batch_size=32")["activations"] == pytest.approx(2 * base)
    assert estimate("model.block_size=256")["activations"] == pytest.approx(2 * base)
    assert estimate("topology.shards=2", "data.batch_size=32")["activations"] == pytest.approx(base)


def test_estimate_is_within_a_factor_of_two_of_a_measured_training_step():
    """Peak RSS growth of two AdamW steps of a GPT in a fresh process, after a one-sequence
    warm-up step (libraries' lazy set-up is not the run's), vs the estimate."""
    settings = ["model.block_size=512", "data.batch_size=32", "outer.method=none"]
    script = f"""
import json, resource, torch
from diloco.config import load_config
from diloco.job.preflight import estimate_memory
from diloco.job.train import build_model
cfg = load_config(None, {settings!r})
model = build_model(cfg, 256)
opt = torch.optim.AdamW(model.parameters())
x = torch.randint(0, 256, (cfg.data.batch_size, cfg.model.block_size))
model(x[:1], x[:1])[1].backward()
opt.zero_grad()
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
for _ in range(2):
    model(x, x)[1].backward(); opt.step(); opt.zero_grad()
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
parts = estimate_memory(cfg)
grown = parts["gradients"] + parts["inner state"] + parts["activations"]
print(json.dumps([(peak - base) * 1024, grown]))
"""
    proc = subprocess.run(
        [sys.executable, "-c", script], env=child_env(), capture_output=True, text=True, timeout=120
    )
    measured, estimated = json.loads(proc.stdout)
    assert measured / 2 <= estimated <= 2 * measured


def test_a_run_that_fits_passes():
    preflight.check_memory(config_from_dict({"run": {"device": "cpu"}}))


def test_a_run_beyond_the_memory_is_refused_with_its_estimate(monkeypatch):
    monkeypatch.setattr(preflight, "available_memory", lambda device: 1.0 * GIB)
    cfg = load_config(None, ["run.device=cpu", "model.n_layer=24", "model.n_embd=2048"])
    with pytest.raises(ConfigError) as info:
        preflight.check_memory(cfg)
    need = sum(preflight.estimate_memory(cfg).values()) / GIB
    assert str(info.value).startswith(f"this run needs about {need:.1f} GiB per process (")
    assert "but 1.0 GiB of host RAM available per process; lower data.batch_size" in str(info.value)


def test_host_memory_is_shared_by_the_nodes_processes(monkeypatch):
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    shared = preflight.available_memory("cpu")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    assert shared == pytest.approx(preflight.available_memory("cpu") / 4, rel=0.05)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_without_cuda_is_one_line_naming_the_torch_build():
    with pytest.raises(ConfigError, match=r"^run.device=cuda but no CUDA device is available \("):
        preflight.check_device("cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_local_rank_beyond_the_nodes_devices_is_refused(monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", str(torch.cuda.device_count()))
    with pytest.raises(Exception, match=r"launch at most \d+ processes per node"):
        preflight.check_device("cuda")


@pytest.mark.parametrize("device", ["cpu", "auto"])
def test_cpu_and_auto_need_no_check(device):
    preflight.check_device(device)


@pytest.mark.parametrize(
    ("setting", "package", "message"),
    [
        ("run.wandb=offline", "wandb", "run.wandb=offline needs the wandb package: pip install"),
        ("run.tensorboard=true", "tensorboard", "run.tensorboard=true needs the tensorboard"),
    ],
)
def test_a_missing_optional_package_is_one_line_before_any_work(
    monkeypatch, setting, package, message
):
    real = preflight.importlib.util.find_spec
    monkeypatch.setattr(
        preflight.importlib.util, "find_spec", lambda name: None if name == package else real(name)
    )
    with pytest.raises(ConfigError, match=f"^{re.escape(message)}"):
        preflight.check_packages(load_config(None, [setting]))
