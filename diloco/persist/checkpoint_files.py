"""Checkpoint files: DCP save/load with one-line errors, durable writes, RNG states.

The storage layer under :mod:`diloco.persist.checkpoint` (and the DeepSpeed engine's checkpoints):
every failure becomes a :class:`~diloco.errors.CheckpointError` naming the file and the cause,
and every file a checkpoint's manifest lists is fsync'ed before the checkpoint is renamed into
place.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from diloco.errors import CheckpointError

__all__ = [
    "dcp_keys",
    "dcp_save",
    "dcp_view",
    "load_dcp",
    "one_line",
    "rng_state",
    "save_synced",
    "set_rng_state",
    "torch_load",
    "write_synced",
]


def dcp_view(p: Tensor, local: Tensor) -> Tensor:
    """``local`` (this rank's part of parameter ``p``) as a DCP target with ``p``'s global
    shape, sharing ``local``'s storage wherever it lives: a DTensor when ``p`` is an FSDP2
    DTensor (on a mesh of ``local``'s device type, so that θ offloaded to the host is saved
    from and loaded into host memory, never through a device copy), else ``local`` itself."""
    from torch.distributed.tensor import DTensor

    if not isinstance(p, DTensor):
        return local
    mesh = p.device_mesh
    if mesh.device_type != local.device.type:  # same ranks and layout, no process groups
        from torch.distributed.device_mesh import DeviceMesh

        mesh = DeviceMesh(
            local.device.type, mesh.mesh, mesh_dim_names=mesh.mesh_dim_names, _init_backend=False
        )
    return DTensor.from_local(
        local, mesh, p.placements, run_check=False, shape=p.shape, stride=p.stride()
    )


def dcp_keys(path: Path) -> set[str]:
    """The state-dict keys saved in DCP directory ``path`` (empty if it is missing or corrupt:
    :func:`load_dcp` reports that)."""
    from torch.distributed.checkpoint import FileSystemReader

    try:
        return set(FileSystemReader(str(path)).read_metadata().state_dict_metadata)
    except Exception:
        return set()


def one_line(e: BaseException) -> str:
    """``e``'s message on one line, at most 300 characters."""
    text = " ".join(str(e).split())
    return text[:300] + ("…" if len(text) > 300 else "")


@contextlib.contextmanager
def _no_single_process_warning() -> Iterator[None]:
    """DCP warns on every single-process (``no_dist``) call; that is what we mean here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def dcp_save(state: dict[str, Any], path: Path, pg: Any) -> None:
    """``dcp.save`` of ``state`` into ``path`` by the ranks of ``pg`` (None: this process)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        with _no_single_process_warning():
            dcp.save(state, checkpoint_id=str(path), process_group=pg, no_dist=pg is None)
    except (Exception, CheckpointException) as e:  # e.g. no space left on the device
        raise CheckpointError(f"cannot write checkpoint part {path}: {_cause(e)}") from None


def load_dcp(state: dict[str, Any], path: Path, pg: Any = None) -> None:
    """``dcp.load`` into ``state``'s tensors, in place (``pg`` None: this process alone).

    Raises:
        CheckpointError: the DCP directory is missing, corrupt or does not fit ``state``.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.api import CheckpointException

    if not (path / ".metadata").is_file():
        raise CheckpointError(f"checkpoint part {path} is missing its .metadata file")
    try:  # read it once first: DCP itself would log a traceback for a corrupt one
        FileSystemReader(str(path)).read_metadata()
    except Exception as e:
        raise CheckpointError(
            f"{path}/.metadata is corrupt ({_cause(e)}); move this checkpoint away to resume "
            "from an older one"
        ) from None
    try:
        with _no_single_process_warning():
            dcp.load(state, checkpoint_id=str(path), process_group=pg, no_dist=pg is None)
    except (Exception, CheckpointException) as e:  # DCP wraps every reader failure
        raise CheckpointError(
            f"cannot load {path}: {_cause(e)}; move this checkpoint away to resume from an "
            "older one"
        ) from None


def _cause(e: BaseException) -> str:
    """``Type: message`` of the first underlying failure of a (DCP) exception, on one line."""
    failures = getattr(e, "failures", None)
    if failures:
        first = next(iter(failures.values()))  # (exception, stack summary)
        e = first[0] if isinstance(first, tuple) else first
    return f"{type(e).__name__}: {one_line(e)}"


def rng_state() -> dict[str, Tensor]:
    """This process's CPU (and, if in use, CUDA) random-number-generator states."""
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Tensor]) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def torch_load(path: Path) -> Any:
    """``torch.load`` of one of our own files (tensors and plain data only) onto the CPU."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"cannot read {path}: {one_line(e)}") from None


def save_synced(obj: Any, path: Path) -> None:
    """``torch.save`` into ``path``, flushed to the disk before returning."""
    with open(path, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


def write_synced(path: Path, text: str) -> None:
    """Write ``text`` into ``path``, flushed to the disk before returning."""
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
