"""Test-only: catch host/device mix-ups of ``outer.offload=cpu`` on a machine without a GPU.

With ``offload="cpu"`` on CUDA, θ and the outer state live in host memory and the fast weights
φ on the GPU: an elementwise ``torch._foreach_*`` op handed tensors from both sides raises there
("Expected all tensors to be on the same device"). On a CPU-only machine both sides are CPU
tensors and the same mistake passes silently. :func:`separate_devices` gives the two sides
*virtual* devices for the duration of a block: every tensor whose storage is one of the wrapper's
offloaded tensors (θ, the outer state, the offload staging and Δ buffers) is on ``"host"``,
every tensor whose storage is a fast weight or a gradient is on ``"device"``, and every
``torch._foreach_*`` call must take all its tensors from one side; only ``_foreach_copy_`` may
copy from one to the other, as it may on CUDA. Tensors of neither side (temporaries, and the
copies ``Tensor.to(..., copy=True)`` makes) take no side.

    with separate_devices(dl):
        ...  # train, sync, save and load: an AssertionError names the op that mixes them
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor

from diloco.algorithm.tensors import local_tensor
from diloco.algorithm.wrapper import DiLoCo

__all__ = ["separate_devices"]

_CROSSING = frozenset({"_foreach_copy_"})


def _storage(t: Tensor) -> int:
    return t.untyped_storage().data_ptr()


def _host_tensors(dl: DiLoCo) -> list[Tensor]:
    """Everything ``dl`` keeps on the host with ``offload="cpu"``."""
    out = list(dl.slow_tensors())
    if dl.outer is not None:
        for state in dl.outer.state.values():
            out += [v for v in state.values() if isinstance(v, Tensor)]
    for name in ("_staging", "_buffer"):  # DiLoCo's staging copy, Streaming DiLoCo's Δ buffer
        value = getattr(dl, name, None)
        out += value if isinstance(value, list) else [value] if value is not None else []
    return out


def _device_tensors(dl: DiLoCo) -> list[Tensor]:
    """The fast weights and their gradients (the model's own storage)."""
    out = [local_tensor(p) for p in dl.params]
    out += [local_tensor(p.grad) for p in dl.params if p.grad is not None]
    return out


def _tensors(args: tuple, kwargs: dict) -> Iterator[Tensor]:
    for value in (*args, *kwargs.values()):
        if isinstance(value, Tensor):
            yield value
        elif isinstance(value, (list, tuple)):
            yield from (v for v in value if isinstance(v, Tensor))


@contextlib.contextmanager
def separate_devices(dl: DiLoCo) -> Iterator[None]:
    """Within the block, fail any ``torch._foreach_*`` op that mixes ``dl``'s host-side and
    device-side tensors (module docstring; nothing is checked unless ``dl`` offloads). The
    sides are re-read at every call, so buffers created later (the outer state of the first
    round) are labelled too."""
    originals: dict[str, Any] = {
        name: getattr(torch, name) for name in dir(torch) if name.startswith("_foreach_")
    }

    def checked(name: str, op: Any) -> Any:
        def call(*args: Any, **kwargs: Any) -> Any:
            if name not in _CROSSING and dl.offload != "none":
                host = {_storage(t) for t in _host_tensors(dl)}
                device = {_storage(t) for t in _device_tensors(dl)}
                sides = set()
                for t in _tensors(args, kwargs):
                    ptr = _storage(t)
                    sides |= {"host"} if ptr in host else {"device"} if ptr in device else set()
                assert len(sides) < 2, f"torch.{name} mixes host and device tensors"
            return op(*args, **kwargs)

        return call

    for name, op in originals.items():
        setattr(torch, name, checked(name, op))
    try:
        yield
    finally:
        for name, op in originals.items():
            setattr(torch, name, op)
