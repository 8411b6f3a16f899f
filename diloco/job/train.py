"""The training job behind ``diloco train``: config → runtime → model + data → loop → outputs.

The loop, one inner step at a time (every rank of every group runs the same code):

1. draw this group's batch (its own seeded stream) and keep this shard's rows;
2. forward/backward on the fast weights, clip, ``DiLoCo.step()`` (inner step, and every K
   steps the outer step), then the LR schedule (``inner.engine=deepspeed``: DeepSpeed's backward
   and step, which clips; :mod:`diloco.job.engines.deepspeed`);
3. every ``log_every`` steps a ``metrics.jsonl`` record; every ``eval_every`` steps the val
   loss of the slow weights θ;
4. at the end of every ``checkpoint_every``-th round (and of the run) a checkpoint
   (:mod:`diloco.persist.checkpoint`); its duration is the next record's ``checkpoint_s``.

A run whose ``run.out_dir`` holds a checkpoint continues from it (``--resume``; this is how a
restarted ``torchrun`` job recovers) at the step after it, without logging step 0 again.

Training always ends with a sync, so the final θ contains every inner step; the final val loss
is measured on that θ, and rank 0 writes it to ``final_model.pt`` (the full, unsharded
``model.state_dict()`` of θ, fp32 on the CPU; ``torch.load`` it into a ``GPT``).

With G > 1 groups every rank checks that θ is the same in all groups (a float64 checksum of the
local slow shards, one small all-reduce) before the first step, every ``train.check_every``
rounds and after the last round; a mismatch stops the job with a ``TopologyError``.

Observers (the tests' fault injection) see the job only through :mod:`diloco.job.events`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from diloco.algorithm.fragments import streaming_options
from diloco.algorithm.streaming import StreamingDiLoCo
from diloco.algorithm.wrapper import DiLoCo, SyncReport
from diloco.comm.elastic.quorum import RunFinished
from diloco.comm.topology import Runtime, init_runtime
from diloco.config import Config, config_fingerprint, config_to_dict, dump_config
from diloco.errors import ConfigError, TopologyError, note, warn
from diloco.files import write_atomic, write_text_atomic
from diloco.job import events
from diloco.job.batches import Prefetcher
from diloco.job.data import eval_batches, shard_batch
from diloco.job.device import Clock, StepTimes, run_fields, set_fast_matmul
from diloco.job.elastic import GroupState, elastic_summary, group_config
from diloco.job.hf_data import load_data, make_stream
from diloco.job.inner import build_inner_optimizer, build_scheduler, clip_gradients, scalar
from diloco.job.metrics import MetricsLogger, peak_rss_mb
from diloco.job.preflight import check_device, check_memory, check_model, check_packages
from diloco.job.progress import ProgressBar
from diloco.models.build import build_model as build_configured_model
from diloco.models.build import model_dims
from diloco.persist.checkpoint import Checkpointer
from diloco.persist.resume import plan_resume, read_meta
from diloco.persist.rundir import RunLock, check_out_dir, guard_finished
from diloco.testing import faults

__all__ = ["train", "build_model", "build_inner", "build_diloco", "evaluate"]


def build_model(cfg: Config, vocab_size: int) -> nn.Module:
    """The model of ``cfg.model`` (the GPT, or ``model.source=hf:PATH``), initialised from
    ``run.seed`` (identical on every rank) or loaded from the directory's weights; compiled with
    ``train.compile`` and recomputed with ``train.activation_checkpointing``
    (:func:`diloco.models.build.build_model`)."""
    return build_configured_model(
        cfg.model,
        cfg.run.seed,
        vocab_size,
        compile=cfg.train.compile,
        recompute=cfg.train.activation_checkpointing,
    )


def build_inner(cfg: Config, model: nn.Module) -> tuple[torch.optim.Optimizer, Any]:
    """The inner optimiser over ``model``'s parameters and its LR schedule, for ``cfg``."""
    i, steps = cfg.inner, cfg.train.steps
    inner = build_inner_optimizer(
        model,
        i.optimizer,
        lr=i.lr,
        weight_decay=i.weight_decay,
        betas=i.betas,
        eps=i.eps,
        momentum=i.momentum,
        nesterov=i.nesterov,
        muon_lr=i.muon_lr,
    )
    scheduler = build_scheduler(
        inner,
        steps,
        warmup_steps=i.warmup_steps,
        schedule=i.schedule,
        min_lr_ratio=i.min_lr_ratio,
        decay_frac=i.decay_frac,
    )
    return inner, scheduler


