"""The ``diloco`` command itself: its version, and a clean start (no warnings on stderr)."""

from __future__ import annotations

import re
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

from diloco.launchers.local import child_env

ROOT = Path(__file__).resolve().parents[1]


def test_version_prints_the_installed_version_and_nothing_on_stderr():
    """stderr stays empty: a fresh install prints no "Failed to initialize NumPy" warning
    (numpy is a dependency, so torch finds it)."""
    proc = subprocess.run(
        [sys.executable, "-m", "diloco", "--version"],
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0
    assert proc.stdout == f"diloco {version('diloco')}\n"
    assert proc.stderr == ""


def test_numpy_and_tqdm_are_declared_dependencies():
    text = (ROOT / "pyproject.toml").read_text()
    dependencies = re.search(r"^dependencies = \[(.*)\]$", text, re.MULTILINE).group(1)
    names = {re.split(r"[<>=\[ ;]", d.strip(' "'))[0] for d in dependencies.split(",")}
    assert {"numpy", "tqdm"} <= names
