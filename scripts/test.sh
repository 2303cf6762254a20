#!/usr/bin/env bash
# Set up (first run) and run the whole test suite, offline, on one CPU thread.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh dev
export OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 GRADIO_ANALYTICS_ENABLED=False
# The slow tests convert and run the bundled SmolLM2 (about a minute); LORAPG_SLOW_TESTS=0 skips them.
export LORAPG_SLOW_TESTS="${LORAPG_SLOW_TESTS:-1}"
.venv/bin/ruff check .
.venv/bin/ruff format --check .  # one formatter configuration (pyproject.toml), followed everywhere
# The slowest tests are listed at the end, so a run that grows shows where the time went.
exec .venv/bin/python -m pytest -q --durations=25 "$@"
