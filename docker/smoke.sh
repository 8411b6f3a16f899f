#!/usr/bin/env bash
# Build the docker/ image for real and run it: the slim and full targets, a test subset and one
# short training inside, then the two-node compose job (both nodes must exit 0, quietly, and the
# run must have a summary). Prints the build times, image sizes, tests passed, the compose run's
# final val loss and both exit codes. From anywhere in the repository:
#
#   docker/smoke.sh                                  # Docker Hub and PyPI reachable
#   docker/smoke.sh --base-from-debootstrap --pip-from-host   # no Docker Hub; this host's pip
#
# Options:
#   --base-from-debootstrap  build the base image locally (debootstrap Debian 12 with python3,
#                            python3-venv, then `docker import`) instead of python:3.11-slim;
#                            reused while the image $BASE_TAG exists. Needs root and debootstrap.
#   --mirror URL             Debian mirror for debootstrap (default: the first Debian URI in
#                            /etc/apt/sources.list*, else http://deb.debian.org/debian)
#   --pip-from-host          build with this host's pip settings (pip config and PIP_* variables:
#                            index-url, extra-index-url, find-links, trusted-host, cert). Local
#                            folders and file:// indexes are served read-only over HTTP on
#                            127.0.0.1 while the image builds; the CA bundle goes in as the
#                            BuildKit secret pip_cert. The torch wheel then comes from these
#                            indexes too (PIP_TORCH_INDEX="", unless set in the environment).
#   --pip-cert FILE          a CA bundle for pip inside the build (BuildKit secret pip_cert)
#   --build-arg NAME=VALUE   passed to both builds (repeatable), e.g. PIP_INDEX_URL=...
#   --clean                  remove the images at the end (default: kept, so a rerun is cached)
#   -h, --help               this text
#
# Environment: DOCKER (the docker CLI to use), COMPOSE (the compose command), DILOCO_SMOKE_NICE
# (niceness of a dockerd this script starts, default 10), DILOCO_SMOKE_TESTS (the test files of
# the subset, run with -m "not slow").
#
# The engine: a running one is used. Without one, and as root with dockerd installed, the script
# starts `dockerd --iptables=false --ip6tables=false --bridge=none` (host networking only: no
# bridge network is ever created) and stops it at the end. Every build and container uses the
# host network. BuildKit is required (RUN --mount): a docker CLI with buildx, or Docker 20.10-22
# with DOCKER_BUILDKIT=1 (set here).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

SLIM_TAG="diloco:cpu-slim"
FULL_TAG="diloco:cpu"
BASE_TAG="diloco-base:bookworm"
PROJECT="diloco-smoke"
# Unit tests of the config, the outer optimizers, compression, the model, data and reports, and
# these docker/ files (the multi-process paths run in the training and compose steps below).
DEFAULT_TESTS="tests/test_docker.py tests/test_config.py tests/test_outer.py tests/test_compress.py
tests/test_gpt.py tests/test_data.py tests/test_plot_summary.py"
TESTS="${DILOCO_SMOKE_TESTS:-$DEFAULT_TESTS}"

base_from_debootstrap=0
pip_from_host=0
pip_cert=""
mirror=""
clean=0
build_args=()

usage() { sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d' | sed 's/^# \{0,1\}//'; }
say() { echo "smoke: $*"; }
die() {
    echo "smoke: error: $*" >&2
    exit 1
}

while [[ $# -gt 0 ]]; do
    case "$1" in
        --base-from-debootstrap) base_from_debootstrap=1 ;;
        --pip-from-host) pip_from_host=1 ;;
        --pip-cert) pip_cert="${2:?--pip-cert FILE}"; shift ;;
        --mirror) mirror="${2:?--mirror URL}"; shift ;;
        --build-arg) build_args+=(--build-arg "${2:?--build-arg NAME=VALUE}"); shift ;;
        --clean) clean=1 ;;
        -h|--help) usage; exit 0 ;;
        *) die "unknown option $1 (see --help)" ;;
    esac
    shift
done

WORK="$(mktemp -d -t diloco-smoke.XXXXXX)"
dockerd_pid=""
compose_up=0

