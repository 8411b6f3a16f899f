"""``diloco plot`` and ``diloco summary`` on two tiny real runs (SNOO vs plain AdamW)."""

from __future__ import annotations

import json
import shutil
import sys

import pytest

from diloco.cli import main
from diloco.errors import DilocoError
from diloco.reports.runs import load_run, method_label

TINY = [
    "model.n_layer=1",
    "model.n_head=2",
    "model.n_embd=32",
    "model.block_size=32",
    "data.batch_size=4",
    "train.steps=20",
    "train.eval_every=10",
    "train.eval_batches=1",
    "train.log_every=5",
    "inner.warmup_steps=2",
    "outer.sync_every=5",
    "run.progress=false",
]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Run directories of a 20-step SNOO run and a 20-step plain AdamW run."""
    root = tmp_path_factory.mktemp("runs")
    dirs = {}
    for method in ("nesterov", "none"):
        out = root / method
        args = ["train", *(f"--set={o}" for o in TINY)]
        args += [f"--set=outer.method={method}", f"--set=run.out_dir={out}"]
        assert main(args) == 0
        dirs[method] = str(out)
    return dirs


def test_labels_name_the_method_from_each_runs_config(runs):
    assert load_run(runs["nesterov"]).label == "SNOO (AdamW, K=5)"
    assert load_run(runs["none"]).label == "AdamW (no outer step)"


def test_method_label_names_diloco_and_ema_nesterov():
    cfg = {
        "outer": {"method": "nesterov", "sync_every": 32},
        "inner": {"optimizer": "adamw"},
        "topology": {"groups": 8},
    }
    assert method_label(cfg) == "DiLoCo (AdamW, K=32, G=8)"
    cfg["outer"]["method"], cfg["inner"]["optimizer"] = "ema_nesterov", "muon"
    assert method_label(cfg) == "EMA-Nesterov (Muon, K=32, G=8)"


def test_plot_writes_a_png_of_both_runs(runs, tmp_path):
    out = tmp_path / "curves.png"
    assert main(["plot", runs["nesterov"], runs["none"], "--out", str(out)]) == 0
    data = out.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 10_000


def test_plot_without_matplotlib_says_how_to_install_it(runs, tmp_path, monkeypatch):
    from diloco.reports.plot import plot_runs

    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # makes the import fail
    with pytest.raises(DilocoError, match="pip install matplotlib"):
        plot_runs([load_run(runs["none"])], tmp_path / "x.png")


def test_summary_prints_a_markdown_row_per_method(runs, capsys):
    assert main(["summary", runs["nesterov"], runs["none"]]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("| run ") and "final val loss" in lines[0] and "G×S" in lines[0]
    assert len(lines) == 4  # header, rule, two runs
    assert "SNOO (AdamW, K=5)" in lines[2] and "| nesterov " in lines[2]
    assert "AdamW (no outer step)" in lines[3] and "| none " in lines[3]


def test_summary_json_carries_the_run_summaries(runs, capsys):
    assert main(["summary", runs["nesterov"], runs["none"], "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [row["outer_method"] for row in rows] == ["nesterov", "none"]
    for row, method in zip(rows, ("nesterov", "none"), strict=True):
        summary = json.loads((load_run(runs[method]).path / "summary.json").read_text())
        assert row["final_val_loss"] == summary["final_val_loss"]
        assert (row["steps"], row["tokens"]) == (20, 20 * 4 * 32)
        assert row["peak_rss_mb"] > 0 and row["tokens_per_s"] > 0


def test_summary_of_an_unfinished_run_uses_its_metrics(runs, tmp_path, capsys):
    running = tmp_path / "running"
    shutil.copytree(runs["none"], running)
    (running / "summary.json").unlink()
    assert main(["summary", str(running), "--json"]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert row["finished"] is False and row["steps"] == 20 and row["wall_s"] is None


def test_custom_labels_replace_the_method_names(runs, capsys):
    assert main(["summary", runs["nesterov"], runs["none"], "--label=A", "--label=B"]) == 0
    rows = capsys.readouterr().out.splitlines()[2:]
    assert "| A " in rows[0] and "| B " in rows[1]


def test_wrong_number_of_labels_is_a_user_error(runs, capsys):
    assert main(["plot", runs["nesterov"], runs["none"], "--label=only-one"]) == 2
    assert "one --label per RUN_DIR" in capsys.readouterr().err


def test_a_directory_without_metrics_is_a_user_error(tmp_path, capsys):
    assert main(["summary", str(tmp_path)]) == 2
    assert "has no metrics.jsonl" in capsys.readouterr().err
