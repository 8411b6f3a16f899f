#!/usr/bin/env bash
# Install torch (CPU) and this package in editable mode with the given extras.
#
# The one install script: `.ci/run` calls `.ci/install.sh dev,ray,deepspeed,elastic`;
# docker/Dockerfile calls `.ci/install.sh dev` (target slim) and then
# `.ci/install.sh dev,ray,deepspeed,elastic` (target full, the default), so CI and the image
# cannot drift apart.
#
#   .ci/install.sh [EXTRAS]        EXTRAS: comma-separated, default "dev"
#   .ci/install.sh --upgrade-pip   only upgrade pip in the current environment (the image's
#                                  fresh venv starts with the base image's bundled pip)
#
# Environment:
#   TORCH_VERSION     torch version to pin (default 2.13.0)
#   PIP_TORCH_INDEX   index URL for the torch wheel, e.g. https://download.pytorch.org/whl/cpu
#                     (the Dockerfile's default; unset or empty, pip's configured indexes and
#                     find-links are used, as for every other package)
#   PIP_*             pip's own settings (PIP_INDEX_URL, PIP_FIND_LINKS, PIP_CERT, ...). Empty
#                     ones are dropped (an unset Docker build arg is ""; pip would read "" as a
#                     value). Without PIP_CERT, the BuildKit secret /run/secrets/pip_cert (the
#                     Dockerfile's `--secret id=pip_cert,...`) is the CA bundle when present.
set -euo pipefail

for var in $(compgen -e); do
    if [[ "$var" == PIP_* && -z "${!var}" ]]; then
        unset "$var"
    fi
done
if [[ -z "${PIP_CERT:-}" && -r /run/secrets/pip_cert ]]; then
    export PIP_CERT=/run/secrets/pip_cert
fi

if [[ "${1:-}" == "--upgrade-pip" ]]; then
    exec python -m pip install --upgrade pip
fi

extras="${1:-dev}"
torch_version="${TORCH_VERSION:-2.13.0}"
cd "$(dirname "${BASH_SOURCE[0]}")/.."

if [[ -n "${PIP_TORCH_INDEX:-}" ]]; then
    python -m pip install "torch==${torch_version}" --index-url "${PIP_TORCH_INDEX}"
else
    python -m pip install "torch==${torch_version}"
fi
python -m pip install -e ".[${extras}]"
