"""Specification of a run's output files (issue 15, class 2): each is written whole or not at
all, also when the disk fills up, and readers turn a damaged file into one line naming it.

The full disk is real: a tmpfs mounted with just enough pages for some of the outputs (needs
root, as CI runs; skipped otherwise), and a file-size limit (RLIMIT_FSIZE) set on a child
process from outside it."""

from __future__ import annotations

import contextlib
import io
import json
import math
import resource
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import yaml
from helpers import sets, tiny_overrides

from diloco import cli
from diloco.files import write_text_atomic
from diloco.job.metrics import read_metrics
from diloco.launchers.local import child_env

PAGE = 4096


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text((Path(cli.__file__).parent / "job" / "train.py").read_text() * 2)
    return path


def train_args(corpus: Path, out: Path) -> list[str]:
    return [
        "train",
        *sets(tiny_overrides(8, 4, f"data.source=text:{corpus}", f"run.out_dir={out}")),
    ]


def run_cli(*argv: str) -> tuple[int, list[str]]:
    """``diloco ARGV`` in this process: (exit status, stderr lines)."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        rc = cli.main(list(argv))
    return rc, err.getvalue().splitlines()


@contextlib.contextmanager
def small_disk(where: Path, pages: int) -> Iterator[Path]:
    """A tmpfs of ``pages`` 4 KiB pages mounted at ``where``."""
    where.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={pages * PAGE // 1024}k", "tmpfs", str(where)],
        capture_output=True,
        text=True,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {mounted.stderr.strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", str(where)], check=True)


def assert_outputs_whole(run_dir: Path) -> None:
    """No temporary file is left and every output present reads back completely."""
    assert not list(run_dir.glob("*.tmp*")), sorted(p.name for p in run_dir.iterdir())
    if (run_dir / "summary.json").exists():
        assert json.loads((run_dir / "summary.json").read_text())["steps"] == 8
    if (run_dir / "config.yaml").exists():
        assert yaml.safe_load((run_dir / "config.yaml").read_text())["train"]["steps"] == 8
    if (run_dir / "final_model.pt").exists():
        assert "wte.weight" in torch.load(run_dir / "final_model.pt", weights_only=True)
    read_metrics(run_dir / "metrics.jsonl")


@pytest.fixture(scope="module")
def pages_needed(corpus, tmp_path_factory) -> int:
    """Pages a finished tiny run occupies at its end: its outputs and the run lock."""
    out = tmp_path_factory.mktemp("reference") / "run"
    assert run_cli(*train_args(corpus, out))[0] == 0
    return 1 + sum(math.ceil(p.stat().st_size / PAGE) for p in out.iterdir())


@pytest.mark.parametrize(
    ("short", "failing"),
    [(0, None), (1, "summary.json"), (2, "final_model.pt")],
    ids=["room-for-all", "full-at-summary", "full-at-final-model"],
)
def test_full_disk_leaves_whole_files_and_one_line_naming_the_file(
    corpus, pages_needed, tmp_path, short, failing
):
    with small_disk(tmp_path / "disk", pages_needed - short) as disk:
        rc, lines = run_cli(*train_args(corpus, disk / "run"))
        assert_outputs_whole(disk / "run")
        if failing is None:
            assert rc == 0 and (disk / "run" / "summary.json").exists()
            return
        assert rc == 2
        assert lines == [
            f"diloco: error: cannot write {disk / 'run' / failing}: No space left on device"
        ]
        assert not (disk / "run" / failing).exists()
        rc, lines = run_cli("summary", str(disk / "run"))  # the unfinished run reads back
        assert rc == 0


def test_file_size_limit_on_a_child_gives_one_line_and_no_partial_final_model(corpus, tmp_path):
    """final_model.pt (~140 kB) exceeds a 64 kB RLIMIT_FSIZE set on the process from outside."""
    out = tmp_path / "run"

    def limit_file_size() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, 64 * 1024))

    proc = subprocess.run(
        [sys.executable, "-m", "diloco", *train_args(corpus, out)],
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=240,
        preexec_fn=limit_file_size,
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr == f"diloco: error: cannot write {out / 'final_model.pt'}: File too large\n"
    assert not (out / "final_model.pt").exists() and not (out / "summary.json").exists()
    assert_outputs_whole(out)


def test_atomic_write_that_fails_keeps_the_old_file(tmp_path):
    with small_disk(tmp_path / "disk", 2) as disk:
        write_text_atomic(disk / "summary.json", '{"steps": 8}\n')
        with pytest.raises(Exception, match=r"cannot write .*summary.json: No space left"):
            write_text_atomic(disk / "summary.json", "x" * 3 * PAGE)
        assert json.loads((disk / "summary.json").read_text()) == {"steps": 8}
        assert [p.name for p in disk.iterdir()] == ["summary.json"]


# --- readers -------------------------------------------------------------------------------------


@pytest.fixture
def finished(corpus, tmp_path) -> Path:
    out = tmp_path / "run"
    assert run_cli(*train_args(corpus, out))[0] == 0
    return out


@pytest.mark.parametrize("command", ["summary", "plot"])
@pytest.mark.parametrize(
    ("content", "problem"),
    [("", "is empty"), ('{"steps": 8, "final_', "is damaged (not JSON"), ("[1]", "not a JSON")],
    ids=["zero-bytes", "torn", "not-an-object"],
)
def test_damaged_summary_json_is_one_line_naming_it(finished, tmp_path, command, content, problem):
    (finished / "summary.json").write_text(content)
    extra = ["--out", str(tmp_path / "c.png")] if command == "plot" else []
    rc, lines = run_cli(command, str(finished), *extra)
    assert rc == 2 and len(lines) == 1
    assert lines[0].startswith(f"diloco: error: {finished / 'summary.json'} ")
    assert problem in lines[0]


def test_torn_last_metrics_line_is_skipped(finished):
    path = finished / "metrics.jsonl"
    records = read_metrics(path)
    with open(path, "a") as f:
        f.write('{"step": 9, "lo')
    assert read_metrics(path) == records
    assert run_cli("summary", str(finished))[0] == 0


def test_damaged_metrics_line_before_the_last_is_one_line_naming_file_and_line(finished):
    path = finished / "metrics.jsonl"
    lines = path.read_text().splitlines()
    path.write_text("\n".join([lines[0], "garbage", *lines[1:]]) + "\n")
    rc, err = run_cli("summary", str(finished))
    assert rc == 2
    assert err == [f"diloco: error: {path} is damaged: line 2 is not a JSON record"]


def test_resumed_run_rewrites_metrics_without_the_crashed_runs_torn_line(corpus, tmp_path):
    out = tmp_path / "run"
    args = train_args(corpus, out) + ["--set", "train.checkpoint_every=1"]
    assert run_cli(*args)[0] == 0
    (out / "summary.json").unlink()
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 9, "lo')
    assert run_cli(*args, "--set", "train.steps=12")[0] == 0
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl")][-1] == 12
    assert (out / "metrics.jsonl").read_text().endswith("}\n")
