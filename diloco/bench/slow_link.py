"""Benchmark: two worker groups joined only by a slow link — data parallel vs DiLoCo vs streaming.

Two "sites" of one rank each train the same GPT; everything they exchange crosses one emulated
link. Per method the script reports wall-clock per 1000 inner steps, bytes on the wire and the
val loss after the same number of tokens:

* ``dp``: plain data parallel across the link, the honest baseline: G = 1 group of S = 2 FSDP2
  shards (``outer.method=none``), AdamW on the global batch; FSDP2 all-gathers the parameters
  (forward and backward) and reduce-scatters the gradients every step — ZeRO-3 traffic,
  ≈ 3·(S−1)/S·4·P bytes per rank per step (a DDP all-reduce would be 2·(S−1)/S·4·P). The group
  batch is twice a DiLoCo group's, so every method sees the same tokens per step;
* ``diloco``: G = 2 groups × S = 1, Nesterov outer step every K steps, fp32 all-reduce;
* ``diloco_bf16``, ``diloco_int8``: the same with ``outer.compress`` (diloco/comm/compress.py;
  "pending" if this checkout cannot compress);
* ``streaming``: the same as ``diloco`` with ``outer.fragments`` P and ``outer.sync_delay`` τ
  (diloco/algorithm/streaming.py): P fragments synced at staggered offsets, each overlapped with
  τ steps.

**The link** (:mod:`diloco.bench.link`): ``--mechanism netns``, the default where permitted,
puts each site in its own network namespace behind a rate-limited veth pair and counts the
bytes on the wire; ``--mechanism throttle`` (used automatically when namespaces or tc are not
permitted, and said so in the output) charges every collective to an emulated uplink instead.

Wall-clock per 1000 steps is measured over the windows of the ``metrics.jsonl`` records after
the first round (evaluation excluded), scaled to 1000 steps, fastest of ``--repeats`` runs made
in interleaved order (other jobs' load then hits every method alike). "Blocked on the link" is
the time the loop waited for the pseudo-gradient averages (the rounds' ``reduce_s`` after the
first round, per 1000 steps; for DP the link is inside every step and not separable).
Convergence: ``--converge-steps``
(0: off) reruns every method on loopback without any link emulation (the losses do not depend on
the link) for that many steps and reports the final val loss next to DiLoCo fp32's.

    sudo python -m diloco.bench.slow_link                       # 128 timed steps, 100 Mbit/s
    python -m diloco.bench.slow_link --methods diloco,streaming --steps 64 --converge-steps 0
    python -m diloco.bench.slow_link --mechanism throttle       # no namespaces needed

Prints a table, writes ``bench_results/slow_link.json`` (``--out``) and, with ``--docs FILE``,
replaces the section between ``<!-- slow-link:start -->`` and ``<!-- slow-link:end -->`` in it.
Timings are whatever this machine gives; nothing is asserted.
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from diloco.bench.link import (
    ADDR,
    NS,
    VETH,
    Link,
    kill_group,
    rate_bytes,
    throttled_worker,
)
from diloco.launchers.local import child_env, free_port

METHODS = ("dp", "diloco", "diloco_bf16", "diloco_int8", "streaming")
BASE = [
    "run.device=cpu",
    "run.progress=false",
    "topology.backend=gloo",
    "topology.mixed_precision=fp32",
    "topology.timeout_s=180",
    "model.n_layer=4",
    "model.n_embd=128",
    "model.n_head=4",
    "model.block_size=64",
    "inner.warmup_steps=16",
    "train.eval_every=0",
    "train.eval_batches=8",
    "train.check_every=1000",
]


def method_overrides(method: str, K: int, P: int, tau: int, batch: int) -> list[str]:
    """The ``--set`` overrides that make ``method`` (module docstring)."""
    if method == "dp":
        return [
            "outer.method=none",
            "topology.groups=1",
            "topology.shards=2",
            f"data.batch_size={2 * batch}",
        ]
    common = ["topology.groups=2", "topology.shards=1", f"outer.sync_every={K}",
              f"data.batch_size={batch}"]  # fmt: skip
    if method == "diloco":
        return common
    if method in ("diloco_bf16", "diloco_int8"):
        return [*common, f"outer.compress={method.split('_')[1]}"]
    if method == "streaming":
        return [*common, f"outer.fragments={P}", f"outer.sync_delay={tau}"]
    raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")


def compression_available() -> bool:
    """Whether this checkout's training job honours ``outer.compress`` (diloco/comm/compress.py)."""
    try:
        from diloco.comm.topology import init_runtime

        return "compress" in inspect.signature(init_runtime).parameters
    except ImportError:
        return False