cleanup() {
    local rc=$?
    set +e
    if [[ "$compose_up" == 1 ]]; then
        "${COMPOSE_CMD[@]}" down -v --remove-orphans >/dev/null 2>&1
    fi
    if [[ -f "$WORK/servers.pids" ]]; then
        while read -r pid; do
            kill "$pid" 2>/dev/null
        done <"$WORK/servers.pids"
    fi
    if [[ "$clean" == 1 && -n "${DOCKER_CLI:-}" ]]; then
        "$DOCKER_CLI" image rm "$FULL_TAG" "$SLIM_TAG" >/dev/null 2>&1
    fi
    if [[ -n "$dockerd_pid" ]]; then
        say "stopping the dockerd this script started (pid $dockerd_pid)"
        kill "$dockerd_pid" 2>/dev/null
        for _ in $(seq 60); do
            kill -0 "$dockerd_pid" 2>/dev/null || break
            sleep 1
        done
    fi
    rm -rf "$WORK"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# --- the docker CLI: one that builds with BuildKit -------------------------------------------

buildkit_cli() {  # succeeds when $1 can run a BuildKit build (buildx, or Docker < 23 + env)
    local cli="$1" major
    "$cli" buildx version >/dev/null 2>&1 && return 0
    major="$("$cli" version --format '{{.Client.Version}}' 2>/dev/null | cut -d. -f1)" || true
    [[ "$major" =~ ^[0-9]+$ && "$major" -lt 23 ]]
}

if [[ -n "${DOCKER:-}" ]]; then
    DOCKER_CLI="$DOCKER"
else
    DOCKER_CLI=""
    for cli in $(type -ap docker) /usr/bin/docker; do
        if [[ -x "$cli" ]] && buildkit_cli "$cli"; then
            DOCKER_CLI="$cli"
            break
        fi
    done
    [[ -n "$DOCKER_CLI" ]] || die "no docker CLI here can build with BuildKit, which RUN --mount \
needs: install the buildx plugin (docker-buildx-plugin / docker-buildx), or use Docker 20.10-22 \
with DOCKER_BUILDKIT=1"
fi
export DOCKER_BUILDKIT=1 COMPOSE_DOCKER_CLI_BUILD=1
say "docker CLI: $DOCKER_CLI ($("$DOCKER_CLI" version --format '{{.Client.Version}}' 2>/dev/null \
    | head -1))"

# --- the engine ---------------------------------------------------------------------------------

if ! "$DOCKER_CLI" info >/dev/null 2>&1; then
    command -v dockerd >/dev/null 2>&1 || die "no Docker engine answers and dockerd is not \
installed (apt-get install docker.io)"
    [[ "$(id -u)" == 0 ]] || die "no Docker engine answers; start one (or run this as root)"
    say "no engine answers: starting dockerd (host networking only, log $WORK/dockerd.log)"
    nice -n "${DILOCO_SMOKE_NICE:-10}" dockerd --iptables=false --ip6tables=false \
        --bridge=none --storage-driver=overlay2 >"$WORK/dockerd.log" 2>&1 &
    dockerd_pid=$!
    for _ in $(seq 60); do
        "$DOCKER_CLI" info >/dev/null 2>&1 && break
        if ! kill -0 "$dockerd_pid" 2>/dev/null; then
            tail -20 "$WORK/dockerd.log" >&2
            die "dockerd exited"
        fi
        sleep 1
    done
    "$DOCKER_CLI" info >/dev/null 2>&1 || die "dockerd did not answer in 60 s ($WORK/dockerd.log)"
fi
say "engine: Docker $("$DOCKER_CLI" version --format '{{.Server.Version}}')"

# --- compose: v2 plugin, else v1 -------------------------------------------------------------

if [[ -n "${COMPOSE:-}" ]]; then
    read -r -a COMPOSE_CMD <<<"$COMPOSE"
elif "$DOCKER_CLI" compose version >/dev/null 2>&1; then
    COMPOSE_CMD=("$DOCKER_CLI" compose)
elif command -v docker-compose >/dev/null 2>&1; then
    COMPOSE_CMD=(docker-compose)
else
    die "no docker compose (the plugin) or docker-compose (v1) found"
fi
say "compose: ${COMPOSE_CMD[*]}"
COMPOSE_CMD+=(-f docker/compose.yaml -p "$PROJECT")

# --- the base image -------------------------------------------------------------------------

debian_mirror() {
    local uri
    uri="$(grep -rhoE '(URIs:|^deb)[[:space:]]+[^[:space:]]*/debian/?([[:space:]]|$)' \
        /etc/apt/sources.list /etc/apt/sources.list.d 2>/dev/null | awk '{print $2}' | head -1)" \
        || true
    echo "${uri:-http://deb.debian.org/debian}"
}

if [[ "$base_from_debootstrap" == 1 ]]; then
    if "$DOCKER_CLI" image inspect "$BASE_TAG" >/dev/null 2>&1; then
        say "base image: $BASE_TAG (exists; remove it to rebuild)"
    else
        command -v debootstrap >/dev/null 2>&1 || die "debootstrap not installed (apt-get install \
debootstrap)"
        [[ "$(id -u)" == 0 ]] || die "debootstrap needs root"
        mirror="${mirror:-$(debian_mirror)}"
        say "base image: debootstrap bookworm from $mirror"
        start=$SECONDS
        nice -n 10 debootstrap --variant=minbase \
            --include=python3,python3-venv,python-is-python3,ca-certificates \
            bookworm "$WORK/rootfs" "$mirror" >"$WORK/debootstrap.log" 2>&1 \
            || { tail -20 "$WORK/debootstrap.log" >&2; die "debootstrap failed"; }
        tar -c --numeric-owner -C "$WORK/rootfs" . | "$DOCKER_CLI" import \
            --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
            --change 'CMD ["python3"]' - "$BASE_TAG" >/dev/null
        rm -rf "$WORK/rootfs"
        say "base image: $BASE_TAG built in $((SECONDS - start)) s"
    fi
    build_args+=(--build-arg "BASE_IMAGE=$BASE_TAG")
fi

# --- pip settings -----------------------------------------------------------------------------

pip_setting() {  # the host's value of a pip option: PIP_* variable, else pip config
    local name="$1" var
    var="PIP_$(echo "$name" | tr '[:lower:]-' '[:upper:]_')"
    if [[ -n "${!var:-}" ]]; then
        echo "${!var}"
        return
    fi
    python3 -m pip config list 2>/dev/null \
        | sed -nE "s/^(global|install|:env:)\.${name}='(.*)'$/\2/p" | tail -1
}

serve() {  # serve a local folder over HTTP on 127.0.0.1; prints the URL of the folder
    local dir="$1" top port
    top="$dir"
    # A "simple" index links its files relatively (../../files/...): serve the folder above it.
    [[ "$(basename "$dir")" == simple ]] && top="$(dirname "$dir")"
    port="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); \
print(s.getsockname()[1])')"
    python3 -m http.server --bind 127.0.0.1 --directory "$top" "$port" \
        >>"$WORK/http.log" 2>&1 &
    echo $! >>"$WORK/servers.pids"  # called in $(...): the parent reads the PIDs from the file
    for _ in $(seq 50); do
        python3 -c "import urllib.request as u; u.urlopen('http://127.0.0.1:$port/')" \
            2>/dev/null && break
        sleep 0.1
    done
    if [[ "$top" == "$dir" ]]; then
        echo "http://127.0.0.1:$port/"
    else
        echo "http://127.0.0.1:$port/simple/"
    fi
}

to_build_url() {  # a pip location as the build sees it: local folders are served
    local loc="$1" path
    path="${loc#file://}"
    if [[ "$path" == /* ]]; then
        [[ -d "$path" ]] || { say "skipping $loc (not a folder)" >&2; return; }
        serve "${path%/}"
    else
        echo "$loc"
    fi
}

if [[ "$pip_from_host" == 1 ]]; then
    for name in index-url extra-index-url find-links trusted-host; do
        value="$(pip_setting "$name")"
        [[ -n "$value" ]] || continue
        converted=()
        for loc in $value; do
            if [[ "$name" == trusted-host ]]; then
                converted+=("$loc")
            else
                url="$(to_build_url "$loc")"
                [[ -n "$url" ]] && converted+=("$url")
            fi
        done
        var="PIP_$(echo "$name" | tr '[:lower:]-' '[:upper:]_')"
        build_args+=(--build-arg "$var=${converted[*]}")
        say "pip: $var=${converted[*]}"
    done
    build_args+=(--build-arg "PIP_TORCH_INDEX=${PIP_TORCH_INDEX:-}")
    [[ -n "$pip_cert" ]] || pip_cert="$(pip_setting cert)"
fi
secret_args=()
if [[ -n "$pip_cert" ]]; then
    [[ -r "$pip_cert" ]] || die "CA bundle $pip_cert not readable"
    secret_args=(--secret "id=pip_cert,src=$pip_cert")
    say "pip: CA bundle $pip_cert (BuildKit secret pip_cert)"
fi

# --- build --------------------------------------------------------------------------------------

build() {  # build TARGET TAG: prints the seconds taken
    local target="$1" tag="$2" start=$SECONDS
    if ! "$DOCKER_CLI" build --network host --progress plain -f docker/Dockerfile \
        --target "$target" -t "$tag" ${build_args[@]+"${build_args[@]}"} \
        ${secret_args[@]+"${secret_args[@]}"} . >"$WORK/build-$target.log" 2>&1; then
        tail -40 "$WORK/build-$target.log" >&2
        die "docker build --target $target failed"
    fi
    echo $((SECONDS - start))
}

image_size() { "$DOCKER_CLI" image inspect -f '{{.Size}}' "$1" | awk '{printf "%.2f GB", $1/1e9}'; }

say "building $SLIM_TAG (target slim) ..."
slim_s="$(build slim "$SLIM_TAG")"
say "building $FULL_TAG (target full, on top of slim) ..."
full_s="$(build full "$FULL_TAG")"
slim_size="$(image_size "$SLIM_TAG")"
full_size="$(image_size "$FULL_TAG")"
say "built: slim $slim_s s ($slim_size), full +$full_s s ($full_size)"

run_in() { "$DOCKER_CLI" run --rm --network host "$@"; }

# --- inside: a test subset, the extras of the full image, one short training ----------------

say "tests inside $SLIM_TAG: pytest -q -m 'not slow' $(echo "$TESTS" | tr '\n' ' ')"
start=$SECONDS
# shellcheck disable=SC2086  # TESTS is a list of test files
if ! run_in "$SLIM_TAG" python -m pytest -q -p no:cacheprovider -m "not slow" $TESTS \
    >"$WORK/tests.log" 2>&1; then
    tail -40 "$WORK/tests.log" >&2
    die "tests failed inside $SLIM_TAG"
fi
tests_s=$((SECONDS - start))
tests_line="$(grep -E '^[0-9]+ passed' "$WORK/tests.log" | tail -1)"
say "tests inside: $tests_line"

run_in "$FULL_TAG" python -c \
    "import deepspeed, ray, torchft; print('extras:', ray.__version__, deepspeed.__version__)" \
    >"$WORK/extras.log" 2>&1 || { cat "$WORK/extras.log" >&2; die "extras missing in $FULL_TAG"; }
say "full image: $(grep '^extras:' "$WORK/extras.log")"

say "one short training inside $SLIM_TAG (2 processes, G=2 x S=1, 30 steps)"
start=$SECONDS
train_py='import json
print(round(json.load(open("runs/smoke/summary.json"))["final_val_loss"], 4))'
if ! run_in "$SLIM_TAG" bash -c "bash launch/torchrun.sh --standalone --nproc-per-node 2 \
    -m diloco train --config configs/tiny_diloco_2x2_cpu.yaml --set topology.groups=2 \
    --set topology.shards=1 --set train.steps=30 --set inner.warmup_steps=5 \
    --set run.out_dir=runs/smoke && python -c '$train_py'" >"$WORK/train.log" 2>&1; then
    tail -40 "$WORK/train.log" >&2
    die "training failed inside $SLIM_TAG"
fi
train_s=$((SECONDS - start))
train_loss="$(tail -1 "$WORK/train.log")"
say "training inside: final val loss $train_loss ($train_s s)"

# --- the two-node compose job -------------------------------------------------------------------

export DILOCO_IMAGE="$FULL_TAG"
say "compose: two nodes (${DILOCO_IMAGE}), 200 steps ..."
"${COMPOSE_CMD[@]}" down -v --remove-orphans >/dev/null 2>&1 || true
compose_up=1
start=$SECONDS
timeout 1200 "${COMPOSE_CMD[@]}" up --no-build >"$WORK/compose.log" 2>&1 \
    || { tail -60 "$WORK/compose.log" >&2; die "compose up failed or timed out"; }
compose_s=$((SECONDS - start))
codes=()
for node in node0 node1; do
    id="$("${COMPOSE_CMD[@]}" ps -q "$node")"
    codes+=("$("$DOCKER_CLI" inspect -f '{{.State.ExitCode}}' "$id")")
done
summary_py='import json
print(round(json.load(open("runs/compose_diloco/summary.json"))["final_val_loss"], 4))'
compose_loss="$("${COMPOSE_CMD[@]}" run --rm --no-deps node0 python -c "$summary_py" 2>&1 \
    | tail -1)"
say "compose: node0 exit ${codes[0]}, node1 exit ${codes[1]}, final val loss $compose_loss \
($compose_s s)"
noise="$(grep -cE 'Traceback|frame #[0-9]+|Exception raised from' "$WORK/compose.log" || true)"
[[ "${codes[0]}" == 0 && "${codes[1]}" == 0 ]] || { tail -60 "$WORK/compose.log" >&2; \
    die "a node exited non-zero"; }
[[ "$compose_loss" =~ ^[0-9.]+$ ]] || die "no summary.json in the compose run: $compose_loss"
if [[ "$noise" != 0 ]]; then
    grep -nE -B2 -A8 'Traceback|Exception raised from' "$WORK/compose.log" | head -60 >&2
    die "the compose job exited 0 but printed $noise trace lines"
fi

cat <<EOF

smoke: ---------------------------------------------------------------------------------------
smoke: build time         slim ${slim_s} s, full +${full_s} s (total $((slim_s + full_s)) s)
smoke: image size         slim ${slim_size} ($SLIM_TAG), full ${full_size} ($FULL_TAG)
smoke: tests inside       ${tests_line} ($tests_s s, $SLIM_TAG)
smoke: training inside    final val loss ${train_loss} (30 steps, $train_s s)
smoke: compose            node0 exit ${codes[0]}, node1 exit ${codes[1]}, final val loss \
${compose_loss} (200 steps, $compose_s s), no trace on shutdown
smoke: OK
EOF