def build_diloco(
    cfg: Config, model: nn.Module, runtime: Runtime, inner: tuple[Any, Any] | None = None, **hooks
) -> tuple[DiLoCo, Any]:
    """Inner optimiser, LR schedule and the DiLoCo wrapper for ``cfg``.

    ``inner``: an (inner optimiser, LR schedule) pair built elsewhere (default
    :func:`build_inner`); ``hooks``: the wrapper's ``fast_tensors`` and ``after_fast_write``, for
    an engine that keeps the fast weights itself (:mod:`diloco.job.engines.deepspeed`).
    """
    o, steps = cfg.outer, cfg.train.steps
    inner, scheduler = build_inner(cfg, model) if inner is None else inner
    streaming = streaming_options(o)  # {} unless outer.fragments/sync_delay/mix_alpha ask for it
    dl = (StreamingDiLoCo if streaming else DiLoCo)(
        model,
        inner,
        outer=o.method,
        sync_every=o.sync_every,
        outer_lr=o.lr,
        outer_momentum=o.momentum,
        ema_beta=o.ema_beta,
        ema_gamma=o.ema_gamma,
        ema_init=o.ema_init,
        ema_warmup_steps=int(o.ema_warmup * steps),
        ema_rest_steps=int(o.ema_rest * steps),
        total_steps=steps,
        reducer=runtime.reducer,
        offload=o.offload,
        max_bad_rounds=cfg.train.max_bad_rounds,
        **streaming,
        **hooks,
    )
    return dl, scheduler


@torch.no_grad()
def evaluate(model: nn.Module, batches: list, runtime: Runtime) -> float:
    """Mean loss over the fixed val batches (this group's shard rows), averaged over ranks."""
    was_training = model.training
    model.eval()
    total = 0.0
    for x, y in batches:
        x, y = shard_batch(x, y, runtime.shard, runtime.shards)
        with runtime.autocast():
            _, loss = model(x.to(runtime.device), y.to(runtime.device))
        total += float(loss)
    model.train(was_training)
    return runtime.mean(total / len(batches))


def _round_fields(report: SyncReport) -> dict[str, float]:
    fields = {
        "pseudo_grad_norm": report.pseudo_grad_norm,
        "outer_skipped": report.skipped,
        "reduce_s": report.reduce_s,
        "outer_s": report.delta_s + report.outer_s,
    }
    if report.beta:
        fields["ema_beta"] = report.beta
    fields.update(report.reducer)
    return fields


def _check_groups_agree(dl: DiLoCo, runtime: Runtime, last_ok: int) -> dict[str, float]:
    """Stop the job if θ differs between groups; returns ``theta_sumsq`` (Σθ², for the log).

    ``last_ok`` is the round of the previous passing check (the current round: the start).
    """
    try:
        sums = runtime.check_groups_agree(dl.slow_tensors() or dl.fast_tensors())
    except TopologyError as e:
        when = (
            f"at the start (round {last_ok}): initialisation or restore differs"
            if last_ok == dl.outer_steps
            else f"after round {dl.outer_steps} (last agreed at round {last_ok})"
        )
        raise TopologyError(f"slow weights differ between groups {when}: {e}") from None
    return {"theta_sumsq": sums[0][1]}