# --------------------------------------------------------------------------------------------
# running one method


def launch(
    out: Path, overrides: list[str], mechanism: str, timeout: float, rate: float, delay_s: float
) -> None:
    """Train once with two torchrun nodes (one rank each) over ``mechanism``: ``netns`` (one
    node per namespace), ``throttle`` (loopback, throttled collectives) or ``loopback``.
    Their stderr goes to ``out/node<k>.log``."""
    out.mkdir(parents=True, exist_ok=True)
    for old in [*out.glob("*.json*"), *out.glob("node*.log")]:
        old.unlink()
    sets = [a for o in [*overrides, f"run.out_dir={out}"] for a in ("--set", o)]
    master, port = (ADDR[0], 29500) if mechanism == "netns" else ("127.0.0.1", free_port())
    procs: list[subprocess.Popen] = []
    try:
        for node in (0, 1):
            prefix: list[str] = []
            target = ["-m", "diloco", "train", *sets]
            if mechanism == "netns":
                prefix = ["ip", "netns", "exec", NS[node], "env",
                          f"GLOO_SOCKET_IFNAME={VETH[node]}"]  # fmt: skip
            elif mechanism == "throttle":
                target = ["-m", "diloco.bench.slow_link", "--throttled-worker", str(rate),
                          str(delay_s), str(out), "--", *sets]  # fmt: skip
            cmd = [*prefix, sys.executable, "-m", "torch.distributed.run", "--nnodes", "2",
                   "--nproc-per-node", "1", "--node-rank", str(node), "--master-addr", master,
                   "--master-port", str(port), *target]  # fmt: skip
            with open(out / f"node{node}.log", "w") as log:
                procs.append(
                    subprocess.Popen(cmd, env=child_env(), stdout=subprocess.DEVNULL, stderr=log,
                                     start_new_session=True)
                )  # fmt: skip
        deadline = time.perf_counter() + timeout
        errors = []
        for node, proc in enumerate(procs):
            try:
                proc.wait(timeout=max(1.0, deadline - time.perf_counter()))
            except subprocess.TimeoutExpired:
                raise TimeoutError(f"node {node} still running after {timeout:.0f} s") from None
            if proc.returncode != 0:
                tail = (out / f"node{node}.log").read_text()[-2500:]
                errors.append(f"node {node} exited {proc.returncode}:\n{tail}")
        if errors:
            raise RuntimeError("\n".join(errors))
    finally:
        for proc in procs:
            kill_group(proc)


def per_step_seconds(records: list[dict], skip: int) -> float:
    """Mean wall seconds per inner step over the logged windows after step ``skip``."""
    seconds, steps, prev = 0.0, 0, None
    for r in records:
        if "tokens_per_s" not in r:
            prev = r
            continue
        if prev is not None and r["step"] > skip and r["tokens_per_s"] > 0:
            seconds += (r["tokens"] - prev["tokens"]) / r["tokens_per_s"]
            steps += r["step"] - prev["step"]
        prev = r
    return seconds / steps if steps else float("nan")


def read_records(run: Path) -> list[dict]:
    from diloco.job.metrics import read_metrics

    return read_metrics(run / "metrics.jsonl")


def param_count(overrides: list[str]) -> int:
    from diloco.config import load_config
    from diloco.models import GPT, GPTConfig

    m = load_config(None, overrides).model
    return GPT(GPTConfig(m.vocab_size, m.block_size, m.n_layer, m.n_head, m.n_embd)).num_params()


