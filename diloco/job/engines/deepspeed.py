"""DeepSpeed ZeRO as the inner engine of a group (``inner.engine: deepspeed``).

Each group of S shard ranks is one DeepSpeed data-parallel job: ZeRO (stage ``inner.zero_stage``)
partitions over the group's ``"shard"`` process group, which DeepSpeed gets through its ``mpu``
argument (:class:`ShardGroupMPU`). Gradients are therefore reduced inside a group only, and the
pseudo-gradient average still crosses only the ``"group"`` dimension
(:class:`diloco.comm.mesh.MeshReducer`), exactly as with FSDP2.

**Fast weights.** The DiLoCo wrapper works on this rank's ZeRO partitions of the fp32 master
weights, the tensors the inner optimiser updates:

* stages 1 and 2: ``optimizer.single_partition_of_fp32_groups``;
* stage 3: ``optimizer.fp32_partitioned_groups_flat`` (the fp32 source of the partitioned
  parameters ``p.ds_tensor``).

Each is a flat tensor per parameter group (weight-decay / no-decay): this rank's 1/S slice of the
group's flattened, zero-padded parameters, laid out identically in every group, so θ and the outer
state are flat tensors of the same shapes and the outer step is elementwise with no gather of the
model (docs/design.md §2). The padding stays zero (Δ = 0 and the AdamW update is 0 there).
The model's own weights are a copy: after the wrapper writes the partitions (restart, evaluating
θ, resume) :meth:`DeepSpeedInner.refresh_model` updates them the way DeepSpeed does at the end of
its step (stages 1/2: the model-precision partition, then an all-gather over the shards;
stage 3: the partitioned parameters, then the persistent ones are re-gathered).

**Inner step.** ``engine(x, y)``, ``engine.backward(loss)`` (gradient reduction over the shards),
``engine.step()`` (clipping at ``inner.grad_clip``, the torch optimiser's step on the partitions,
refresh of the model). The optimiser is the torch AdamW/SGD of
:func:`diloco.job.inner.build_inner_optimizer` and the LR schedule our ``LambdaLR`` on it, so the
maths is the FSDP2 path's. With ``topology.mixed_precision: bf16`` the forward runs under torch
autocast around fp32 weights (as for an unsharded model); DeepSpeed's own ``bf16`` weights can be
switched on through ``inner.deepspeed``.

**CPU.** DeepSpeed runs over gloo. Its CPU accelerator would JIT-compile a shared-memory
all-reduce op (``deepspeed_shm_comm``, ~20 s, needs g++ and ninja) when its communication backend
starts; only ``inference_all_reduce`` uses that op, never training, so it is not built.

**Checkpoints** (:class:`DeepSpeedCheckpointer`): DeepSpeed's own ``save_checkpoint`` per group
plus θ and the outer state, in :mod:`diloco.persist.checkpoint`'s layout with its atomic write.
"""

from __future__ import annotations

import copy
import logging
import os
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from diloco.comm.mesh import MeshReducer
from diloco.comm.topology import Runtime
from diloco.config import Config
from diloco.errors import CheckpointError, ConfigError
from diloco.persist.checkpoint import Checkpointer, outer_buffers
from diloco.persist.checkpoint_files import save_synced, torch_load
from diloco.persist.resume import read_meta

__all__ = [
    "DeepSpeedCheckpointer",
    "DeepSpeedInner",
    "ShardGroupMPU",
    "build_deepspeed",
    "deepspeed_config",
    "import_deepspeed",
]

#: The DeepSpeed tag of every group's inner-state checkpoint (``group<g>/inner/``).
CHECKPOINT_TAG = "inner"
#: ZeRO optimiser internals the fast-weight views and refresh use, per stage (DeepSpeed 0.19).
_INTERNALS = {
    1: ("single_partition_of_fp32_groups", "update_lp_params"),
    2: ("single_partition_of_fp32_groups", "update_lp_params"),
    3: (
        "fp32_partitioned_groups_flat",
        "fp16_partitioned_groups_flat",
        "persistent_parameters",
        "_partition_all_parameters",
        "_reassign_or_swap_out_partitioned_parameters",
        "invalidate_secondary_tensor",
    ),
}


