#!/usr/bin/env bash
# Installs everything and runs the test suite (GPU tests skip themselves without CUDA).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
ruff check kvrecall tests
exec python -m pytest -q -p no:cacheprovider "$@"