# --------------------------------------------------------------------------------------------
# the report


def table(rows: list[dict], mechanism: str) -> str:
    wire = "veth tx MB/rank" if mechanism == "netns" else "throttle MB/rank"
    head = (
        f"| method | s / 1000 steps | vs DP | blocked on the link, s / 1000 steps | {wire} per "
        "1000 steps | analytic MB/rank per 1000 steps | peak MB per sync | val loss (timed "
        "run) | val loss (convergence) | Δ vs DiLoCo fp32 |"
    )
    lines = [head, "|" + "---|" * 10]
    for r in rows:
        if r.get("status") != "ok":
            lines.append(f"| {r['method']} | {r.get('status')} |" + " |" * 8)
            continue
        conv = r.get("converge_val_loss")
        delta = r.get("converge_delta")
        blocked = r["blocked_s_per_1000"]
        lines.append(
            f"| {r['method']} | {r['s_per_1000']:.0f} | {r['speedup_vs_dp']:.1f}x | "
            f"{'(every step)' if math.isnan(blocked) else f'{blocked:.1f}'} | "
            f"{r['wire_mb_per_1000']:.1f} | {r['analytic_mb_per_1000']:.1f} | "
            f"{r['peak_mb']:.2f} | {r['val_loss']:.4f} | "
            f"{'' if conv is None else f'{conv:.4f}'} | "
            f"{'' if delta is None else f'{delta:+.4f}'} |"
        )
    return "\n".join(lines)


def write_docs(path: Path, text: str) -> None:
    start, end = "<!-- slow-link:start -->", "<!-- slow-link:end -->"
    doc = path.read_text()
    if start not in doc or end not in doc:
        raise SystemExit(f"{path} has no {start} … {end} section to replace")
    head, rest = doc.split(start, 1)
    _, tail = rest.split(end, 1)
    path.write_text(f"{head}{start}\n{text}\n{end}{tail}")


def timed_run(
    method: str,
    rep: int,
    args: argparse.Namespace,
    common: list[str],
    mechanism: str,
    link: Link,
    params: int,
) -> dict[str, Any]:
    """One timed run of ``method`` over the link: seconds per step, bytes, val loss."""
    K, P, tau = args.sync_every, args.fragments, args.sync_delay
    overrides = [*common, *method_overrides(method, K, P, tau, args.batch),
                 f"train.steps={args.steps}"]  # fmt: skip
    run = Path(args.runs) / "timed" / f"{method}_{rep}"
    before = link.tx_bytes() if mechanism == "netns" else [0, 0]
    t0 = time.perf_counter()
    launch(run, overrides, mechanism, args.timeout, rate_bytes(args.rate), args.delay_ms / 1e3)
    wall = time.perf_counter() - t0
    if mechanism == "netns":
        wire = [a - b for a, b in zip(link.tx_bytes(), before, strict=True)]
    else:
        wire = [json.loads((run / f"throttle{r}.json").read_text())["sent"] for r in (0, 1)]
    records = read_records(run)
    per_step = per_step_seconds(records, skip=K)
    rounds = [r for r in records if "pseudo_grad_norm" in r]
    analytic = sum(r.get("bytes_sent", 0.0) for r in rounds)
    peak = max((r.get("peak_bytes", r.get("bytes_sent", 0.0)) for r in rounds), default=0)
    blocked = sum(r.get("reduce_s", 0.0) for r in rounds if r["step"] > K)
    if method == "dp":  # FSDP2 ZeRO-3 estimate: 2 all-gathers + 1 reduce-scatter per step
        analytic = args.steps * 3 * (2 - 1) / 2 * 4 * params
        peak = analytic / args.steps  # it syncs every step
        blocked = float("nan")  # inside every step; not separable from compute
    scale = 1000 / args.steps
    result = {
        "status": "ok",
        "steps": args.steps,
        "wall_s": wall,
        "s_per_step": per_step,
        "s_per_1000": 1000 * per_step,
        "blocked_s_per_1000": blocked * 1000 / (args.steps - K),
        "wire_bytes_per_rank": sum(wire) / 2,
        "wire_mb_per_1000": sum(wire) / 2 * scale / 1e6,
        "analytic_bytes_per_rank": analytic,
        "analytic_mb_per_1000": analytic * scale / 1e6,
        "peak_mb": peak / 1e6,
        "val_loss": records[-1]["val_loss"],
        "overrides": overrides,
    }
    print(f"slow_link: {method} (repeat {rep}): {1000 * per_step:.0f} s / 1000 steps, "
          f"{result['wire_mb_per_1000']:.1f} MB/rank per 1000 steps on the wire "
          f"({wall:.0f} s)", file=sys.stderr, flush=True)  # fmt: skip
    return result


