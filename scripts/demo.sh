#!/usr/bin/env bash
# Install (if needed) and run the main job.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/lssf quickstart --workdir "${1:-.state/quickstart}"
