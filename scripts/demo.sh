#!/usr/bin/env bash
# Installs everything, starts a local daemon and runs the bundled model through it.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
exec kvrecall demo --policy louiskv --budget 256 --context-tokens 2000 --seed 0 "$@"