def _on_signal(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main() -> None:
    if "--throttled-worker" in sys.argv:
        i = sys.argv.index("--throttled-worker")
        rate, delay, out = float(sys.argv[i + 1]), float(sys.argv[i + 2]), Path(sys.argv[i + 3])
        rest = sys.argv[i + 4 :]
        throttled_worker(rate, delay, out, rest[1:] if rest[:1] == ["--"] else rest)
        return
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--mechanism", choices=("auto", "netns", "throttle"), default="auto")
    p.add_argument("--rate", default="100mbit", help="link rate (tc syntax; default %(default)s)")
    p.add_argument("--delay-ms", type=float, default=10.0, help="netem delay, where available")
    p.add_argument("--steps", type=int, default=128, help="timed inner steps per method")
    p.add_argument("--repeats", type=int, default=2, help="timed runs per method; fastest kept")
    p.add_argument("--sync-every", type=int, default=32, help="K")
    p.add_argument("--fragments", type=int, default=4, help="P for streaming")
    p.add_argument("--sync-delay", type=int, default=2, help="τ for streaming")
    p.add_argument("--batch", type=int, default=8, help="sequences per group per step")
    p.add_argument("--converge-steps", type=int, default=256, help="0: no convergence runs")
    p.add_argument("--timeout", type=float, default=900, help="seconds per run")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--out", default="bench_results/slow_link.json")
    p.add_argument("--runs", default="runs/bench_slow_link", help="run directories")
    p.add_argument("--docs", default=None, help="Markdown file whose slow-link section to fill")
    args = p.parse_args()
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _on_signal)
    methods = [m for m in args.methods.split(",") if m]
    K, P, tau = args.sync_every, args.fragments, args.sync_delay
    rate = rate_bytes(args.rate)
    runs = Path(args.runs)
    common = [*BASE, f"train.log_every={K // 2}", *args.overrides]
    params = param_count([*common, *method_overrides("diloco", K, P, tau, args.batch)])
    can_compress = compression_available()

    mechanism, notes = args.mechanism, []
    link = Link(args.rate, args.delay_ms)
    rows: list[dict[str, Any]] = []
    try:
        if mechanism in ("auto", "netns"):
            try:
                if os.geteuid() != 0:
                    raise RuntimeError("not root")
                link.open()
                mechanism = "netns"
                notes += link.notes
                mbps = link.measure_throughput()
                notes.append(
                    f"netns + veth + tc tbf rate {args.rate} "
                    f"({'with' if link.netem else 'without'} netem delay); one TCP stream "
                    f"dl0 → dl1 measured {mbps:.2f} MB/s ({8 * mbps:.0f} Mbit/s)"
                )
            except (RuntimeError, OSError, subprocess.TimeoutExpired, ValueError) as e:
                link.close()
                if args.mechanism == "netns":
                    raise SystemExit(f"slow_link: cannot set up the emulated link: {e}") from None
                mechanism = "throttle"
                notes.append(
                    f"network namespaces / tc not permitted here ({e}); FALLBACK: the "
                    "bandwidth-throttled process-group wrapper on loopback"
                )
        if mechanism == "throttle" and not notes:
            notes.append(f"bandwidth-throttled process-group wrapper at {args.rate} (asked for)")
        print(f"slow_link: {'; '.join(notes)}", file=sys.stderr, flush=True)

        rows = [{"method": m} for m in methods]
        for row in rows:
            if row["method"].startswith("diloco_") and not can_compress:
                row["status"] = "pending (outer.compress not in this checkout)"
        for rep in range(args.repeats):  # interleaved, so load changes hit every method alike
            for row in rows:
                if str(row.get("status", "ok")).startswith(("pending", "failed")):
                    continue
                try:
                    result = timed_run(row["method"], rep, args, common, mechanism, link, params)
                except (RuntimeError, TimeoutError) as e:
                    row["status"] = f"failed: {str(e).splitlines()[0]}"
                    print(f"slow_link: {row['method']}: {e}", file=sys.stderr, flush=True)
                    continue
                tried = row.get("repeat_s_per_1000", []) + [result["s_per_1000"]]
                if "s_per_step" not in row or result["s_per_step"] < row["s_per_step"]:
                    row.update(result)  # keep the fastest repeat
                row["repeat_s_per_1000"] = tried
        dp = next((r for r in rows if r["method"] == "dp" and r.get("status") == "ok"), None)
        for r in rows:
            if r.get("status") == "ok":
                r["speedup_vs_dp"] = dp["s_per_step"] / r["s_per_step"] if dp else float("nan")
    finally:
        link.close()

    if args.converge_steps:
        for row in rows:
            if row.get("status") != "ok":
                continue
            overrides = [*row["overrides"][:-1], f"train.steps={args.converge_steps}"]
            run = runs / "converge" / row["method"]
            try:
                launch(run, overrides, "loopback", args.timeout, rate, 0.0)
            except (RuntimeError, TimeoutError) as e:
                row["converge_status"] = f"failed: {str(e).splitlines()[0]}"
                continue
            row["converge_steps"] = args.converge_steps
            row["converge_val_loss"] = read_records(run)[-1]["val_loss"]
            print(f"slow_link: {row['method']}: val loss {row['converge_val_loss']:.4f} after "
                  f"{args.converge_steps} steps", file=sys.stderr, flush=True)  # fmt: skip
        ref = next((r for r in rows if r["method"] == "diloco" and "converge_val_loss" in r), None)
        for row in rows:
            if ref is not None and "converge_val_loss" in row:
                row["converge_delta"] = row["converge_val_loss"] - ref["converge_val_loss"]

    import torch

    from diloco.config import load_config

    tokens = args.batch * load_config(None, common).model.block_size * 2
    meta = {
        "mechanism": mechanism,
        "notes": notes,
        "rate": args.rate,
        "delay_ms": args.delay_ms if (mechanism == "throttle" or link.netem) else 0.0,
        "steps": args.steps,
        "repeats": args.repeats,
        "converge_steps": args.converge_steps,
        "sync_every": K,
        "fragments": P,
        "sync_delay": tau,
        "params": params,
        "tokens_per_step": tokens,
        "torch": torch.__version__,
        "cpus": os.cpu_count(),
        "load_avg": os.getloadavg(),
    }
    text = table(rows, mechanism)
    header = (
        f"P = {params:,} parameters, {tokens:,} tokens per step (both sites), K = {K}, "
        f"streaming P = {P}, τ = {tau}; {args.steps} timed steps per method scaled to 1000 "
        f"(fastest of {args.repeats} interleaved repeats); "
        f"link: {'; '.join(notes)}; convergence: "
        + (
            f"{args.converge_steps} steps per method on loopback (same configs)"
            if args.converge_steps
            else "off"
        )
    )
    print(header)
    print(text)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2, default=str) + "\n")
    print(f"wrote {out}")
    if args.docs:
        write_docs(Path(args.docs), f"{header}\n\n{text}")
        print(f"updated {args.docs}")
    if any(math.isnan(r.get("s_per_step", 0.0)) for r in rows):
        print("slow_link: some runs logged too few windows; raise --steps", file=sys.stderr)


if __name__ == "__main__":
    main()
