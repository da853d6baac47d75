#!/usr/bin/env bash
# Engine overlap (each step launched before the host work of the one before) against the step as
# before, on one GPU (nvidia-h200; carry .whl/eval), one bench after another (each alone on the machine).
#   PART=1: an untimed warm-up bench, then 32K x 8 at rates 0 / 0.117, overlap off then on, then the
#           GPU engine tests (captured step equals eager and full attention, with overlap too)
#   PART=2: 64 sequences at 4K, rate 0.117, overlap on then off; capped 16 GiB at 32K with overlap on
#   PART=3: README's table with overlap on: 32K and 128K, batch 1 and 8 (128K x 8 needs a 256 GiB host)
#   PART=4: PART=3's table, then 32K x 8 with lag 5 overlap on and off, then 64 sequences with overlap on
#   PART=5: 32K x 8 overlap on at lag 6 and 8, 64 sequences overlap off, capped 16 GiB at 32K overlap on
# Writes under $OUT: e2e-*.json (+ .png), logs.tgz.
#   usage: PART=1 bash scripts/gpu_overlap.sh
set -uo pipefail
OUT=${OUT:-/tmp/kvrecall-gpu-out}; mkdir -p "$OUT"
. scripts/gpu_env.sh
. scripts/gpu_e2e_lib.sh
if [ "${PART:-1}" = 1 ]; then
  e2e_warmup 300
  e2e_run 32k8-off 170 --parts step --contexts 32768 --batches 8 --rates 0,0.117 --overlap off
  e2e_run 32k8-on 170 --parts step --contexts 32768 --batches 8 --rates 0,0.117 --overlap on
  FILE_S=${FILE_S:-100} bash scripts/gpu_tests.sh tests/gpu/test_engine_gpu.py
elif [ "$PART" = 2 ]; then
  e2e_run many-on 170 --parts many --many 64 --many-context 4096 --rates 0,0.117 --overlap on
  e2e_run many-off 150 --parts many --many 64 --many-context 4096 --rates 0.117 --overlap off
  E2E=${E2E/--host-cap-gib 40 --host-pool-gib 40/--host-cap-gib 90 --host-pool-gib 90}
  e2e_run capped-on 250 --parts capped --contexts 32768 --rates 0.117 --overlap on
elif [ "$PART" = 4 ]; then
  e2e_run table-on 330 --parts step --contexts 32768,131072 --batches 1,8 --rates 0,0.117 --overlap on
  e2e_run 32k8-on-lag5 80 --parts step --contexts 32768 --batches 8 --rates 0,0.117 --overlap on --lag 5
  e2e_run 32k8-off-lag5 80 --parts step --contexts 32768 --batches 8 --rates 0,0.117 --overlap off --lag 5
  e2e_run many-on 150 --parts many --many 64 --many-context 4096 --rates 0,0.117 --overlap on
elif [ "$PART" = 5 ]; then
  e2e_run 32k8-on-lag6 80 --parts step --contexts 32768 --batches 8 --rates 0,0.117 --overlap on --lag 6
  e2e_run 32k8-on-lag8 80 --parts step --contexts 32768 --batches 8 --rates 0.117 --overlap on --lag 8
  e2e_run many-off 120 --parts many --many 64 --many-context 4096 --rates 0,0.117 --overlap off
  E2E=${E2E/--host-cap-gib 40 --host-pool-gib 40/--host-cap-gib 90 --host-pool-gib 90}
  e2e_run capped-on 250 --parts capped --contexts 32768 --rates 0.117 --overlap on
else
  e2e_run table-on 570 --parts step --contexts 32768,131072 --batches 1,8 --rates 0,0.117 --overlap on
fi
e2e_finish
