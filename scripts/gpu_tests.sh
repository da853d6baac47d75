#!/usr/bin/env bash
# The gpu-marked tests on the device machine, one pytest per file (each file's report survives
# another's time-out), then kernel test files natively. Carry .whl/eval. Logs under $OUT/tests/.
#   usage: [FILE_S=150] [KERNEL_TESTS="tests/kernels/test_placement.py"] bash scripts/gpu_tests.sh [test files]
set -uo pipefail
OUT=${OUT:-/tmp/kvrecall-gpu-out}; mkdir -p "$OUT/tests"
. scripts/gpu_env.sh
FILES=${*:-tests/reliability/test_truncation_gpu.py tests/gpu/*.py tests/test_causal_attention.py}
for file in $FILES; do
  case $file in */__init__.py) continue ;; esac
  log="$OUT/tests/$(basename "$file" .py).log"
  SECONDS=0
  timeout ${FILE_S:-150} python3 -m pytest -v --tb=short -p no:cacheprovider -m gpu "$file" > "$log" 2>&1
  echo "$file: exit $? in ${SECONDS}s: $(tail -1 "$log")"
done
for file in ${KERNEL_TESTS:-}; do
  log="$OUT/tests/$(basename "$file" .py).log"
  SECONDS=0
  timeout ${FILE_S:-150} python3 -m pytest -q --tb=short -p no:cacheprovider "$file" > "$log" 2>&1
  echo "$file (native): exit $? in ${SECONDS}s: $(tail -1 "$log")"
done
