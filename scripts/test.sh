#!/usr/bin/env bash
# Install (if needed) and run the whole test suite offline: ruff, then pytest.
set -euo pipefail
source "$(dirname "$0")/env.sh"
export PREFECT_HOME="${PREFECT_HOME:-$(mktemp -d)}"
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/python -m pytest "$@"
