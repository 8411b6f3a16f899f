"""Tables and plot of ``diloco bench optim``: ``results.md`` and ``curves.png``.

A *row* is one (size, horizon, method) of the benchmark: best setting, final val loss
(mean ± std over seeds), seed-mean eval curve and compute-factor cells
(``{"factor", "bound", "text"}``) under the columns ``vs AdamW``, ``vs Muon``, ``vs DP 2x``.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import TYPE_CHECKING, Any

from diloco.bench.plan import MAX_EXTENSIONS
from diloco.bench.spec import settings_label

if TYPE_CHECKING:
    from diloco.bench.plan import Plan

__all__ = ["plot_curves", "render_markdown", "hardware"]


def _size_label(plan: Plan, size: str) -> str:
    model = {**plan.base["model"], **plan.sizes[size]}
    params = _n_params(model) / 1e6
    shape = f"{model['n_layer']}x{model['n_embd']}, seq {model['block_size']}"
    return f"{size} = {shape}, {params:.2f}M params"


def _n_params(model: dict[str, Any]) -> int:
    from diloco.models import GPT, GPTConfig

    keys = ("vocab_size", "block_size", "n_layer", "n_head", "n_embd", "dropout", "bias")
    return GPT(GPTConfig(**{k: model[k] for k in keys})).num_params()


def _loss_text(row: dict[str, Any]) -> str:
    mean, std = row["final_val_loss_mean"], row["final_val_loss_std"]
    if mean is None:
        return "diverged"
    text = f"{mean:.4f} ± {std:.4f}"
    return (
        text if row["ok_seeds"] == row["seeds"] else f"{text} ({row['ok_seeds']}/{row['seeds']} ok)"
    )


def _cf_text(row: dict[str, Any], column: str) -> str:
    cell = row.get(column)
    return cell["text"] if cell else "—"


def render_markdown(plan: Plan, rows: list[dict], tried: list[dict], meta: dict[str, Any]) -> str:
    """The benchmark's tables (``results.md``; also printed)."""
    lines = [
        "# diloco bench optim",
        "",
        f"- command: `{meta['command']}`",
        f"- date: {meta['date']}; hardware: {meta['hardware']}",
        f"- wall time: {meta['wall_s']:.0f} s for this invocation ({meta['executed']} runs "
        f"executed, {meta['reused']} from the cache); the runs' own wall times sum to "
        f"{meta['runs_wall_s']:.0f} s",
        f"- sizes: {'; '.join(_size_label(plan, s) for s in plan.sizes)}",
        f"- data: `{plan.base['data']['source']}`, batch {plan.base['data']['batch_size']} "
        f"(x2 for the DP / G=2 pair); schedule {plan.base['inner']['schedule']} "
        f"with {plan.warmup_frac:.0%} warm-up; seeds: {plan.seeds}; every method tuned at "
        "every horizon on seed 0",
        f"- grids: lr {plan.lr_grid}; muon_lr {plan.muon_lr_grid} (Muon's AdamW part at lr "
        f"{plan.lr_grid[len(plan.lr_grid) // 2]:g}); SNOO (K, η, μ) {plan.outer_grid}; a grid "
        f"whose best point is at its edge is extended (LR, η, μ: up to {MAX_EXTENSIONS} steps "
        "further out)",
        "- compute factor (CF): tokens the baseline needs to reach its own final val loss ÷ "
        "tokens the method needs to reach it (first crossing of the seed-mean eval curve, linear "
        "interpolation); > 1 is faster; `<b (not reached)` = never reached, b is an upper bound",
    ]
    for method, why in plan.skipped.items():
        lines.append(f"- **{method} skipped**: {why}")
    lines += ["", "## Final val loss and compute factor (best setting per method)", ""]
    lines.append(
        "| size | steps | method | best setting | final val loss (mean ± std) "
        "| CF vs AdamW | CF vs Muon | CF vs DP 2x | wall s/run |"
    )
    lines.append("|---|---:|---|---|---|---:|---:|---:|---:|")
    for row in rows:
        lines.append(
            f"| {row['size']} | {row['steps']} | {row['label']} | {row['setting']} | "
            f"{_loss_text(row)} | {_cf_text(row, 'vs AdamW')} | {_cf_text(row, 'vs Muon')} | "
            f"{_cf_text(row, 'vs DP 2x')} | {row['wall_s_mean']:.1f} |"
        )
    columns = [(s, h) for s in plan.sizes for h in plan.horizons]
    for column in ("vs AdamW", "vs Muon"):
        lines += ["", f"## Compute factor {column}: does it grow with size and length?", ""]
        lines.append("| method | " + " | ".join(f"{s} / {h} steps" for s, h in columns) + " |")
        lines.append("|---|" + "---:|" * len(columns))
        for m in plan.methods:
            cells = []
            for s, h in columns:
                match = [r for r in rows if (r["size"], r["steps"], r["method"]) == (s, h, m.name)]
                cells.append(_cf_text(match[0], column) if match else "—")
            lines.append(f"| {m.label} | " + " | ".join(cells) + " |")
    lines += ["", "## Tuning runs (seed 0, at every horizon)", ""]
    lines.append("| size | steps | method | setting | final val loss |")
    lines.append("|---|---:|---|---|---:|")
    for r in tried:
        loss = r["final_val_loss"]
        shown = f"{loss:.4f}" if loss is not None else r["status"]
        label = settings_label(r["settings"])
        lines.append(f"| {r['size']} | {r['steps']} | {r['method']} | {label} | {shown} |")
    return "\n".join(lines) + "\n"


def plot_curves(plan: Plan, rows: list[dict], path: Path) -> None:
    """Seed-mean val loss against tokens, one panel per (size, horizon)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes, horizons = list(plan.sizes), plan.horizons
    fig, axes = plt.subplots(
        len(sizes), len(horizons), figsize=(6 * len(horizons), 4.2 * len(sizes)), squeeze=False
    )
    styles = ["-", "--", "-.", ":"]
    for i, size in enumerate(sizes):
        for j, steps in enumerate(horizons):
            ax = axes[i][j]
            panel = [r for r in rows if r["size"] == size and r["steps"] == steps]
            finals, tops = [], []
            for k, row in enumerate(panel):
                if not row["curve_mean"]:
                    continue
                xs, ys = zip(*row["curve_mean"], strict=True)
                ax.plot(xs, ys, styles[k // 10 % 4], label=f"{row['label']}", lw=1.4)
                finals.append(min(ys))
                later = [y for x, y in row["curve_mean"] if x >= 0.2 * xs[-1]]
                tops.append(later[0] if later else ys[-1])
            if finals:
                low, high = min(finals), max(tops)
                pad = 0.05 * max(high - low, 1e-3)
                ax.set_ylim(low - pad, high + pad)
            seeds = f"{plan.seeds} seeds, mean" if plan.seeds > 1 else "1 seed"
            ax.set_title(f"{size}, {steps} steps ({seeds})")
            ax.set_xlabel("tokens")
            ax.set_ylabel("val loss (slow weights)")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def hardware(device: str) -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import torch

    text = (
        f"{cpu}, {os.cpu_count()} CPU cores, torch {torch.__version__}, "
        f"Python {platform.python_version()}"
    )
    if device == "cuda" and torch.cuda.is_available():
        text += f", GPU {torch.cuda.get_device_name(0)}"
    return text
