"""What a run measures and sets on its device: CUDA-correct timings, GPU memory, MFU, TF32.

CUDA runs its kernels asynchronously: a ``perf_counter`` read after a step's Python returns
measures what was *queued*, and the queued kernels' time lands in whichever later section
waits for them. :class:`Clock` therefore marks points in time with CUDA events on CUDA (read
only once the later mark's kernels have finished) and with ``perf_counter`` on the CPU.

Model FLOPs utilisation (PaLM, appendix B; nanoGPT's ``estimate_mfu``): a training token costs

    F = 6·N + 12·L·C·T   FLOPs      (N: parameters without the position embedding, L layers,
                                     width C, sequence length T; the second term is attention)

and MFU = (tokens/s of one device) · F / (the device's peak dense bf16 FLOP/s,
:data:`PEAK_BF16_FLOPS`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch

from diloco.comm.topology import Runtime
from diloco.models import GPT, GPTConfig
from diloco.models.build import ModelDims

__all__ = [
    "PEAK_BF16_FLOPS",
    "Clock",
    "StepTimes",
    "flops_per_token",
    "memory_fields",
    "mfu",
    "peak_bf16_flops",
    "run_fields",
    "set_fast_matmul",
]

#: Peak dense (no sparsity) bf16 tensor-core FLOP/s by device name, from the vendors' data
#: sheets; the first name contained in ``torch.cuda.get_device_name()`` wins (so the more
#: specific come first: "H100 PCIe" before "H100", "A100" before "A10", "L40S" before "L4").
PEAK_BF16_FLOPS: tuple[tuple[str, float], ...] = (
    ("B200", 2250e12),
    ("H200", 989e12),  # also GH200
    ("H100 NVL", 835e12),
    ("H100 PCIe", 756e12),
    ("H100", 989e12),  # SXM
    ("A100", 312e12),
    ("L40S", 362e12),
    ("RTX 4090", 165e12),
    ("A10", 125e12),
    ("L4", 121e12),
)


def peak_bf16_flops(device_name: str) -> float | None:
    """The peak dense bf16 FLOP/s of a device called ``device_name``, or None if unknown."""
    for name, flops in PEAK_BF16_FLOPS:
        if name in device_name:
            return flops
    return None


def flops_per_token(config: GPTConfig | ModelDims) -> float:
    """F = 6·N + 12·L·C·T training FLOPs per token of a GPT of ``config``, or of the model of
    :class:`~diloco.models.build.ModelDims` (module docstring)."""
    if isinstance(config, ModelDims):
        n = config.non_embedding_params
    else:
        with torch.device("meta"):  # shapes only: nothing allocated, nothing initialised
            n = GPT(config).num_params(non_embedding=True)
    return 6.0 * n + 12.0 * config.n_layer * config.n_embd * config.block_size


def mfu(tokens_per_s: float, devices: int, flops: float, peak: float) -> float:
    """Model FLOPs utilisation of ``devices`` devices processing ``tokens_per_s`` in all."""
    return tokens_per_s / devices * flops / peak


def memory_fields(device: torch.device) -> dict[str, float]:
    """Peak GPU memory of this process so far (MiB): allocated by tensors and reserved by the
    caching allocator; empty off CUDA (``peak_rss_mb`` covers the host)."""
    if device.type != "cuda":
        return {}
    mib = 2.0**20
    return {
        "gpu_mem_alloc_mb": torch.cuda.max_memory_allocated(device) / mib,
        "gpu_mem_reserved_mb": torch.cuda.max_memory_reserved(device) / mib,
    }


def run_fields(
    config: GPTConfig | ModelDims, runtime: Runtime
) -> Callable[[float], dict[str, float]]:
    """On CUDA, the fields of a record (or the summary) of a run of ``config`` with throughput
    ``tokens_per_s`` (all ranks): peak GPU memory, and MFU where the device's peak bf16 FLOP/s
    is known. Off CUDA, nothing (``peak_rss_mb`` is in the summary)."""
    device = runtime.device
    if device.type != "cuda":
        return lambda tokens_per_s: {}
    peak = peak_bf16_flops(torch.cuda.get_device_name(device))
    flops = flops_per_token(config)

    def fields(tokens_per_s: float) -> dict[str, float]:
        out = memory_fields(device)
        if peak is not None:
            out["mfu"] = mfu(tokens_per_s, runtime.world, flops, peak)
        return out

    return fields


def set_fast_matmul(device: torch.device) -> None:
    """On CUDA let fp32 matmuls and convolutions use TF32 tensor cores (10-bit mantissa
    inputs, fp32 accumulation): the fp32 path's speed; bf16 runs are unaffected."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


class Clock:
    """Points in time on ``device``'s timeline: ``mark()`` returns one (a CUDA event recorded
    on the current stream, or ``perf_counter()`` off CUDA); ``seconds(a, b)`` is the time from
    mark ``a`` to mark ``b``, waiting on CUDA until ``b``'s kernels have run. Read marks late
    (at a log step) so that the waiting does not stall the queue."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def mark(self) -> Any:
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def seconds(self, a: Any, b: Any) -> float:
        if not self.cuda:
            return b - a
        b.synchronize()
        return a.elapsed_time(b) / 1e3


class StepTimes:
    """Mean inner-step and outer-step times of a run (``summary.json``): each step :meth:`add` s
    its :class:`Clock` marks (start, end) and the seconds of its outer step (None within a
    round; measured by the wrapper, which synchronises around it): inner = end − start − outer.
    :meth:`summary` (and :meth:`read`, called at log steps to keep few marks pending) reads
    the marks."""

    def __init__(self, clock: Clock):
        self.clock = clock
        self._pending: list[tuple[Any, Any, float | None]] = []
        self.inner_s = self.outer_s = 0.0
        self.inner_n = self.outer_n = 0

    def add(self, start: Any, end: Any, outer_s: float | None) -> None:
        self._pending.append((start, end, outer_s))

    def read(self) -> None:
        for start, end, outer_s in self._pending:
            self.inner_s += self.clock.seconds(start, end) - (outer_s or 0.0)
            self.inner_n += 1
            if outer_s is not None:
                self.outer_s += outer_s
                self.outer_n += 1
        self._pending.clear()

    def summary(self) -> dict[str, float]:
        self.read()
        inner_ms = 1e3 * self.inner_s / max(1, self.inner_n)
        outer_ms = 1e3 * self.outer_s / max(1, self.outer_n)
        return {
            "inner_step_ms": inner_ms,
            "outer_step_ms": outer_ms,
            "outer_over_inner": outer_ms / inner_ms if inner_ms else 0.0,
        }
