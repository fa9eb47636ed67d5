#!/usr/bin/env bash
# Install (if needed) and run the main job: the whole pipeline on the model organism, offline.
set -euo pipefail
source "$(dirname "$0")/env.sh"
.venv/bin/lssf demo --workdir "${1:-.state/demo}"