def _save_final_model(model: nn.Module, dl: DiLoCo, runtime: Runtime, path: Path) -> None:
    """Rank 0 writes θ as a full state dict (a collective: every rank must call it)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    full_state_dict = getattr(dl.inner, "full_state_dict", None)  # DeepSpeed: its own gather
    with dl.slow_weights():
        if full_state_dict is not None:
            state = full_state_dict()
        else:
            state = get_model_state_dict(model, options=options)
        # Written inside the block: unsharded, ``state`` holds views of the parameters, which
        # get the fast weights back on exit (they differ from θ with streaming fragments).
        if runtime.is_main:
            write_atomic(path, lambda f: torch.save(state, f))


def _maybe_checkpoint(
    ckpt: Checkpointer, step: int, val_loss: float, pending: dict, on_checkpoint: OnCheckpoint
) -> None:
    """At a checkpoint step (after its log line), save; the next record gets ``checkpoint_s``."""
    if ckpt.due(step):
        loop = {"val_loss": val_loss, "round_fields": dict(pending)}
        with ckpt.runtime.busy():
            pending["checkpoint_s"] = ckpt.save(step, loop)
        if on_checkpoint is not None:
            on_checkpoint(ckpt.root / f"step_{step}")


@contextlib.contextmanager
def _run_dir(out_dir: Path, is_main: bool) -> Iterator[None]:
    """The main rank creates ``out_dir`` and holds its :class:`RunLock` for the run's lifetime;
    a directory this created is removed again if the run fails before writing anything."""
    if not is_main:
        yield
        return
    created = not out_dir.exists()
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        lock = RunLock(out_dir).acquire()
    except OSError as e:
        raise ConfigError(
            f"run.out_dir={str(out_dir)!r} is not writable ({e.strerror}); choose another directory"
        ) from None
    try:
        yield
    finally:
        lock.release()
        if created:
            with contextlib.suppress(OSError):
                out_dir.rmdir()  # only if empty: the run wrote nothing


#: Hooks for a launcher (Ray): called on every rank, in the same order, so they may hold a
#: barrier. ``on_log(record)`` after each log step's record (rank 0's goes to metrics.jsonl);
#: ``on_checkpoint(path)`` after checkpoint ``RUN_DIR/checkpoints/step_<N>`` is complete.
OnLog = Callable[[dict[str, Any]], None] | None
OnCheckpoint = Callable[[Path], None] | None


def train(
    cfg: Config,
    resume: str | None = None,
    force: bool = False,
    on_log: OnLog = None,
    on_checkpoint: OnCheckpoint = None,
) -> dict[str, Any]:
    """Run the job described by ``cfg``; returns the summary (also written to summary.json).

    ``resume``/``force``: see :func:`diloco.persist.resume.plan_resume` (None: continue from the
    newest checkpoint in ``run.out_dir`` if there is one, as a restarted torchrun job must).
    ``on_log``/``on_checkpoint``: see :data:`OnLog`, :data:`OnCheckpoint` (e.g. Ray reports).
    The job emits its :mod:`diloco.job.events`; the test-only fault observer is installed here
    when a ``DILOCO_TEST_*`` variable asks for it (:mod:`diloco.testing.faults`).
    """
    faults.install_from_env()
    check_out_dir(cfg.run.out_dir)  # the input and the machine first, before any work
    check_device(cfg.run.device)
    check_packages(cfg)
    check_model(cfg)
    check_memory(cfg)
    o = cfg.outer
    if cfg.topology.elastic:
        from diloco.comm.elastic.runtime import init_elastic_runtime

        cfg = group_config(cfg)  # this group's own run directory
        runtime = init_elastic_runtime(
            cfg.topology, cfg.run.device, o.compress, o.compress_block, config_fingerprint(cfg)
        )
    else:
        runtime = init_runtime(cfg.topology, cfg.run.device, o.compress, o.compress_block)
    set_fast_matmul(runtime.device)
    if o.compress != "none" and runtime.groups == 1:
        msg = f"outer.compress={o.compress} does nothing with one group (nothing is exchanged)"
        warn(msg, runtime.is_main)
    try:
        with _run_dir(Path(cfg.run.out_dir), runtime.is_main):
            summary = _train(cfg, runtime, resume, force, on_log, on_checkpoint)
            runtime.barrier()  # no rank tears its process group down while another still talks
        return summary
    except RunFinished as e:  # an elastic group that came back after the last round
        note(str(e), runtime.is_main)
        return {"finished_elsewhere": str(e)}
    finally:
        runtime.close()


def _build_engine(
    cfg: Config, runtime: Runtime, vocab_size: int
) -> tuple[nn.Module, DiLoCo, Any, type[Checkpointer]]:
    """(model, DiLoCo wrapper, LR scheduler, checkpointer class) of ``inner.engine``: FSDP2
    (the model sharded over the group's shard ranks), or DeepSpeed ZeRO (the model becomes the
    DeepSpeed engine; the wrapper reads and writes its flat fp32 partitions)."""
    if cfg.inner.engine != "deepspeed":
        model = runtime.parallelize(build_model(cfg, vocab_size), cfg.topology.mixed_precision)
        dl, scheduler = build_diloco(cfg, model, runtime)
        return model, dl, scheduler, Checkpointer
    from diloco.job.engines.deepspeed import DeepSpeedCheckpointer, build_deepspeed

    model = build_model(cfg, vocab_size).to(runtime.device)
    optimizer, scheduler = build_inner(cfg, model)
    inner = build_deepspeed(cfg, model, optimizer, runtime)
    hooks = {"fast_tensors": inner.fast_tensors, "after_fast_write": inner.refresh_model}
    dl, _ = build_diloco(cfg, inner.engine, runtime, inner=(inner, scheduler), **hooks)
    return inner.engine, dl, scheduler, DeepSpeedCheckpointer


def _forward_backward(
    runtime: Runtime, model: nn.Module, dl: DiLoCo, x: Tensor, y: Tensor, ds: bool
) -> Tensor:
    """The loss of one (shard of a) batch, its gradients in the fast weights' ``.grad`` (with
    DeepSpeed, ``ds``: in the engine, reduced over the shards)."""
    with runtime.autocast():
        _, loss = model(x.to(runtime.device), y.to(runtime.device))
    if ds:
        dl.inner.backward(loss)
    else:
        loss.backward()
    return loss


def _train(
    cfg: Config,
    runtime: Runtime,
    resume: str | None,
    force: bool,
    on_log: OnLog = None,
    on_checkpoint: OnCheckpoint = None,
) -> dict[str, Any]:
    out_dir = Path(cfg.run.out_dir)
    resume_from = plan_resume(cfg, resume, force, runtime.is_main)
    continues = resume_from is not None and read_meta(resume_from)["step"] < cfg.train.steps
    guard_finished(out_dir, continues, force, runtime.is_main)
    seq_len = cfg.model.block_size
    corpus = load_data(cfg, runtime)
    deepspeed = cfg.inner.engine == "deepspeed"
    model, dl, scheduler, make_checkpointer = _build_engine(cfg, runtime, corpus.vocab_size)
    dims = model_dims(cfg.model)
    B, vocab = cfg.data.batch_size, dims.vocab_size
    stream = make_stream(corpus, B, seq_len, cfg.run.seed, runtime, vocab)
    batches = Prefetcher(stream, runtime.shard, runtime.shards, runtime.device)
    val = eval_batches(corpus.val, B, seq_len, cfg.train.eval_batches, vocab)
    torch.manual_seed(cfg.run.seed + 1000 * runtime.group + runtime.shard)  # dropout streams
    # An elastic group checkpoints on its own, into its own directory, as its "group 0".
    view = dataclasses.replace(runtime, group=0) if runtime.elastic else runtime
    ckpt = make_checkpointer(cfg, view, model, dl, scheduler, batches)
    resumed = ckpt.load(resume_from) if resume_from is not None else None
    first_step = resumed["step"] + 1 if resumed else 1
    if runtime.is_main:  # only now: a refused or failed resume leaves the run directory as it was
        dump_config(cfg, out_dir / "config.yaml")
    if runtime.elastic:  # join the job: heal from and to the other groups at round boundaries
        group_state = GroupState(dl, scheduler, restored=resumed is not None)
        runtime.reducer.attach(group_state)
        runtime.membership.start(dl.outer_steps, group_state.trained())
    check = runtime.groups > 1 and not runtime.elastic  # elastic: every round compares θ
    checked_round = dl.outer_steps  # 0, or the round a resumed run restarts from
    start_check = _check_groups_agree(dl, runtime, checked_round) if check else {}

    steps, tc = cfg.train.steps, cfg.train
    tokens_per_step = cfg.data.batch_size * seq_len * runtime.groups
    logger = MetricsLogger(
        out_dir, runtime.is_main, cfg.run.tensorboard, cfg.run.wandb, config_to_dict(cfg)
    )
    logger.truncate_after(first_step - 1 if resumed else -1)  # drop what a crashed run logged
    bar = ProgressBar(steps, enabled=runtime.is_main and cfg.run.progress, start=first_step - 1)
    timers = StepTimes(Clock(runtime.device))
    device_fields = run_fields(dims, runtime)
    start = time.perf_counter()
    round_fields: dict[str, float] = {}
    if resumed is None:
        val_loss = evaluate(model, val, runtime)
        record0 = {"step": 0, "outer_step": 0, "tokens": 0, "val_loss": val_loss, **start_check}
        bar.set_val(0, val_loss)
        logger.log(record0)
        if on_log is not None:
            on_log(record0)
    else:  # the checkpointed run logged every step up to the checkpoint
        val_loss = resumed["loop"]["val_loss"]
        round_fields = resumed["loop"]["round_fields"]
    window_start, window_tokens = time.perf_counter(), 0  # the first window: after step 0's eval
    model.train()
    elastic_rounds: list[dict[str, Any]] = []
    step, ran = first_step - 1, 0
    while step < steps:
        step += 1
        ran += 1
        runtime.alive()
        t0 = timers.clock.mark()
        x, y = batches.next()
        loss = _forward_backward(runtime, model, dl, x, y, deepspeed)
        events.emit("after_backward", step=step, dl=dl, rank=runtime.rank, world=runtime.world)
        grad_norm = None if deepspeed else clip_gradients(model, cfg.inner.grad_clip)  # DS clips
        lr = dl.inner.param_groups[-1]["lr"]
        report = dl.step()
        if report is None and step == steps:
            report = dl.sync()  # the final θ includes every inner step
        t2 = timers.clock.mark()
        elastic_event = False
        if report is not None and runtime.elastic:
            elastic_rounds.append(report.reducer)
            elastic_event = bool(
                report.reducer.get("healed_groups")
                or report.reducer.get("exchanges_redone")
                or report.reducer["participants"] < runtime.groups
                or report.reducer["coordinator_kept"]
            )
            step = dl.inner_steps  # a healed group continues at the others' step
        dl.zero_grad()
        scheduler.step()
        outer_s = None
        if report is not None:
            outer_s = report.delta_s + report.reduce_s + report.outer_s
            round_fields = _round_fields(report)
            if report.skipped:
                warn(
                    f"round {report.round} (step {step}): non-finite pseudo-gradient; outer step "
                    f"skipped, fast weights reset to the round's start ({dl.bad_rounds} of "
                    f"train.max_bad_rounds={tc.max_bad_rounds} in a row)",
                    runtime.is_main,
                )
            if check and (dl.outer_steps % tc.check_every == 0 or step == steps):
                round_fields.update(_check_groups_agree(dl, runtime, checked_round))
                checked_round = dl.outer_steps
        timers.add(t0, t2, outer_s)
        window_tokens += tokens_per_step

        eval_now = step == steps or (tc.eval_every and step % tc.eval_every == 0)
        if not (eval_now or step % tc.log_every == 0 or elastic_event):
            _maybe_checkpoint(ckpt, step, val_loss, round_fields, on_checkpoint)
            continue
        loss_value = runtime.mean(float(loss.detach()))  # waits for the step's kernels
        now = time.perf_counter()
        record: dict[str, Any] = {
            "step": step,
            "outer_step": dl.outer_steps,
            "loss": loss_value,
            "lr": lr,
            "tokens": step * tokens_per_step,
            "tokens_per_s": window_tokens / max(1e-9, now - window_start),
        }
        if not math.isfinite(record["loss"]):
            record["loss_nonfinite"] = True
        if grad_norm is not None:
            record["grad_norm"] = scalar(grad_norm)
        record.update(round_fields)
        record.update(device_fields(record["tokens_per_s"]))
        timers.read()
        round_fields = {}
        if eval_now:
            with dl.slow_weights(), runtime.busy():
                val_loss = evaluate(model, val, runtime)
            record["val_loss"] = val_loss
            bar.set_val(step, val_loss)
        logger.log(record)
        if on_log is not None:
            on_log(record)
        bar.update(step, record["loss"], record["tokens_per_s"])
        window_start, window_tokens = time.perf_counter(), 0
        _maybe_checkpoint(ckpt, step, val_loss, round_fields, on_checkpoint)
    batches.close()
    bar.close()
    logger.close()
    if runtime.elastic:  # groups that come back later find the run finished
        runtime.membership.finish(dl.outer_steps)
    _save_final_model(model, dl, runtime, out_dir / "final_model.pt")
    wall = time.perf_counter() - start
    summary = {
        "final_val_loss": val_loss,
        "steps": steps,
        "tokens": steps * tokens_per_step,
        "wall_s": wall,  # this process's (a resumed run: since the resume)
        "tokens_per_s": ran * tokens_per_step / wall,  # the steps this process ran
        "peak_rss_mb": peak_rss_mb(),
        "method": cfg.outer.method,
        "groups": runtime.groups,
        "shards": runtime.shards,
        **timers.summary(),
        **ckpt.summary(),
    }
    if runtime.elastic:
        summary.update(elastic_summary(elastic_rounds, runtime, dl))
    summary.update(device_fields(summary["tokens_per_s"]))
    if runtime.is_main:
        write_text_atomic(out_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
    return summary
