"""GPU check: GPT-2 124M on one CUDA GPU, plain AdamW vs SNOO, torch.compile off and on.

Runs ``diloco train`` four times on this machine's first GPU, each a subprocess with its own
time limit, from ``configs/gpt124m_gpu.yaml`` (12 × 768, T = 1024, batch 32, bf16, AdamW):

    outer.method=none       × train.compile ∈ {false, true}
    outer.method=nesterov   × train.compile ∈ {false, true}      (SNOO: K = 32, η = 0.7, μ = 0.9)

for ``--steps`` steps (default 300; ``--quick``: 100, about 5 minutes in all on one H100), then
prints a table and writes ``OUT/results.json``. Per run, from its ``metrics.jsonl`` and
``summary.json``:

* tokens/s and MFU: medians over the log records of the last half of the run (steady state:
  the first steps include compilation and the allocator's warm-up);
* peak GPU memory allocated by tensors (``gpu_mem_alloc_mb``) and reserved by the allocator;
* outer step ÷ inner step (``outer_over_inner``; 0 for ``none``);
* the train loss of the last logged step and the final val loss.

Data: the FineWeb shards of the config when they are there (see its comment), else the embedded
corpus (byte tokens, the same compute per token: the model keeps its 50304-token vocabulary).
Without CUDA it refuses with one line and runs nothing (``--plan`` prints the commands anyway).

    python -m diloco.bench.gpu_check --quick
    python -m diloco.bench.gpu_check --steps 500 --timeout 900 --set data.batch_size=16
"""

from __future__ import annotations

import argparse
import glob
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from diloco.errors import write_line
from diloco.job.metrics import read_metrics
from diloco.launchers.local import REPO, child_env

CONFIG = REPO / "configs" / "gpt124m_gpu.yaml"
RUNS = (
    ("adamw", ["outer.method=none"], False),
    ("adamw+compile", ["outer.method=none"], True),
    ("snoo", ["outer.method=nesterov"], False),
    ("snoo+compile", ["outer.method=nesterov"], True),
)


def _data_source() -> list[str]:
    """The config's FineWeb shards if present (relative to the checkout), else ``embedded``."""
    from diloco.config import load_config

    source = load_config(CONFIG).data.source
    pattern = source.removeprefix("bin:")
    found = glob.glob(pattern) or glob.glob(str(REPO / pattern))
    return [] if found else ["data.source=embedded"]


def commands(out: Path, steps: int, overrides: list[str]) -> dict[str, list[str]]:
    """The ``diloco train`` command of each run (name -> argv)."""
    common = [
        f"train.steps={steps}",
        f"inner.warmup_steps={max(1, steps // 10)}",
        "train.eval_every=0",
        "train.eval_batches=4",
        "train.log_every=10",
        "train.checkpoint_every=0",
        "run.progress=false",
        "run.device=cuda",
        *_data_source(),
        *overrides,
    ]
    out_cmds = {}
    for name, method, compiled in RUNS:
        sets = [*common, *method, f"train.compile={str(compiled).lower()}"]
        sets.append(f"run.out_dir={out / name}")
        argv = [sys.executable, "-m", "diloco", "train", "--config", str(CONFIG)]
        out_cmds[name] = argv + [a for s in sets for a in ("--set", s)]
    return out_cmds


def _steady(records: list[dict[str, Any]], key: str, steps: int) -> float | None:
    values = [r[key] for r in records if key in r and r.get("step", 0) > steps // 2]
    return statistics.median(values) if values else None


def result(name: str, run_dir: Path, steps: int, status: str, wall: float) -> dict[str, Any]:
    """One row of the table from a finished (or failed) run's files."""
    row: dict[str, Any] = {"run": name, "status": status, "wall_s": wall}
    metrics, summary = run_dir / "metrics.jsonl", run_dir / "summary.json"
    if status != "ok" or not summary.is_file():
        return row
    records = read_metrics(metrics)
    s = json.loads(summary.read_text())
    losses = [r for r in records if "loss" in r]
    row.update(
        tokens_per_s=_steady(records, "tokens_per_s", steps),
        mfu=_steady(records, "mfu", steps),
        gpu_mem_alloc_mb=s.get("gpu_mem_alloc_mb"),
        gpu_mem_reserved_mb=s.get("gpu_mem_reserved_mb"),
        outer_over_inner=s.get("outer_over_inner"),
        inner_step_ms=s.get("inner_step_ms"),
        outer_step_ms=s.get("outer_step_ms"),
        loss=losses[-1]["loss"] if losses else None,
        final_val_loss=s.get("final_val_loss"),
    )
    return row


def table(rows: list[dict[str, Any]], steps: int) -> str:
    def f(value: Any, spec: str) -> str:
        return "–" if value is None else format(value, spec)

    lines = [
        f"| run | status | tokens/s | MFU | peak GPU MB (reserved) | outer÷inner | inner ms "
        f"| loss @ {steps} | val loss |",
        "|" + "---|" * 9,
    ]
    for r in rows:
        lines.append(
            f"| {r['run']} | {r['status']} | {f(r.get('tokens_per_s'), ',.0f')} | "
            f"{f(r.get('mfu'), '.1%')} | {f(r.get('gpu_mem_alloc_mb'), ',.0f')} "
            f"({f(r.get('gpu_mem_reserved_mb'), ',.0f')}) | {f(r.get('outer_over_inner'), '.3f')}"
            f" | {f(r.get('inner_step_ms'), '.1f')} | {f(r.get('loss'), '.4f')} | "
            f"{f(r.get('final_val_loss'), '.4f')} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=None, help="steps per run (default 300)")
    p.add_argument("--quick", action="store_true", help="100 steps per run, 240 s limit each")
    p.add_argument("--timeout", type=float, default=None, help="seconds per run (default 600)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--out", default="runs/gpu_check", help="run dirs and results.json")
    p.add_argument("--plan", action="store_true", help="print the commands, run nothing")
    args = p.parse_args(argv)
    steps = args.steps or (100 if args.quick else 300)
    timeout = args.timeout or (240.0 if args.quick else 600.0)
    out = Path(args.out)
    cmds = commands(out, steps, args.overrides)
    if args.plan:
        for cmd in cmds.values():
            print(" ".join(cmd))
        return 0
    import torch

    if not torch.cuda.is_available():
        write_line(
            "diloco.bench.gpu_check: needs a CUDA GPU (torch.cuda.is_available() is False); "
            "nothing was run"
        )
        return 2
    device = torch.cuda.get_device_name(0)
    rows = []
    for name, cmd in cmds.items():
        t0 = time.perf_counter()
        try:
            done = subprocess.run(cmd, env=child_env(), capture_output=True, text=True,
                                  timeout=timeout)  # fmt: skip
            status = "ok" if done.returncode == 0 else f"failed ({done.returncode})"
            if done.returncode != 0:
                print(f"{name}: {done.stderr[-2000:]}", file=sys.stderr)
        except subprocess.TimeoutExpired:
            status = f"timeout ({timeout:.0f} s)"
        rows.append(result(name, out / name, steps, status, time.perf_counter() - t0))
        print(f"{name}: {status}, {rows[-1]['wall_s']:.0f} s", file=sys.stderr)
    meta = {"device": device, "torch": torch.__version__, "steps": steps, "timeout_s": timeout,
            "overrides": args.overrides}  # fmt: skip
    print(f"{device}, torch {torch.__version__}, GPT-2 124M, {steps} steps per run")
    print(table(rows, steps))
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    print(f"wrote {out / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
