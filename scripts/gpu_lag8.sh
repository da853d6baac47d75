#!/usr/bin/env bash
# Lag 8 without overlap, the candidate default (issue #17), on one GPU (nvidia-h200; carry .whl/eval),
# one bench after another (each alone on the machine).
#   PART=1: an untimed warm-up bench, then README's table at lag 8: 32K and 128K, batch 1 and 8, rates 0 / 0.117
#           (128K x 8 needs a 256 GiB host and is skipped on this one)
#   PART=2 (carry .whl/model1 too: staged for a later `bash scripts/gpu_accuracy.sh` call): 64 sequences at 4K and
#           capped 16 GiB at 32K (90 GiB host pool), both at lag 8, rate 0.117
#   PART=3: a warm-up bench, then PART=1's table, 64 sequences and capped, all with --switch answered (a crossed slot
#           leaves its shadow as soon as its retrieval is answered, after 8 steps at the latest)
#   PART=4: lag 4 against lag 8 (`fixed`, with the stale-query fix), each bench timing both lags (--lag 4,8): a
#           warm-up bench, README's table, 64 sequences, then a profiled 32K x 8 bench at lag 4 (the daemon's GPU
#           kernels); leaves the Triton cache in $OUT (pack_triton_cache); stages .whl/model1 if carried
#   PART=5: capped 16 GiB at 32K (90 GiB host pool) at lag 4 and 8 (--lag 4,8); stages .whl/model2 if carried
# Writes under $OUT: e2e-*.json (+ .png), logs.tgz.
#   usage: PART=1 bash scripts/gpu_lag8.sh
set -uo pipefail
OUT=${OUT:-/tmp/kvrecall-gpu-out}; mkdir -p "$OUT"
. scripts/gpu_env.sh
. scripts/gpu_e2e_lib.sh
E2E=${E2E/--lag 4/--lag 8}
if [ "${PART:-1}" = 1 ]; then
  e2e_warmup 300
  e2e_run table-lag8 270 --parts step --contexts 32768,131072 --batches 1,8 --rates 0,0.117
elif [ "$PART" = 4 ]; then
  [ -f .whl/model1/part1 ] && bash scripts/gpu_accuracy.sh stage
  e2e_warmup 300
  pack_triton_cache
  e2e_run table-lag4-8 200 --parts step --contexts 32768,131072 --batches 1,8 --rates 0,0.117 --lag 4,8
  e2e_run many-lag4-8 150 --parts many --many 64 --many-context 4096 --rates 0,0.117 --lag 4,8
  e2e_run kernels32k8-lag4 60 --parts step --contexts 32768 --batches 8 --rates 0.117 --lag 4 \
    --daemon-env "KVRECALL_KERNEL_PROFILE_OUT=$OUT/kernels32k8-lag4-daemon-kernels.json"
elif [ "$PART" = 5 ]; then
  [ -f .whl/model2/part2 ] && bash scripts/gpu_accuracy.sh stage
  E2E=${E2E/--host-cap-gib 40 --host-pool-gib 40/--host-cap-gib 90 --host-pool-gib 90}
  e2e_run capped-lag4-8 200 --parts capped --contexts 32768 --rates 0.117 --lag 4,8
elif [ "$PART" = 3 ]; then
  e2e_warmup 240
  e2e_run table-answered 150 --parts step --contexts 32768,131072 --batches 1,8 --rates 0,0.117 --switch answered
  e2e_run many-answered 100 --parts many --many 64 --many-context 4096 --rates 0.117 --switch answered
  E2E=${E2E/--host-cap-gib 40 --host-pool-gib 40/--host-cap-gib 90 --host-pool-gib 90}
  e2e_run capped-answered 110 --parts capped --contexts 32768 --rates 0.117 --switch answered
else
  [ -f .whl/model1/part1 ] && bash scripts/gpu_accuracy.sh stage
  e2e_run many-lag8 150 --parts many --many 64 --many-context 4096 --rates 0,0.117
  E2E=${E2E/--host-cap-gib 40 --host-pool-gib 40/--host-cap-gib 90 --host-pool-gib 90}
  e2e_run capped-lag8 250 --parts capped --contexts 32768 --rates 0.117
fi
e2e_finish
