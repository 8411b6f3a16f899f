"""The README stays true: its test command is what CI runs, its config reference is current."""

from pathlib import Path

import pytest

from diloco.config import config_reference

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")


def test_readme_config_reference_matches_the_schema():
    """Regenerate with: python -c "from diloco.config import config_reference as r; print(r())"."""
    assert config_reference().strip() in README


def test_ci_runs_the_readme_test_command():
    """`.ci/run` installs the extras the README names and runs the README's pytest command."""
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    command = (
        'pip install torch==2.13.0 && pip install -e ".[dev,ray,deepspeed,elastic,hf]" '
        "&& python -m pytest -q"
    )
    assert command in README
    assert "install.sh dev,ray,deepspeed,elastic,hf" in ci
    assert "python -m pytest -q" in ci


def test_readme_snippet_loads_an_exported_model_of_a_non_default_shape(tmp_path, monkeypatch):
    """The README's load snippet, run as written next to an export and a run of another shape."""
    pytest.importorskip("safetensors")
    from diloco.cli import main

    shape = ["model.n_layer=1", "model.n_head=2", "model.n_embd=24", "model.block_size=16"]
    rest = ["data.batch_size=4", "train.steps=4", "inner.warmup_steps=1", "outer.sync_every=2"]
    rest += ["train.eval_batches=1", "train.checkpoint_every=1", "run.progress=false"]
    monkeypatch.chdir(tmp_path)
    assert main(["train", *(f"--set={o}" for o in [*shape, *rest, "run.out_dir=runs/a"])]) == 0
    assert main(["export", "runs/a", "--out", "model.safetensors"]) == 0
    snippet = README.split("```python\nimport json, torch, yaml\n", 1)[1].split("```", 1)[0]
    namespace: dict = {}
    exec("import json, torch, yaml\n" + snippet, namespace)
    assert namespace["model"].config.n_embd == namespace["final"].config.n_embd == 24
