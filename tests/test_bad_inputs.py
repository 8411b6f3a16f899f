"""The bad-input catalogue: each user mistake gives exit status 2, one clear line, no loss.

Each case runs the real command line (``diloco.cli.main``, in-process: cheap) on one bad input
and must produce

* exit status 2,
* exactly one stderr line ``diloco: error: …`` (the last line; any other lines are
  ``diloco: warning: …``/notes) that names the field or value,
* no traceback,
* and no change to what was on disk before (checkpoints, config.yaml, metrics.jsonl).

Two cases also run through ``python -m diloco`` in a subprocess. ``docs/errors.md`` is generated
from this table by running it: ``python tests/test_bad_inputs.py`` (rewrites the file).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
import socket
import struct
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # when run as a script to regenerate docs/errors.md
    sys.path.insert(0, str(REPO))

from diloco import cli, errors  # noqa: E402
from diloco.config import load_config  # noqa: E402
from diloco.job.train import train  # noqa: E402
from diloco.launchers.local import child_env  # noqa: E402
from diloco.testing import faults  # noqa: E402

DOC = REPO / "docs" / "errors.md"
BIN_MAGIC = 20240520


@dataclass
class Ctx:
    """Where a case may create files; ``run()`` copies a finished run with two checkpoints."""

    tmp: Path
    corpus: Path
    template: Path

    def sets(self, out: Path | str, *extra: str) -> list[str]:
        tiny = [
            f"data.source=text:{self.corpus}",
            "model.n_layer=2",
            "model.n_embd=32",
            "model.n_head=2",
            "model.block_size=32",
            "data.batch_size=8",
            "train.steps=24",
            "outer.sync_every=4",
            "inner.warmup_steps=4",
            "train.eval_every=8",
            "train.eval_batches=2",
            "train.log_every=4",
            "train.checkpoint_every=2",
            "run.device=cpu",
            "run.progress=false",
            f"run.out_dir={out}",
            *extra,
        ]
        return [a for o in tiny for a in ("--set", o)]

    def train(self, *extra: str, out: Path | None = None) -> list[str]:
        return ["train", *self.sets(out or self.tmp / "out", *extra)]

    def run(self) -> Path:
        dst = self.tmp / "run"
        if not dst.exists():
            shutil.copytree(self.template, dst)
        return dst

    def ckpt(self, step: int = 24) -> Path:
        return self.run() / "checkpoints" / f"step_{step}"


@dataclass
class Case:
    id: str
    what: str  # the bad input, in words (docs/errors.md)
    shown: str  # the command as a user would type it (docs/errors.md)
    argv: Callable[[Ctx], list[str]]
    expect: str  # a fragment the error line must contain
    env: dict[str, str] = field(default_factory=dict)


CASES: list[Case] = []


def case(id: str, what: str, shown: str, expect: str, env: dict[str, str] | None = None):
    def register(fn: Callable[[Ctx], list[str]]) -> Callable[[Ctx], list[str]]:
        CASES.append(Case(id, what, shown, fn, expect, env or {}))
        return fn

    return register


def setting(id: str, what: str, override: str, expect: str) -> None:
    """A case that is one bad ``--set`` on the tiny run."""
    CASES.append(
        Case(id, what, f"diloco train --set {override}", lambda ctx: ctx.train(override), expect)
    )


def write_shard(
    path: Path, tokens: list[int], magic: int = BIN_MAGIC, version: int = 1, n: int | None = None
) -> Path:
    header = struct.pack("<256i", magic, version, len(tokens) if n is None else n, *[0] * 253)
    path.write_bytes(header + struct.pack(f"<{len(tokens)}H", *tokens))
    return path


# --- configuration -------------------------------------------------------------------------------

setting(
    "unknown-key",
    "mistyped config key",
    "outer.sync_evry=8",
    "unknown config key 'outer.sync_evry'; did you mean 'outer.sync_every'?",
)
setting(
    "unknown-section",
    "mistyped config section",
    "outr.lr=0.5",
    "unknown config section 'outr'; did you mean 'outer'?",
)
setting(
    "wrong-type-int",
    "text where an integer belongs",
    "outer.sync_every=four",
    "outer.sync_every must be an integer, got 'four' (str)",
)
setting(
    "wrong-type-bool",
    "not a boolean",
    "run.progress=maybe",
    "run.progress must be true or false, got 'maybe' (str)",
)
setting(
    "wrong-type-float",
    "text where a number belongs",
    "inner.lr=fast",
    "inner.lr must be a finite number, got 'fast' (str)",
)
setting(
    "wrong-type-list",
    "a number where a list belongs",
    "inner.betas=0.9",
    "inner.betas must be a list of numbers, got 0.9 (float)",
)
setting("k-zero", "K <= 0", "outer.sync_every=0", "outer.sync_every must be >= 1, got 0")
setting("k-negative", "K < 0", "outer.sync_every=-4", "outer.sync_every must be >= 1, got -4")
setting(
    "ema-beta-out-of-range",
    "beta not in [0, 1)",
    "outer.ema_beta=1.0",
    "outer.ema_beta must be in [0, 1), got 1.0",
)
setting(
    "ema-gamma-out-of-range",
    "gamma not in [0, 1)",
    "outer.ema_gamma=-0.1",
    "outer.ema_gamma must be in [0, 1), got -0.1",
)
setting(
    "outer-momentum-out-of-range",
    "outer momentum mu = 1",
    "outer.momentum=1",
    "outer.momentum must be in [0, 1), got 1.0",
)
setting("inner-lr-zero", "inner lr <= 0", "inner.lr=0", "inner.lr must be > 0, got 0.0")
setting("outer-lr-negative", "outer lr <= 0", "outer.lr=-0.5", "outer.lr must be > 0, got -0.5")
setting(
    "unknown-choice",
    "unknown outer method",
    "outer.method=adam",
    "outer.method must be one of nesterov, sgd, ema_nesterov, none; got 'adam'",
)
setting(
    "heads-do-not-divide",
    "n_embd not divisible by n_head",
    "model.n_head=3",
    "model.n_embd (32) must be divisible by model.n_head (3)",
)
setting(
    "batch-not-divisible-by-shards",
    "group batch not divisible by S",
    "topology.shards=3",
    "data.batch_size (8) must be divisible by topology.shards (3)",
)
setting(
    "warmup-too-long",
    "warm-up longer than the run",
    "inner.warmup_steps=30",
    "inner.warmup_steps (30) must be < train.steps (24)",
)
setting(
    "bad-data-source",
    "data source of unknown kind",
    "data.source=hdfs://corpus",
    "data.source must be embedded, text:<path>, bin:<glob> or hf:<path>, got 'hdfs://corpus'",
)


@case(
    "set-not-key-value",
    "--set without '='",
    "diloco train --set outer.sync_every",
    "--set 'outer.sync_every' is not of the form --set section.key=value",
)
def _(ctx):
    return ["train", "--set", "outer.sync_every"]


@case(
    "config-file-missing",
    "config file that does not exist",
    "diloco train --config nope.yaml",
    "config file not found: '",
)
def _(ctx):
    return ["train", "--config", str(ctx.tmp / "nope.yaml")]


@case(
    "config-file-bad-yaml",
    "config file that is not YAML",
    "diloco train --config bad.yaml",
    "bad.yaml:2:1: invalid YAML",
)
def _(ctx):
    path = ctx.tmp / "bad.yaml"
    path.write_text("outer: [sync_every: 4\n")
    return ["train", "--config", str(path)]


@case(
    "config-file-not-mapping",
    "config file holding a list",
    "diloco train --config list.yaml",
    "must be a mapping of sections",
)
def _(ctx):
    path = ctx.tmp / "list.yaml"
    path.write_text("- outer\n- inner\n")
    return ["train", "--config", str(path)]


# --- topology ------------------------------------------------------------------------------------


@case(
    "world-not-g-times-s",
    "launched world size != G x S",
    "WORLD_SIZE=3 diloco train --set topology.groups=2 --set topology.shards=2",
    "world size 3 != topology.groups × topology.shards = 2 × 2; launch 4 processes",
    env={"WORLD_SIZE": "3", "RANK": "0", "LOCAL_WORLD_SIZE": "3"},
)
def _(ctx):
    return ctx.train("topology.groups=2", "topology.shards=2")


# --- data ----------------------------------------------------------------------------------------


@case(
    "data-path-missing",
    "text corpus that does not exist",
    "diloco train --set data.source=text:missing.txt",
    "does not exist or is not a file",
)
def _(ctx):
    return ctx.train(f"data.source=text:{ctx.tmp / 'missing.txt'}")


@case(
    "data-empty",
    "empty text corpus",
    "diloco train --set data.source=text:empty.txt",
    "is empty; give a non-empty UTF-8 file",
)
def _(ctx):
    (ctx.tmp / "empty.txt").write_text("")
    return ctx.train(f"data.source=text:{ctx.tmp / 'empty.txt'}")


@case(
    "data-too-small",
    "corpus too small for the sequence length",
    "diloco train --set data.source=text:small.txt  (40 bytes, block_size 32)",
    "has 40 tokens but needs at least",
)
def _(ctx):
    (ctx.tmp / "small.txt").write_text("x" * 40)
    return ctx.train(f"data.source=text:{ctx.tmp / 'small.txt'}")


@case(
    "data-not-utf8",
    "text corpus that is not UTF-8",
    "diloco train --set data.source=text:latin1.txt",
    "is not valid UTF-8 (byte 0)",
)
def _(ctx):
    (ctx.tmp / "latin1.txt").write_bytes(b"\xe9t\xe9 " * 500)
    return ctx.train(f"data.source=text:{ctx.tmp / 'latin1.txt'}")


@case(
    "bin-bad-magic",
    ".bin shard with a bad header (magic)",
    "diloco train --set data.source=bin:shard.bin",
    "has magic 123, expected 20240520",
)
def _(ctx):
    write_shard(ctx.tmp / "shard.bin", list(range(200)), magic=123)
    return ctx.train(f"data.source=bin:{ctx.tmp / 'shard.bin'}")


@case(
    "bin-bad-version",
    ".bin shard with an unknown header version",
    "diloco train --set data.source=bin:shard.bin",
    "has version 7, expected 1",
)
def _(ctx):
    write_shard(ctx.tmp / "shard.bin", list(range(200)), version=7)
    return ctx.train(f"data.source=bin:{ctx.tmp / 'shard.bin'}")


@case(
    "bin-truncated",
    ".bin shard shorter than its header says",
    "diloco train --set data.source=bin:shard.bin",
    "the file is truncated or corrupt",
)
def _(ctx):
    write_shard(ctx.tmp / "shard.bin", list(range(200)), n=1000)
    return ctx.train(f"data.source=bin:{ctx.tmp / 'shard.bin'}")


@case(
    "bin-glob-matches-nothing",
    "bin: glob that matches no file",
    "diloco train --set 'data.source=bin:shards/*.bin'",
    "matches no files",
)
def _(ctx):
    return ctx.train(f"data.source=bin:{ctx.tmp / 'shards' / '*.bin'}")


@case(
    "vocab-smaller-than-corpus",
    "model vocabulary smaller than the corpus's",
    "diloco train --set data.source=bin:shard.bin --set model.vocab_size=256",
    "model.vocab_size=256 is smaller than the corpus vocabulary (50304)",
)
def _(ctx):
    write_shard(ctx.tmp / "shard.bin", [i % 300 for i in range(2000)])
    return ctx.train(f"data.source=bin:{ctx.tmp / 'shard.bin'}", "model.vocab_size=256")


@case(
    "hf-model-hub-name",
    "a Hugging Face hub name as model.source (nothing is downloaded)",
    "diloco train --set model.source=hf:meta-llama/Llama-3.2-1B",
    "model.source='hf:meta-llama/Llama-3.2-1B' is not a local directory and nothing is "
    "downloaded; if it is a hub name, download it first",
)
def _(ctx):
    return ctx.train("model.source=hf:meta-llama/Llama-3.2-1B")


@case(
    "hf-model-without-config",
    "a model.source directory without config.json",
    "diloco train --set model.source=hf:empty_dir",
    "has no config.json; point it at a Hugging Face model directory",
)
def _(ctx):
    (ctx.tmp / "empty_dir").mkdir(exist_ok=True)
    return ctx.train(f"model.source=hf:{ctx.tmp / 'empty_dir'}")


# --- run directory -------------------------------------------------------------------------------


@case(
    "out-dir-not-writable",
    "run.out_dir that cannot be created or written",
    "diloco train --set run.out_dir=a_file/run",
    "is not writable (Not a directory)",
)
def _(ctx):
    (ctx.tmp / "a_file").write_text("")
    return ctx.train(out=ctx.tmp / "a_file" / "run")


# --- checkpoints and resume ----------------------------------------------------------------------


@case(
    "resume-path-missing",
    "--resume to a checkpoint that does not exist",
    "diloco train --resume runs/x/checkpoints/step_8",
    "does not exist or is not a directory",
)
def _(ctx):
    return [*ctx.train(), "--resume", str(ctx.tmp / "nope" / "checkpoints" / "step_8")]


@case(
    "resume-not-a-checkpoint",
    "--resume to a directory without checkpoints",
    "diloco train --resume some_dir",
    "no checkpoint there",
)
def _(ctx):
    (ctx.tmp / "some_dir").mkdir()
    return [*ctx.train(), "--resume", str(ctx.tmp / "some_dir")]


@case(
    "checkpoint-truncated",
    "checkpoint with a truncated file",
    "diloco train --resume RUN/checkpoints/step_24  (group0/__0_0.distcp cut short)",
    "the file is truncated or corrupt",
)
def _(ctx):
    part = ctx.ckpt() / "group0" / "__0_0.distcp"
    part.write_bytes(part.read_bytes()[:1000])
    return [*ctx.train(out=ctx.run()), "--resume", str(ctx.ckpt())]


@case(
    "checkpoint-meta-corrupt",
    "checkpoint whose meta.json is garbage",
    "diloco train --resume RUN/checkpoints/step_24",
    "meta.json is unreadable",
)
def _(ctx):
    (ctx.ckpt() / "meta.json").write_text("{not json")
    return [*ctx.train(out=ctx.run()), "--resume", str(ctx.ckpt())]


@case(
    "checkpoint-incomplete",
    "checkpoint without meta.json (write never finished)",
    "diloco train --resume RUN/checkpoints/step_24",
    "has no meta.json; it was not completely",
)
def _(ctx):
    (ctx.ckpt() / "meta.json").unlink()
    return [*ctx.train(out=ctx.run()), "--resume", str(ctx.ckpt())]


@case(
    "checkpoint-part-missing",
    "checkpoint missing its outer-state directory",
    "diloco train --resume RUN/checkpoints/step_24",
    "is missing outer/",
)
def _(ctx):
    shutil.rmtree(ctx.ckpt() / "outer")
    return [*ctx.train(out=ctx.run()), "--resume", str(ctx.ckpt())]


@case(
    "checkpoint-corrupt-metadata",
    "checkpoint with a corrupt DCP .metadata (same size)",
    "diloco train --set train.steps=32 --resume RUN/checkpoints/step_24",
    "outer/.metadata is corrupt",
)
def _(ctx):
    meta = ctx.ckpt() / "outer" / ".metadata"
    meta.write_bytes(b"x" * meta.stat().st_size)
    return [*ctx.train("train.steps=32", out=ctx.run()), "--resume", str(ctx.ckpt())]


@case(
    "checkpoint-corrupt-data",
    "checkpoint with a corrupt tensor file (same size)",
    "diloco train --set train.steps=32 --resume RUN/checkpoints/step_24",
    "group0: UnpicklingError",
)
def _(ctx):
    part = ctx.ckpt() / "group0" / "__0_0.distcp"
    data = part.read_bytes()
    part.write_bytes(b"\0" * 64 + data[64:])
    return [*ctx.train("train.steps=32", out=ctx.run()), "--resume", str(ctx.ckpt())]


@case(
    "checkpoint-format-version",
    "checkpoint of another format version",
    "diloco train --resume RUN/checkpoints/step_24",
    "has format version 99",
)
def _(ctx):
    path = ctx.ckpt() / "meta.json"
    meta = json.loads(path.read_text())
    path.write_text(json.dumps({**meta, "format_version": 99}))
    return [*ctx.train(out=ctx.run()), "--resume", str(ctx.ckpt())]


@case(
    "checkpoint-other-model-shape",
    "checkpoint from a different model shape",
    "diloco train --set model.n_embd=64 --resume RUN/checkpoints/step_24",
    "is from a different model shape (wte.weight is [256, 32] there, [256, 64] here)",
)
def _(ctx):
    return [*ctx.train("model.n_embd=64"), "--resume", str(ctx.ckpt())]


@case(
    "resume-changed-config",
    "resume into a run directory with a different config",
    "diloco train --set outer.lr=0.5  (RUN holds checkpoints made with outer.lr=0.7)",
    "was written with a different config (outer.lr 0.7 -> 0.5); resume with the same "
    "settings, add --force",
)
def _(ctx):
    return ctx.train("outer.lr=0.5", out=ctx.run())


@case(
    "resume-beyond-steps",
    "resume a checkpoint later than train.steps",
    "diloco train --set train.steps=16  (RUN's newest checkpoint is step_24)",
    "is at step 24, beyond train.steps=16; set train.steps >= 24 to resume it",
)
def _(ctx):
    return ctx.train("train.steps=16", out=ctx.run())


@case(
    "resume-never-with-checkpoints",
    "--resume never into a run directory with checkpoints",
    "diloco train --resume never",
    "already holds checkpoints (newest step_24)",
)
def _(ctx):
    return [*ctx.train(out=ctx.run()), "--resume", "never"]


@case(
    "resume-auto-all-broken",
    "--resume auto when every checkpoint is broken",
    "diloco train --resume auto  (both checkpoints' meta.json damaged)",
    "no loadable checkpoint in",
)
def _(ctx):
    for step in (16, 24):
        (ctx.ckpt(step) / "meta.json").write_text("")
    return [*ctx.train(out=ctx.run()), "--resume", "auto"]


# --- export --------------------------------------------------------------------------------------


@case(
    "export-no-checkpoint",
    "export of a run without checkpoints",
    "diloco export RUN --out model.safetensors",
    "holds no checkpoint",
)
def _(ctx):
    (ctx.tmp / "empty_run").mkdir()
    return ["export", str(ctx.tmp / "empty_run"), "--out", str(ctx.tmp / "m.safetensors")]


@case(
    "export-missing-run",
    "export of a run directory that does not exist",
    "diloco export nope --out model.pt",
    "does not exist",
)
def _(ctx):
    return ["export", str(ctx.tmp / "nope"), "--out", str(ctx.tmp / "m.pt")]


@case(
    "export-bad-suffix",
    "export to an unknown file type",
    "diloco export RUN --out model.bin",
    "must end in .safetensors or .pt",
)
def _(ctx):
    return ["export", str(ctx.run()), "--out", str(ctx.tmp / "model.bin")]


# --- training health -----------------------------------------------------------------------------


@case(
    "nan-rounds-in-a-row",
    "non-finite updates in train.max_bad_rounds rounds in a row",
    "diloco train --set train.max_bad_rounds=3  (lr far too high; here injected: "
    "DILOCO_TEST_NAN_AT_STEP=4,8,12)",
    "pseudo-gradient was non-finite for 3 rounds in a row (last: round 3)",
    env={faults.NAN_AT_STEP: "4,8,12"},
)
def _(ctx):
    return ctx.train("train.max_bad_rounds=3")


# --- issue 15: --set values mean what was typed (class 3) ---------------------------------------


@case(
    "set-text-with-hash",
    "a text value with ' #' (not a YAML comment)",
    "diloco train --set 'data.source=text:data/a #b.txt'",
    "/a #b.txt does not exist or is not a file",
)
def _(ctx):
    return ctx.train(f"data.source=text:{ctx.tmp / 'a #b.txt'}")


setting(
    "set-integer-exponent",
    "an integer key given 1e3",
    "train.steps=1e3",
    "train.steps must be an integer, got '1e3' (str)",
)
setting(
    "set-boolean-yes",
    "a boolean key given yes",
    "run.progress=yes",
    "run.progress must be true or false, got 'yes' (str)",
)


@case(
    "yaml-number-for-text-key",
    "config file giving a text key a bare number",
    "diloco train --config c.yaml  (run: {out_dir: 2024})",
    "run.out_dir must be a string, got 2024 (int); YAML reads an unquoted number as a number",
)
def _(ctx):
    path = ctx.tmp / "c.yaml"
    path.write_text("run:\n  out_dir: 2024\n")
    return ["train", "--config", str(path)]


# --- issue 15: sizes and memory, checked before any work (class 4) -------------------------------

setting(
    "compress-block-huge",
    "int8 block far larger than any allocation",
    "outer.compress_block=100000000000",
    "outer.compress_block must be <= 65536",
)
setting(
    "batch-size-huge",
    "a batch no machine holds",
    "data.batch_size=2000000",
    "data.batch_size must be <= 1048576, got 2000000",
)
setting(
    "timeout-huge",
    "process-group timeout beyond a week",
    "topology.timeout_s=100000000000000000000",
    "topology.timeout_s must be <= 604800 (a week), got 100000000000000000000",
)


@case(
    "model-does-not-fit-in-memory",
    "a model whose estimate exceeds the memory per process",
    "diloco train --set model.n_layer=1024 --set model.n_embd=65536 --set model.n_head=64",
    "GiB per process (inner state",
)
def _(ctx):
    return ctx.train("model.n_layer=1024", "model.n_embd=65536", "model.n_head=64")


# --- issue 15: the environment, up front (class 5) -----------------------------------------------

if not torch.cuda.is_available():

    @case(
        "device-cuda-without-cuda",
        "run.device=cuda on a machine without CUDA",
        "diloco train --set run.device=cuda",
        "run.device=cuda but no CUDA device is available",
    )
    def _(ctx):
        return ctx.train("run.device=cuda")

    @case(
        "device-cuda-without-cuda-torchrun",
        "run.device=cuda without CUDA, as rank 1 of a torchrun job",
        "torchrun --nproc-per-node 2 -m diloco train --set run.device=cuda --set topology.groups=2",
        "run.device=cuda but no CUDA device is available",
        env={"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"},
    )
    def _(ctx):
        return ctx.train("run.device=cuda", "topology.groups=2")


@case(
    "ray-address-unreachable",
    "Ray cluster address where nothing answers",
    "diloco launch ray --address 127.0.0.1:1",
    "cannot reach the Ray cluster at 127.0.0.1:1 (Connection refused)",
)
def _(ctx):
    return ["launch", "ray", "--address", "127.0.0.1:1", *ctx.sets(ctx.tmp / "out")]


# --- issue 15: run directories (class 1) and damaged outputs (class 2) ---------------------------


@case(
    "rerun-finished-run",
    "train again into a finished run",
    "diloco train  (RUN finished: summary.json, last checkpoint at train.steps)",
    "already holds a finished run (24 steps, final val loss",
)
def _(ctx):
    return ctx.train(out=ctx.run())


@case(
    "out-dir-root",
    "run.out_dir that is the root directory",
    "diloco train --set run.out_dir=/",
    "run.out_dir='/' is the root directory",
)
def _(ctx):
    return ctx.train(out="/")


setting(
    "out-dir-tilde",
    "run.out_dir with a '~' nothing expands",
    "run.out_dir=~/runs/x",
    "run.out_dir='~/runs/x' starts with '~', which is not expanded inside --set",
)


@case(
    "run-dir-in-use",
    "run.out_dir in use by a running job",
    "diloco train  (RUN/.diloco.lock held by a live process)",
    "is in use by pid",
)
def _(ctx):
    lock = {"pid": os.getpid(), "host": socket.gethostname(), "started": "2026-01-01 00:00:00"}
    (ctx.run() / ".diloco.lock").write_text(json.dumps(lock))
    return ctx.train("train.steps=32", out=ctx.run())


@case(
    "summary-json-empty",
    "a run whose summary.json is 0 bytes (disk was full)",
    "diloco summary RUN",
    "summary.json is empty",
)
def _(ctx):
    (ctx.run() / "summary.json").write_text("")
    return ["summary", str(ctx.run())]


@case(
    "plot-summary-json-torn",
    "a run whose summary.json was cut short",
    "diloco plot RUN",
    "summary.json is damaged (not JSON",
)
def _(ctx):
    (ctx.run() / "summary.json").write_text('{"final_val_loss": 3.')
    return ["plot", str(ctx.run()), "--out", str(ctx.tmp / "c.png")]


@case(
    "metrics-line-damaged",
    "metrics.jsonl with a damaged line",
    "diloco summary RUN",
    "metrics.jsonl is damaged: line 2 is not a JSON record",
)
def _(ctx):
    path = ctx.run() / "metrics.jsonl"
    lines = path.read_text().splitlines()
    path.write_text("\n".join([lines[0], "\x00\x00", *lines[1:]]) + "\n")
    return ["summary", str(ctx.run())]


# --- issue 15: OS and file errors, one line (class 8) --------------------------------------------


@case(
    "export-out-in-proc",
    "export to a file that cannot be created",
    "diloco export RUN --out /proc/m.pt",
    "cannot write /proc/m.pt:",
)
def _(ctx):
    return ["export", str(ctx.run()), "--out", "/proc/m.pt"]


@case(
    "export-out-is-a-directory",
    "export onto an existing directory",
    "diloco export RUN --out dir.pt  (dir.pt/ is a directory)",
    "dir.pt: Is a directory",
)
def _(ctx):
    (ctx.tmp / "dir.pt").mkdir()
    return ["export", str(ctx.run()), "--out", str(ctx.tmp / "dir.pt")]


@case(
    "plot-out-in-proc",
    "plot into a file that cannot be created",
    "diloco plot RUN --out /proc/c.png",
    "cannot write plot '/proc/c.png'",
)
def _(ctx):
    return ["plot", str(ctx.run()), "--out", "/proc/c.png"]


@case(
    "config-file-is-a-directory",
    "--config naming a directory",
    "diloco train --config configs/",
    "Is a directory",
)
def _(ctx):
    return ["train", "--config", str(ctx.tmp)]


# --- running the cases ---------------------------------------------------------------------------


def digest(root: Path) -> dict[str, str]:
    """Hash of every file under ``root`` (empty if absent)."""
    if not root.exists():
        return {}
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@contextlib.contextmanager
def patched_env(env: dict[str, str]) -> Iterator[None]:
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    # A case posing as one rank of several has no peers to wait for (diloco.errors.report_error).
    wait, errors.RANK_REPORT_TIMEOUT_S = errors.RANK_REPORT_TIMEOUT_S, 0.0
    try:
        yield
    finally:
        errors.RANK_REPORT_TIMEOUT_S = wait
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def run_case(c: Case, ctx: Ctx) -> tuple[int, list[str], dict, dict]:
    """(exit status, stderr lines, run-dir digest before, after)."""
    argv = c.argv(ctx)
    before = digest(ctx.tmp / "run")
    err = io.StringIO()
    with patched_env(c.env), contextlib.redirect_stderr(err):
        rc = cli.main(argv)
    return rc, err.getvalue().splitlines(), before, digest(ctx.tmp / "run")


def make_template(corpus: Path, root: Path) -> Path:
    """A finished tiny run with checkpoints step_16 and step_24."""
    ctx = Ctx(root, corpus, root / "template")
    with patched_env({}), contextlib.redirect_stderr(io.StringIO()):
        train(load_config(None, ctx.sets(ctx.template)[1::2]))
    return ctx.template


def make_corpus(root: Path) -> Path:
    path = root / "corpus.txt"
    path.write_text("\n\n".join(p.read_text() for p in sorted((REPO / "diloco").rglob("*.py"))))
    return path


@pytest.fixture(scope="module")
def shared(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("shared")
    corpus = make_corpus(root)
    return corpus, make_template(corpus, root)


def test_catalogue_has_at_least_25_distinct_cases():
    assert len({c.id for c in CASES}) == len(CASES) >= 25


@pytest.mark.parametrize("c", CASES, ids=[c.id for c in CASES])
def test_bad_input_gives_one_clear_line_and_loses_nothing(c, shared, tmp_path):
    corpus, template = shared
    rc, lines, before, after = run_case(c, Ctx(tmp_path, corpus, template))
    text = "\n".join(lines)
    assert rc == 2, text
    assert "Traceback" not in text
    errors = [line for line in lines if line.startswith("diloco: error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], text
    assert all(line.startswith("diloco: ") for line in lines), text  # only warnings besides
    assert c.expect in errors[0], errors[0]
    assert before == after  # checkpoints, config.yaml and metrics.jsonl untouched


@pytest.mark.parametrize(
    "args",
    [
        ["train", "--set", "outer.sync_evry=8"],
        ["export", "no_such_run", "--out", "model.pt"],
    ],
)
def test_real_cli_prints_one_line_without_traceback(args, tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "diloco", *args],
        cwd=tmp_path,
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("diloco: error: ")
    assert "Traceback" not in proc.stderr


def test_errors_doc_lists_every_case():
    text = DOC.read_text()
    missing = [c.id for c in CASES if f"`{c.id}`" not in text]
    assert not missing, f"regenerate docs/errors.md (python tests/test_bad_inputs.py): {missing}"


# --- docs/errors.md ------------------------------------------------------------------------------


#: docs/errors.md from this heading on is written by hand (the Python API's refusals) and kept.
HAND_WRITTEN = "\n## The Python API"


def write_doc() -> None:
    import tempfile

    old = DOC.read_text() if DOC.exists() else ""
    kept = old[old.index(HAND_WRITTEN) :] if HAND_WRITTEN in old else ""

    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        corpus = make_corpus(root)
        template = make_template(corpus, root)
        rows = []
        for i, c in enumerate(CASES):
            tmp = root / f"case{i}"
            tmp.mkdir()
            rc, lines, _, _ = run_case(c, Ctx(tmp, corpus, template))
            error = next((line for line in lines if line.startswith("diloco: error: ")), "")
            if rc != 2 or not error:
                raise SystemExit(f"case {c.id} did not fail cleanly: rc={rc} {lines}")
            message = error.replace(str(tmp), "…").replace(str(root), "…").replace("|", "\\|")
            rows.append(f"| `{c.id}` | {c.what} | `{c.shown}` | `{message}` |")
    DOC.write_text(
        "# Errors: every bad input and the line it gives\n\n"
        "A mistake in the input never ends in a Python traceback: `diloco` prints one line,\n"
        "`diloco: error: …`, naming the field or value and what is allowed, exits with status 2,\n"
        "and changes nothing that was on disk (checkpoints, `config.yaml`, `metrics.jsonl`).\n"
        "Tracebacks are kept for bugs. Warnings (`diloco: warning: …`) may precede the error\n"
        "line, e.g. for each broken checkpoint `--resume auto` skips. What the machine refuses\n"
        "(a full disk, a path that cannot be written, memory) is one line and status 2 too;\n"
        "Ctrl-C stops with `diloco: interrupted` and status 130.\n\n"
        "Generated by running every case of `tests/test_bad_inputs.py` on a tiny run\n"
        "(`python tests/test_bad_inputs.py`); `…` stands for the temporary directory.\n\n"
        f"{len(rows)} cases.\n\n"
        "| case | bad input | command | message |\n|---|---|---|---|\n"
        + "\n".join(rows)
        + "\n"
        + kept
    )
    print(f"wrote {DOC} ({len(rows)} cases)")


if __name__ == "__main__":
    write_doc()
