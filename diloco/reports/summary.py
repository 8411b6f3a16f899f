"""``diloco summary RUN_DIR ...``: one comparison row per run, as a Markdown table or JSON.

Each row comes from the run's ``summary.json`` (written when training finishes) and
``config.yaml``. A run that has not finished yet is shown from its last ``metrics.jsonl``
records; what only the summary knows (wall time, peak RSS) is then left empty.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from diloco.reports.runs import Run

__all__ = ["COLUMNS", "format_json", "format_markdown", "summary_row"]

#: Row keys with their Markdown column titles, in table order.
COLUMNS: dict[str, str] = {
    "run": "run",
    "label": "method",
    "final_val_loss": "final val loss",
    "steps": "steps",
    "tokens": "tokens",
    "wall_s": "wall s",
    "tokens_per_s": "tokens/s",
    "outer_method": "outer.method",
    "groups_x_shards": "G×S",
    "peak_rss_mb": "peak RSS MiB",
}


def summary_row(run: Run) -> dict[str, Any]:
    """The comparison row of ``run`` (``None`` where a value is unknown)."""
    cfg, summary = run.config, run.summary
    topology = cfg.get("topology", {})
    groups = summary.get("groups", topology.get("groups", 1))
    shards = summary.get("shards", topology.get("shards", 1))
    last = run.metrics[-1] if run.metrics else {}
    _, val = run.series("val_loss")
    return {
        "run": str(run.path),
        "label": run.label,
        "final_val_loss": summary.get("final_val_loss", val[-1] if val else None),
        "steps": summary.get("steps", last.get("step")),
        "tokens": summary.get("tokens", last.get("tokens")),
        "wall_s": summary.get("wall_s"),
        "tokens_per_s": summary.get("tokens_per_s"),
        "outer_method": summary.get("method", cfg.get("outer", {}).get("method")),
        "sync_every": cfg.get("outer", {}).get("sync_every"),
        "inner_optimizer": cfg.get("inner", {}).get("optimizer"),
        "groups": groups,
        "shards": shards,
        "groups_x_shards": f"{groups}×{shards}",
        "peak_rss_mb": summary.get("peak_rss_mb"),
        "finished": bool(summary),
    }


def format_markdown(rows: Sequence[dict[str, Any]]) -> str:
    """A Markdown table of ``rows`` with the :data:`COLUMNS`; numbers right-aligned."""
    cells = [[_cell(key, row.get(key)) for key in COLUMNS] for row in rows]
    titles = list(COLUMNS.values())
    widths = [max([len(t)] + [len(c[i]) for c in cells]) for i, t in enumerate(titles)]
    numeric = [key not in ("run", "label", "outer_method", "groups_x_shards") for key in COLUMNS]

    def line(values: Sequence[str]) -> str:
        padded = [
            v.rjust(w) if num else v.ljust(w)
            for v, w, num in zip(values, widths, numeric, strict=True)
        ]
        return "| " + " | ".join(padded) + " |"

    rule = ["-" * (w - 1) + ":" if num else "-" * w for w, num in zip(widths, numeric, strict=True)]
    return "\n".join([line(titles), line(rule)] + [line(c) for c in cells]) + "\n"


def format_json(rows: Sequence[dict[str, Any]]) -> str:
    """The rows as a JSON list (every key of :func:`summary_row`)."""
    return json.dumps(list(rows), indent=2, ensure_ascii=False) + "\n"


def _cell(key: str, value: Any) -> str:
    if value is None:
        return "—"
    if key == "final_val_loss":
        return f"{value:.4f}"
    if key in ("wall_s", "peak_rss_mb"):
        return f"{value:.1f}"
    if key == "tokens_per_s":
        return f"{value:,.0f}"
    if key == "tokens":
        return f"{value:,}"
    return str(value)
