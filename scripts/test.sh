#!/usr/bin/env bash
# Install (if needed) and run the whole test suite offline: ruff, then pytest.
set -euo pipefail
source "$(dirname "$0")/env.sh"
export PREFECT_HOME="${PREFECT_HOME:-$(mktemp -d)}"
.venv/bin/ruff check .
.venv/bin/ruff format --check .
# Two workers (one per core here); a module's tests stay on one worker so its fixtures are
# built once. LSSF_TEST_WORKERS=0 runs everything in this process.
.venv/bin/python -m pytest -n "${LSSF_TEST_WORKERS:-2}" --dist loadfile "$@"
