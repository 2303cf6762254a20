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
# One pytest worker per core, at most 4 (pytest-xdist; each worker builds its own tiny models, and a
# test starts app servers and browsers of its own). A module's tests stay on one worker (loadfile):
# module fixtures such as a running app are built once. LORAPG_TEST_WORKERS=0 runs in this process.
# GNU nproc honours OMP_NUM_THREADS (set to 1 above for torch): count the cores without it, or the
# suite runs on one worker whatever the machine has.
cores="$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc)"
workers="${LORAPG_TEST_WORKERS:-$(( cores < 4 ? cores : 4 ))}"
# Modules go out in collection order, the longest first (tests/conftest.py, LONGEST_MODULES), not
# xdist's most-tests-first: a long module started last would keep one worker busy alone at the end.
# The slowest tests are listed at the end, so a run that grows shows where the time went.
exec .venv/bin/python -m pytest -q --durations=25 -n "$workers" --dist loadfile --no-loadscope-reorder "$@"