def import_deepspeed(device: torch.device) -> Any:
    """``import deepspeed`` for ``device`` (its accelerator chosen, not guessed), quietened.

    Raises:
        ConfigError: the deepspeed package is not installed.
    """
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if device.type == "cuda" else "cpu")
    try:
        import deepspeed
    except ImportError as e:
        raise ConfigError(
            f"inner.engine=deepspeed needs the deepspeed package ({e}); "
            "pip install -e '.[deepspeed]'"
        ) from None
    deepspeed.utils.logger.setLevel(logging.WARNING)
    # DeepSpeed 0.19 calls collectives by names torch 2.13 deprecates, warning on every call.
    warnings.filterwarnings(
        "ignore",
        message=r".*(all_gather_into_tensor|reduce_scatter_tensor)` is deprecated",
        category=FutureWarning,
    )
    return deepspeed


def deepspeed_config(cfg: Config, shards: int) -> dict[str, Any]:
    """The DeepSpeed config of one group: ``inner.deepspeed`` plus what diloco sets itself.

    One micro-batch of ``data.batch_size / S`` sequences per shard rank and inner step (no
    gradient accumulation), clipping at ``inner.grad_clip``, ZeRO stage ``inner.zero_stage``,
    and the client optimiser allowed. (``diloco.config.rules.DEEPSPEED_RESERVED`` lists the keys
    set here.)
    """
    ds = copy.deepcopy(cfg.inner.deepspeed)
    zero = dict(ds.get("zero_optimization", {}))
    zero["stage"] = cfg.inner.zero_stage
    ds.update(
        train_batch_size=cfg.data.batch_size,
        train_micro_batch_size_per_gpu=cfg.data.batch_size // shards,
        gradient_accumulation_steps=1,
        gradient_clipping=cfg.inner.grad_clip,
        zero_allow_untested_optimizer=True,
        zero_optimization=zero,
    )
    ds.setdefault("steps_per_print", 2**31 - 1)  # diloco logs its own metrics
    return ds


class ShardGroupMPU:
    """DeepSpeed's ``mpu`` for one group: data parallel = the group's S shard ranks.

    There is no model parallelism: each rank is its own model-parallel group (a single-rank
    process group: DeepSpeed all-reduces gradient norms over it, and ``None`` would mean the
    whole world).
    """

    def __init__(self, shard_group: Any, own_group: Any):
        self._shard_group = shard_group
        self._own_group = own_group

    def get_data_parallel_group(self) -> Any:
        return self._shard_group

    def get_data_parallel_world_size(self) -> int:
        return dist.get_world_size(self._shard_group)

    def get_data_parallel_rank(self) -> int:
        return dist.get_rank(self._shard_group)

    def get_data_parallel_group_ranks(self) -> list[int]:
        return dist.get_process_group_ranks(self._shard_group)

    def get_model_parallel_group(self) -> Any:
        return self._own_group

    def get_model_parallel_world_size(self) -> int:
        return 1

    def get_model_parallel_rank(self) -> int:
        return 0


