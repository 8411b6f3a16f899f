"""Checkpoints at round boundaries: sharded (DCP), atomic, resumable at another (G, S).

Layout of ``RUN_DIR/checkpoints/step_<N>/`` (N = inner steps done)::

    meta.json          format version, step, round, G, S, the resolved config and its fingerprint,
                       model shapes, LR-schedule and loop state, a manifest of every file with its
                       size, and "complete": true. Written last, into step_<N>.tmp/, which is then
                       renamed to step_<N>/: a step_<N>/ directory is always whole.
    outer/             DCP: θ ("slow.<fqn>") and the outer state ("outer.<fqn>.<buffer>": b for
                       nesterov, m for ema_nesterov), saved once, by group 0's shard ranks, as
                       full-shape tensors (DTensors when FSDP2-sharded), so any S can load them.
    group<g>/          DCP: group g's inner optimiser state ("optim.…"; plus "model.…" for
                       outer.method=none), saved by group g's S shard ranks. Groups' inner states
                       differ; one global save would mix them (docs/design.md §3): one per group.
                       With outer.compress and G > 1 also group g's error-feedback residual
                       ("residual.<fqn>", shaped like θ): it carries over rounds, so a resume
                       without it would not equal the uninterrupted run. A resuming group beyond
                       the saved ones, or a checkpoint without residuals, starts from e = 0.
    extra/group<g>.pt  group g's data-stream position (``BatchStream.state_dict``).
    extra/rank<r>.pt   rank r's RNG states.

The fast weights are not saved: at a round boundary they equal the start point s, which
``DiLoCo.load_state_dict`` rebuilds from θ and the outer state (s = θ, or θ + β·m).

Resuming: :func:`diloco.persist.resume.plan_resume` picks and checks the checkpoint, then
:meth:`Checkpointer.load` restores it. A different S is resharded by DCP. A different G is
allowed: group g resumes group (g mod G_saved)'s inner optimiser state; groups beyond the saved
ones start fresh data streams, and RNG streams are re-seeded.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from diloco.algorithm.outer import OuterOptimizer
from diloco.algorithm.wrapper import DiLoCo
from diloco.config import Config, config_fingerprint, config_to_dict
from diloco.errors import CheckpointError, note, warn
from diloco.files import fsync_dir
from diloco.job import events
from diloco.persist.checkpoint_files import (
    dcp_keys,
    dcp_save,
    dcp_view,
    load_dcp,
    rng_state,
    save_synced,
    set_rng_state,
    torch_load,
    write_synced,
)
from diloco.persist.resume import (
    CHECKPOINTS,
    FORMAT_VERSION,
    RESUME_IGNORE,
    list_checkpoints,
    read_meta,
)

__all__ = ["Checkpointer", "outer_buffers"]

_OUTER_SCALARS = ("beta", "rounds")  # outer param-group entries that are state, not settings


class Checkpointer:
    """Saves and restores one run's training state; every rank must call :meth:`save`/:meth:`load`.

    Args:
        cfg: the resolved config (stored in meta.json).
        runtime: this process's place in the (G, S) layout (``mesh`` None for one process).
        model: the (possibly FSDP2-sharded) model holding the fast weights.
        dl: the DiLoCo wrapper (θ, outer state, inner optimiser, counters); what else the
            checkpointer asks of it is :class:`diloco.algorithm.wrapper.Checkpointable`.
        scheduler: the inner LR schedule.
        stream: this group's BatchStream.
    """

    def __init__(self, cfg: Config, runtime: Any, model: nn.Module, dl: DiLoCo, scheduler, stream):
        self.cfg, self.runtime, self.model, self.dl = cfg, runtime, model, dl
        self.scheduler, self.stream = scheduler, stream
        self.root = Path(cfg.run.out_dir) / CHECKPOINTS
        self.times: list[float] = []

    # ------------------------------------------------------------------ when
    def due(self, step: int) -> bool:
        """A checkpoint after inner ``step``: every ``train.checkpoint_every`` rounds (at the
        round's end) and after the last step (checkpoints on)."""
        every = self.cfg.train.checkpoint_every
        if not every:
            return False
        if step == self.cfg.train.steps:
            return True
        if self.dl.outer is None:  # no rounds: count K steps as one
            return step % (every * self.cfg.outer.sync_every) == 0
        return self.dl.steps_in_round == 0 and self.dl.outer_steps % every == 0

    def summary(self) -> dict[str, float]:
        """``checkpoints`` written and their mean wall time ``checkpoint_s``."""
        if not self.times:
            return {}
        return {"checkpoints": len(self.times), "checkpoint_s": sum(self.times) / len(self.times)}

    # ------------------------------------------------------------------ save
    def save(self, step: int, loop: dict[str, Any]) -> float:
        """Write ``step_<step>/`` atomically and prune to ``train.keep_last``; returns seconds.

        ``loop`` is the training loop's own state (JSON: last val loss, pending log fields).

        Raises:
            CheckpointError: the checkpoint cannot be written (e.g. the disk is full).
        """
        t0 = time.perf_counter()
        try:
            self._save(step, loop)
        except OSError as e:
            raise CheckpointError(
                f"cannot write checkpoint step_{step} in {self.root}: {e.strerror or e}"
            ) from None
        seconds = time.perf_counter() - t0
        self.times.append(seconds)
        return seconds

    def _save(self, step: int, loop: dict[str, Any]) -> None:
        rt = self.runtime
        blocker = self.dl.checkpoint_blocker()
        if blocker is not None:
            raise CheckpointError(f"step {step}: {blocker}")
        tmp = self.root / f"step_{step}.tmp"
        if rt.is_main:
            self.root.mkdir(parents=True, exist_ok=True)
            if tmp.exists():  # left by a crash
                shutil.rmtree(tmp)
            (tmp / "extra").mkdir(parents=True)
        self._barrier()
        pg = self._shard_group()
        if self.dl.outer is not None and rt.group == 0:
            dcp_save(self._outer_state(), tmp / "outer", pg)
        self._save_group(tmp / f"group{rt.group}", pg)
        if rt.shard == 0:
            save_synced(self.stream.state_dict(), tmp / "extra" / f"group{rt.group}.pt")
        save_synced(rng_state(), tmp / "extra" / f"rank{rt.rank}.pt")
        self._barrier()
        if rt.is_main:
            meta = self._meta(step, loop, tmp)
            write_synced(tmp / "meta.json", json.dumps(meta, indent=1) + "\n")
            fsync_dir(tmp)
            events.emit("before_checkpoint_rename", step=step)
            final = self.root / f"step_{step}"
            old = self.root / f"step_{step}.old"
            if final.exists():  # a broken checkpoint of this step that auto skipped
                shutil.rmtree(old, ignore_errors=True)
                final.rename(old)
            tmp.rename(final)
            fsync_dir(self.root)
            shutil.rmtree(old, ignore_errors=True)
            self._prune()
        self._barrier()

    def _meta(self, step: int, loop: dict[str, Any], tmp: Path) -> dict[str, Any]:
        dl, rt = self.dl, self.runtime
        outer_scalars, per_group = {}, []
        if dl.outer is not None:  # streaming: one param group per fragment, each its own β
            per_group = [{k: g[k] for k in _OUTER_SCALARS if k in g} for g in dl.outer.param_groups]
            outer_scalars = per_group[0]
        files = {
            p.relative_to(tmp).as_posix(): p.stat().st_size
            for p in sorted(tmp.rglob("*"))
            if p.is_file() and p.name != "meta.json"
        }
        return {
            "format_version": FORMAT_VERSION,
            "step": step,
            "round": dl.outer_steps,
            "groups": rt.groups,
            "shards": rt.shards,
            "method": dl.method,
            "config_fingerprint": config_fingerprint(self.cfg, RESUME_IGNORE),
            "config": config_to_dict(self.cfg),
            "model_shapes": {n: list(p.shape) for n, p in self._named_params()},
            "counters": {
                "inner_steps": dl.inner_steps,
                "rounds": dl.outer_steps,
                "bad_rounds": dl.bad_rounds,
            },
            "outer_scalars": outer_scalars,
            "outer_group_scalars": per_group,
            "scheduler": self.scheduler.state_dict(),
            "loop": loop,
            "files": files,
            "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "complete": True,
        }

    def _prune(self) -> None:
        """Keep the newest ``train.keep_last`` checkpoints; drop stale ``.tmp`` directories."""
        for old in list_checkpoints(self.root.parent)[self.cfg.train.keep_last :]:
            shutil.rmtree(old, ignore_errors=True)
        for stale in self.root.glob("step_*.tmp"):
            shutil.rmtree(stale, ignore_errors=True)

    # ------------------------------------------------------------------ load
    def load(self, ckpt: str | os.PathLike) -> dict[str, Any]:
        """Restore everything from checkpoint ``ckpt``; returns ``meta`` (``meta["loop"]``, …).

        Raises:
            CheckpointError: a file cannot be read or does not fit this model (on every rank).
        """
        ckpt = Path(ckpt)
        meta = read_meta(ckpt)
        rt, dl = self.runtime, self.dl
        saved_groups = meta["groups"]
        pg = self._shard_group()
        # Settings come from this run's config (they may differ under --force), state from ckpt.
        settings = [{k: v for k, v in g.items() if k != "params"} for g in dl.inner.param_groups]
        error = ""
        group_state: dict[str, Any] = {}
        try:
            if dl.outer is not None:
                load_dcp(self._outer_state(), ckpt / "outer", pg)  # in place, also offloaded
            group_state = self._load_group(
                ckpt / f"group{rt.group % saved_groups}", pg, rt.group < saved_groups
            )
        except CheckpointError as e:
            error = str(e)
        if rt.mean(1.0 if error else 0.0) > 0:  # every rank takes the same decision
            raise CheckpointError(
                error or f"checkpoint {ckpt} could not be loaded on another rank (see its error)"
            )
        self._set_group_state(group_state)
        counters = meta["counters"]
        sd: dict[str, Any] = {
            "method": dl.method,
            "inner": dl.inner.state_dict(),
            "inner_steps": counters["inner_steps"],
            "steps_in_round": 0,
            "rounds": counters["rounds"],
            "bad_rounds": counters["bad_rounds"],
        }
        if dl.outer is not None:
            outer_sd = dl.outer.state_dict()
            per_group = meta.get("outer_group_scalars", [])
            if len(per_group) != len(outer_sd["param_groups"]):
                per_group = [meta["outer_scalars"]] * len(outer_sd["param_groups"])
            for group, scalars in zip(outer_sd["param_groups"], per_group, strict=True):
                group.update(scalars)
            sd["slow"] = dl.slow_tensors()
            sd["outer"] = outer_sd
            if "model" in group_state:  # streaming: the saved fast weights, already restored
                sd["fast"] = dl.fast_tensors()
        dl.load_state_dict(sd)  # also rebuilds the fast weights as the start point s
        for group, own in zip(dl.inner.param_groups, settings, strict=True):
            group.update(own)
        self._load_schedule(meta["scheduler"])
        if rt.group < saved_groups:
            self.stream.load_state_dict(torch_load(ckpt / "extra" / f"group{rt.group}.pt"))
        if (saved_groups, meta["shards"]) == (rt.groups, rt.shards):
            set_rng_state(torch_load(ckpt / "extra" / f"rank{rt.rank}.pt"))
        if rt.is_main and ckpt.parent.resolve() == self.root.resolve():
            self._set_aside_newer(meta["step"])
        note(f"resumed from {ckpt} (step {meta['step']}, round {meta['round']})", rt.is_main)
        return meta

    def _load_schedule(self, state: dict[str, Any]) -> None:
        """Restore the LR schedule's position and set every group's LR from *this* schedule
        (so a run extended with more ``train.steps`` follows its new schedule at once)."""
        sch = self.scheduler
        own = {k: getattr(sch, k) for k in ("base_lrs",) if hasattr(sch, k)}
        sch.load_state_dict(state)
        sch.__dict__.update(own)  # peak LRs from this run's config
        inner = self.dl.inner
        lambdas = getattr(sch, "lr_lambdas", None)
        if lambdas is not None:
            for group, lam, base in zip(inner.param_groups, lambdas, sch.base_lrs, strict=True):
                group["lr"] = base * lam(sch.last_epoch)
            sch._last_lr = [group["lr"] for group in inner.param_groups]

    def _set_aside_newer(self, step: int) -> None:
        """Checkpoints of this run newer than the one resumed belong to an abandoned
        continuation: rename them ``step_<N>.abandoned`` so that ``auto`` never picks them."""
        newer = [p for p in list_checkpoints(self.root.parent) if int(p.name[5:]) > step]
        for p in newer:
            aside = p.with_name(p.name + ".abandoned")
            if aside.exists():
                aside = p.with_name(f"{p.name}.abandoned-{time.strftime('%Y%m%d-%H%M%S')}")
            p.rename(aside)
        if newer:
            names = ", ".join(p.name for p in newer)
            warn(
                f"resuming from step {step}: set aside the newer checkpoints {names} "
                "(renamed *.abandoned)"
            )

    # ------------------------------------------------------------------ state pieces
    def _named_params(self) -> Iterator[tuple[str, Tensor]]:
        self.dl.fast_tensors()  # FSDP2: re-shard root parameters left unsharded by an eval
        return ((n, p) for n, p in self.model.named_parameters() if p.requires_grad)

    def _outer_state(self) -> dict[str, Any]:
        """θ and the outer buffers as DCP targets: views of this rank's local tensors with the
        parameters' global shapes, wherever they live (host memory with ``outer.offload=cpu``),
        so a save reads them and a load writes them in place."""
        buffers = outer_buffers(self.dl.outer, self.dl.slow_tensors())
        slow, outer = {}, {}
        params = list(self._named_params())
        for (name, p), theta, bufs in zip(params, self.dl.slow_tensors(), buffers, strict=True):
            slow[name] = dcp_view(p, theta)
            if bufs:
                outer[name] = {k: dcp_view(p, b) for k, b in bufs.items()}
        state: dict[str, Any] = {"slow": slow}
        if outer:
            state["outer"] = outer
        return state

    def _group_state(self) -> dict[str, Any]:
        from torch.distributed.checkpoint.state_dict import (
            get_model_state_dict,
            get_optimizer_state_dict,
        )

        self.dl.fast_tensors()
        state = {"optim": get_optimizer_state_dict(self.model, self.dl.inner_optimizers())}
        # No θ: the model's weights are the state. Streaming: at a period boundary the fast
        # weights are not the start point, so they are saved too.
        if self.dl.outer is None or self.dl.checkpoint_fast_weights:
            state["model"] = get_model_state_dict(self.model)
        residual = self._residual_state()
        if residual:
            state["residual"] = residual
        return state

    def _residuals(self) -> list[Tensor]:
        """This rank's error-feedback residuals in parameter order ([] without compression)."""
        if getattr(self.dl.reducer, "error_feedback", None) is None:
            return []
        return self.dl.reducer.residuals(self.dl.fast_tensors())

    def _residual_state(self) -> dict[str, Tensor]:
        """The residuals as DCP targets with their parameters' global shapes (reshardable)."""
        residuals = self._residuals()
        if not residuals:
            return {}
        params = list(self._named_params())
        return {n: dcp_view(p, e) for (n, p), e in zip(params, residuals, strict=True)}

    @torch.no_grad()
    def _load_residuals(self, own_group: bool) -> None:
        """After the residuals were loaded in place: zero them for a group that did not exist
        in the checkpoint (a copy of another group's residual would count it twice)."""
        if not own_group:
            for e in self._residuals():
                e.zero_()

    def _save_group(self, path: Path, pg: Any) -> None:
        """Write this group's inner state into ``path`` (DCP, by the group's shard ranks)."""
        dcp_save(self._group_state(), path, pg)

    def _load_group(self, path: Path, pg: Any, own_group: bool) -> dict[str, Any]:
        """Read the inner state saved in ``path`` (``own_group``: saved by this very group);
        :meth:`_set_group_state` applies it once every rank has read its part."""
        group_state = self._group_state()
        if not any(k.startswith("residual.") for k in dcp_keys(path)):
            group_state.pop("residual", None)  # e = 0 (uncompressed run, or G = 1)
        load_dcp(group_state, path, pg)
        if "residual" in group_state:
            self._load_residuals(own_group)
        return group_state

    def _set_group_state(self, state: dict[str, Any]) -> None:
        from torch.distributed.checkpoint.state_dict import (
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        set_optimizer_state_dict(self.model, self.dl.inner_optimizers(), state["optim"])
        if "model" in state:
            set_model_state_dict(self.model, state["model"])

    def _shard_group(self) -> Any:
        mesh = getattr(self.runtime, "mesh", None)
        return None if mesh is None else mesh.get_group("shard")

    def _barrier(self) -> None:
        if getattr(self.runtime, "mesh", None) is not None:
            import torch.distributed as dist

            dist.barrier()


def outer_buffers(outer: OuterOptimizer | None, slow: list[Tensor]) -> list[dict[str, Tensor]]:
    """Per slow tensor of ``slow`` (parameter order), its outer buffers (created as zeros if the
    first round has not run: exactly what the outer optimiser would create)."""
    if outer is None:
        return []
    names = outer.buffer_names()
    out = []
    for p in slow:
        state = outer.state[p]
        for n in names:
            if n not in state:
                state[n] = torch.zeros_like(p)
        out.append({n: state[n] for n in names})
    return out
