"""The README stays true: its test command is what CI runs, its config reference is current."""

from pathlib import Path

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
        'pip install torch==2.13.0 && pip install -e ".[dev,ray,deepspeed,elastic]" '
        "&& python -m pytest -q"
    )
    assert command in README
    assert "install.sh dev,ray,deepspeed,elastic" in ci
    assert "python -m pytest -q" in ci
