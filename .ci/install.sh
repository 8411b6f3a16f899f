#!/usr/bin/env bash
# Install torch (CPU) and this package in editable mode with the given extras.
#
# The one install script: `.ci/run` calls `.ci/install.sh dev`, docker/Dockerfile calls
# `.ci/install.sh dev,ray`, so CI and the image cannot drift apart.
#
#   .ci/install.sh [EXTRAS]        EXTRAS: comma-separated, default "dev"
#
# Environment:
#   TORCH_VERSION     torch version to pin (default 2.13.0)
#   PIP_TORCH_INDEX   index URL for the torch wheel, e.g. https://download.pytorch.org/whl/cpu
#                     (set in the Dockerfile; unset, pip's default index or local wheels are used)
set -euo pipefail

extras="${1:-dev}"
torch_version="${TORCH_VERSION:-2.13.0}"
cd "$(dirname "${BASH_SOURCE[0]}")/.."

if [[ -n "${PIP_TORCH_INDEX:-}" ]]; then
    python -m pip install "torch==${torch_version}" --index-url "${PIP_TORCH_INDEX}"
else
    python -m pip install "torch==${torch_version}"
fi
python -m pip install -e ".[${extras}]"
