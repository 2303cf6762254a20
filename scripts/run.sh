#!/usr/bin/env bash
# Set up (first run) and start the app: ./scripts/run.sh [app.py flags, e.g. --model ... --share]
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
exec .venv/bin/python app.py "$@"
