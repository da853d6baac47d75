#!/usr/bin/env bash
# Issue #17, StepEvent.follows (a crossing slot's retrieval follows its unanswered notice in the
# daemon instead of the slot taking that answer first): A/B against --notices taken on one GPU
# (nvidia-h200; carry .whl/eval), one bench after another (each alone on the machine).
#   PART=1: 32K x 8 at rates 0 / 0.117 (deferred) and 0.117 (taken), then the GPU engine tests
#   PART=2: 64 sequences at 4K, rate 0.117, deferred and taken; then capped 16 GiB and 32K x 8 again
#   PART=3: --host-copies kernel (the default) against copy at 64 sequences and at 32K x 8, then the
#           GPU engine, ws_decode and pinned_copy tests
#   PART=4: README's table with today's code: 32K and 128K, batch 1 and 8 (128K x 8 does not fit a
#           one-GPU machine's host), rates 0 / 0.117
# WARM=1: a short untimed bench first (this session's two slow runs were each the first bench on a freshly
# started machine; its JSON is left out of $OUT).
# Writes under $OUT: e2e-*.json (+ .png), logs.tgz.
#   usage: [WARM=1] PART=1 bash scripts/gpu_follows.sh
set -uo pipefail
OUT=${OUT:-/tmp/kvrecall-gpu-out}; mkdir -p "$OUT"
. scripts/gpu_env.sh
. scripts/gpu_e2e_lib.sh
if [ "${WARM:-0}" = 1 ]; then
  timeout 300 $E2E --parts step --contexts 32768 --batches 8 --rates 0.117 --steps 16 --warmup 8 \
    --out /tmp/e2e-warm.json > "$OUT/logs/e2e-warm.log" 2>&1
  echo "warm-up bench exit $? after ${SECONDS}s"
fi
if [ "${PART:-1}" = 1 ]; then
  e2e_run 32k8-deferred 260 --parts step --contexts 32768 --batches 8 --rates 0,0.117 --notices deferred
  e2e_run 32k8-taken 120 --parts step --contexts 32768 --batches 8 --rates 0.117 --notices taken
  FILE_S=${FILE_S:-150} bash scripts/gpu_tests.sh tests/gpu/test_engine_gpu.py
elif [ "$PART" = 4 ]; then
  e2e_run table 560 --parts step --contexts 32768,131072 --batches 1,8 --rates 0,0.117
elif [ "$PART" = 3 ]; then
  e2e_run many-kernel 260 --parts many --many 64 --many-context 4096 --rates 0.117 --host-copies kernel
  e2e_run many-copy 120 --parts many --many 64 --many-context 4096 --rates 0.117 --host-copies copy
  e2e_run 32k8-kernel 120 --parts step --contexts 32768 --batches 8 --rates 0,0.117 --host-copies kernel
  e2e_run 32k8-copy 100 --parts step --contexts 32768 --batches 8 --rates 0.117 --host-copies copy
  FILE_S=${FILE_S:-150} KERNEL_TESTS="tests/kernels/test_pinned_copy.py tests/kernels/test_ws_decode.py" \
    bash scripts/gpu_tests.sh tests/gpu/test_engine_gpu.py
else
  e2e_run many-deferred 150 --parts many --many 64 --many-context 4096 --rates 0.117 --notices deferred
  e2e_run many-taken 120 --parts many --many 64 --many-context 4096 --rates 0.117 --notices taken
  E2E=${E2E/--host-cap-gib 40 --host-pool-gib 40/--host-cap-gib 90 --host-pool-gib 90}
  e2e_run capped-deferred 200 --parts step,capped --contexts 32768 --batches 8 --rates 0.117 --notices deferred
fi
e2e_finish