class DeepSpeedInner:
    """The inner optimiser of a DeepSpeed group, as :class:`diloco.DiLoCo` sees it.

    ``step`` is ``engine.step()`` (clip, optimiser step, model refresh; it also clears the
    gradients, so ``zero_grad`` has nothing left to do); ``param_groups`` are the torch
    optimiser's (the LR schedule and β ratios read and set them); ``backward`` is
    ``engine.backward``. :meth:`fast_tensors` and :meth:`refresh_model` are the wrapper's
    ``fast_tensors`` and ``after_fast_write``.
    """

    def __init__(self, engine: Any):
        self.engine = engine
        self.optimizer = engine.optimizer  # the ZeRO optimiser around the torch one
        self.stage = engine.zero_optimization_stage()
        if self.stage not in _INTERNALS:
            raise ConfigError(f"inner.zero_stage must be 1, 2 or 3, got {self.stage}")
        missing = [a for a in _INTERNALS[self.stage] if not hasattr(self.optimizer, a)]
        if missing:
            import deepspeed

            raise ConfigError(
                f"DeepSpeed {deepspeed.__version__}'s ZeRO-{self.stage} optimiser has no "
                f"{', '.join(missing)}; diloco's DeepSpeed engine was written for 0.19 "
                "(pip install 'deepspeed>=0.19,<0.20')"
            )

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self.optimizer.param_groups

    def backward(self, loss: Tensor) -> None:
        """Backward pass and gradient reduction over the group's shards."""
        self.engine.backward(loss)

    def step(self, closure: Any = None) -> None:
        if closure is not None:
            raise ValueError("DeepSpeed's step takes no closure")
        self.engine.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Nothing to do: ``engine.step()`` already cleared the gradients."""

    def fast_tensors(self) -> list[Tensor]:
        """This rank's partitions of the fp32 master weights (one flat tensor per group)."""
        if self.stage == 3:
            return list(self.optimizer.fp32_partitioned_groups_flat)
        return list(self.optimizer.single_partition_of_fp32_groups)

    @torch.no_grad()
    def refresh_model(self) -> None:
        """Make the model's weights equal the fp32 partitions again (a collective over the
        group's shards), as DeepSpeed does at the end of its own step."""
        opt = self.optimizer
        if self.stage < 3:
            opt.update_lp_params()  # copy into the model-precision partition, all-gather
            return
        opt._partition_all_parameters()  # release every gathered parameter first
        for sub_group in range(len(opt.fp16_partitioned_groups_flat)):
            opt._reassign_or_swap_out_partitioned_parameters(sub_group)  # ds_tensor ← fp32
        persistent = opt.persistent_parameters
        if persistent:  # small parameters stay gathered between steps
            persistent[0].all_gather(persistent)
        opt.invalidate_secondary_tensor()

    def full_state_dict(self) -> dict[str, Tensor]:
        """The full, unsharded fp32 ``state_dict`` of the model on the CPU, read from the fp32
        partitions (a collective over the group's shards; tied weights under both names)."""
        from deepspeed.utils import safe_get_full_fp32_param

        out: dict[str, Tensor] = {}
        gathered: dict[int, Tensor] = {}
        for name, t in self.engine.module.state_dict(keep_vars=True).items():
            if isinstance(t, nn.Parameter) and t.requires_grad:
                if id(t) not in gathered:
                    gathered[id(t)] = safe_get_full_fp32_param(t).detach().float().cpu()
                out[name] = gathered[id(t)]
            else:
                out[name] = t.detach().cpu().clone()
        return out

    def state_dict(self) -> dict[str, Any]:
        """This rank's ZeRO optimiser state (its partitions of the master weights and of the
        optimiser state)."""
        return {"zero": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict` of this rank (same S) and refresh the model."""
        shards = dist.get_world_size(self.optimizer.dp_process_group)
        self.optimizer.load_state_dict(
            [state["zero"]] * shards, load_optimizer_states=True, load_from_fp32_weights=True
        )
        self.refresh_model()


def _ensure_process_group(runtime: Runtime) -> None:
    """DeepSpeed needs torch.distributed: give a single process a one-rank gloo/NCCL group and
    a (1, 1) mesh (``runtime.close()`` tears it down)."""
    if runtime.mesh is not None:
        return
    from torch.distributed.device_mesh import init_device_mesh

    os.environ.setdefault("LOCAL_RANK", "0")  # DeepSpeed insists on a launcher's variable
    backend = "nccl" if runtime.device.type == "cuda" else "gloo"
    dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    runtime.owns_process_group = True
    runtime.mesh = init_device_mesh(runtime.device.type, (1, 1), mesh_dim_names=("group", "shard"))
    runtime.reducer = MeshReducer(runtime.mesh)


def build_deepspeed(
    cfg: Config, model: nn.Module, optimizer: torch.optim.Optimizer, runtime: Runtime
) -> DeepSpeedInner:
    """The DeepSpeed engine of this rank's group around ``model`` and its inner ``optimizer``
    (the torch optimiser over ``model``'s parameters), as the wrapper's inner optimiser; the
    engine is its ``.engine``.

    ``model`` must hold the same initial weights on every rank (``build_model`` seeds it). A
    single process gets a one-rank process group (``runtime.mesh``/``reducer`` are set).

    Raises:
        ConfigError: deepspeed is not installed, or not a version this module knows.
    """
    deepspeed = import_deepspeed(runtime.device)
    _ensure_process_group(runtime)
    ops = getattr(deepspeed.ops, "__compatible_ops__", None)
    if runtime.device.type == "cpu" and isinstance(ops, dict):
        ops["deepspeed_shm_comm"] = False  # inference-only op; see the module docstring
    deepspeed.init_distributed(dist_backend=dist.get_backend(), dist_init_required=False)
    own_group, _ = dist.new_subgroups(group_size=1)
    mpu = ShardGroupMPU(runtime.mesh.get_group("shard"), own_group)
    engine, *_ = deepspeed.initialize(
        model=model,
        optimizer=optimizer,
        config=deepspeed_config(cfg, runtime.shards),
        mpu=mpu,
        dist_init_required=False,
    )
    return DeepSpeedInner(engine)


class DeepSpeedCheckpointer(Checkpointer):
    """:class:`diloco.persist.checkpoint.Checkpointer` for DeepSpeed groups: same ``step_<N>/``
    layout, meta.json, atomic write (``.tmp`` then rename), pruning and resume rules, with

    * ``group<g>/inner/``: DeepSpeed's ``engine.save_checkpoint`` of group g (model weights,
      each shard rank's ZeRO partitions of the fp32 master weights and optimiser state), written
      by the group's S ranks; plus ``group<g>/residual_shard<s>.pt`` with compression;
    * ``outer/``: θ and the outer buffers, flat tensors shaped like the fp32 partitions
      (``slow.shard<s>.<i>``, ``outer.shard<s>.<i>.<buffer>``), saved once by group 0 (DCP).

    Loading needs the checkpoint's S (the partitions' layout depends on it); G may change as
    with FSDP2 (group g resumes group g mod G_saved's inner state).
    """

    def load(self, ckpt: str | os.PathLike) -> dict[str, Any]:
        saved = read_meta(ckpt)["shards"]
        if saved != self.runtime.shards:
            raise CheckpointError(
                f"checkpoint {ckpt} has {saved} shards per group, this run has "
                f"{self.runtime.shards}; DeepSpeed checkpoints resume with the same "
                f"topology.shards (set topology.shards={saved})"
            )
        return super().load(ckpt)

    def _named_params(self) -> Iterator[tuple[str, Tensor]]:
        """The module's parameters with their full shapes (ZeRO-3 leaves empty tensors)."""
        for name, p in self.model.module.named_parameters():
            if p.requires_grad:
                yield name, torch.empty(getattr(p, "ds_shape", p.shape), device="meta")

    def _outer_state(self) -> dict[str, Any]:
        shard, theta = self.runtime.shard, self.dl.slow_tensors()
        state: dict[str, Any] = {"slow": {f"shard{shard}.{i}": t for i, t in enumerate(theta)}}
        buffers = outer_buffers(self.dl.outer, theta)
        outer = {f"shard{shard}.{i}": b for i, b in enumerate(buffers) if b}
        if outer:
            state["outer"] = outer
        return state

    def _save_group(self, path: Path, pg: Any) -> None:
        path.mkdir(parents=True, exist_ok=True)
        self.model.save_checkpoint(str(path), tag=CHECKPOINT_TAG, save_latest=False)
        residuals = self._residuals()
        if residuals:
            save_synced([e.cpu() for e in residuals], self._residual_file(path))

    def _load_group(self, path: Path, pg: Any, own_group: bool) -> dict[str, Any]:
        if not (path / CHECKPOINT_TAG).is_dir():
            raise CheckpointError(f"checkpoint part {path / CHECKPOINT_TAG} is missing")
        residual = self._residual_file(path)
        loaded = torch_load(residual) if residual.is_file() else []
        return {"path": path, "residuals": loaded, "own_group": own_group}

    def _set_group_state(self, state: dict[str, Any]) -> None:
        try:
            load_path, _ = self.model.load_checkpoint(
                str(state["path"]), tag=CHECKPOINT_TAG, load_lr_scheduler_states=False
            )
        except Exception as e:  # DeepSpeed raises whatever its reader hit
            raise CheckpointError(
                f"cannot load {state['path'] / CHECKPOINT_TAG}: {type(e).__name__}: {e}"
            ) from None
        if load_path is None:
            raise CheckpointError(f"DeepSpeed found no checkpoint in {state['path']}")
        if self._residuals() and state["residuals"]:
            if state["own_group"]:
                with torch.no_grad():
                    for e, t in zip(self._residuals(), state["residuals"], strict=False):
                        e.copy_(t)
            else:
                self._load_residuals(own_group=False)

    def _residual_file(self, path: Path) -> Path:
        return path / f"residual_shard{self.runtime.shard}.pt"
