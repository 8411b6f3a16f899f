"""Specification of the progress display: a tqdm bar on a terminal, plain lines elsewhere, the
val loss shown bare when new and with its step afterwards, nothing when disabled (other ranks)."""

from __future__ import annotations

import fcntl
import io
import os
import pty
import re
import struct
import subprocess
import sys
import termios
from pathlib import Path

from helpers import sets, tiny_overrides

from diloco.job.progress import ProgressBar
from diloco.launchers.local import child_env


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def drive(bar: ProgressBar, steps: int, eval_every: int) -> None:
    """What the training loop does: val at step 0 and every ``eval_every`` steps, a log line
    every step."""
    bar.set_val(0, 5.0)
    for step in range(1, steps + 1):
        if step % eval_every == 0:
            bar.set_val(step, 5.0 - step / 100)
        bar.update(step, loss=4.0 - step / 100, tokens_per_s=1234.4)
    bar.close()


def test_plain_lines_about_every_tenth_of_the_run_when_not_a_terminal():
    out = io.StringIO()
    drive(ProgressBar(100, stream=out), 100, eval_every=25)
    lines = out.getvalue().splitlines()
    assert [int(line.split("/")[0]) for line in lines] == list(range(1, 101, 10)) + [100]
    assert "\r" not in out.getvalue()
    assert re.fullmatch(r"100/100 loss 3 val 4 tok/s 1234 \| \d\d:\d\d<00:00", lines[-1])


def test_val_is_bare_on_its_step_and_names_its_step_afterwards():
    out = io.StringIO()
    drive(ProgressBar(100, stream=out), 100, eval_every=50)
    by_step = {int(line.split("/")[0]): line for line in out.getvalue().splitlines()}
    assert " val 5 (step 0) " in by_step[1]
    assert " val 4.5 (step 50) " in by_step[51]
    assert " val 4 tok/s" in by_step[100]


def test_no_val_shown_before_the_first_evaluation():
    bar = ProgressBar(10, stream=io.StringIO())
    assert bar.fields(3, loss=2.0, tokens_per_s=10) == "loss 2 tok/s 10"


def test_terminal_gets_a_tqdm_bar_redrawn_in_place_with_eta():
    out = Terminal()
    drive(ProgressBar(100, stream=out), 100, eval_every=25)
    text = out.getvalue()
    assert "\r" in text
    last = text.rstrip("\n").split("\r")[-1]
    expected = r"100%\|.*\| 100/100 \[\d\d:\d\d<00:00, .*step/s, loss 3 val 4 tok/s 1234]"
    assert re.search(expected, last)


def test_resumed_run_bar_starts_at_the_checkpoint_step():
    out = io.StringIO()
    bar = ProgressBar(100, stream=out, start=60)
    bar.update(61, loss=1.0, tokens_per_s=1.0)
    assert out.getvalue().startswith("61/100 loss 1 tok/s 1 | ")


def test_disabled_bar_prints_nothing_as_on_ranks_other_than_0():
    out = Terminal()
    drive(ProgressBar(100, enabled=False, stream=out), 100, eval_every=25)
    assert out.getvalue() == ""


def train_cmd(tmp_path: Path) -> list[str]:
    corpus = tmp_path / "corpus.txt"
    corpus.write_text((Path(__file__).parents[1] / "diloco" / "job" / "train.py").read_text() * 2)
    overrides = tiny_overrides(
        20, 4, f"data.source=text:{corpus}", f"run.out_dir={tmp_path / 'run'}",
        "run.progress=true", "train.log_every=2", "train.eval_every=10",
    )  # fmt: skip
    return [sys.executable, "-m", "diloco", "train", *sets(overrides)]


def test_a_run_logged_to_a_file_prints_plain_progress_lines(tmp_path):
    proc = subprocess.run(
        train_cmd(tmp_path), env=child_env(), capture_output=True, text=True, timeout=240
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stderr.splitlines()
    assert [line.split("/")[0] for line in lines] == ["2", "4", "6", "8", "10", "12", "14", "16",
                                                      "18", "20"]  # fmt: skip
    assert "val" in lines[0] and "(step 0)" in lines[0] and "(step" not in lines[4]


def test_a_run_on_a_terminal_draws_a_tqdm_bar(tmp_path):
    main, child = pty.openpty()
    fcntl.ioctl(child, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 160, 0, 0))  # rows, columns
    proc = subprocess.Popen(
        train_cmd(tmp_path), env=child_env(), stdout=subprocess.DEVNULL, stderr=child
    )
    os.close(child)
    chunks = []
    while True:
        try:
            data = os.read(main, 4096)
        except OSError:  # the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    assert proc.wait(timeout=240) == 0
    os.close(main)
    screen = b"".join(chunks).decode(errors="replace")
    assert "\r" in screen and "20/20 [" in screen and "tok/s" in screen
