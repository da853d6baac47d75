#!/usr/bin/env bash
# Device run (one call, ~8 min): louiskv's unit table in float8 e4m3 (the daemon's unit_reps_dtype fp8) against
# bf16 (issue #17: at 128K a retrieval's scoring reads the whole table, ~0.27 ms of the daemon's ~1.2 ms a 128K x 8
# call). On one machine:
# 0. GPU tests of the paths fp8 touches: the score kernel (fp8 reps), the chunked selection (4 ways), the worker's
#    choice over a mapped fp8 table, worker selection and captured selection (logs/tests-fp8.log);
# 1. scripts/score_probe.py (the score kernel alone, bf16 against fp8 tables);
# 2. 128K x 8 over a shared document (bench e2e --shared-prompt, a daemon process), bf16 and fp8 in turn
#    (RUNS, default "b16-1 fp8-1 b16-2 fp8-2"; no run starts past BUDGET_S, default 420), then 32K x 8 (b16-32k, fp8-32k).
#   usage (device, carry .whl/eval .whl/triton): [RUNS=...] [BUDGET_S=420] [SKIP_TESTS=1] [PACK_TRITON=1] bash scripts/gpu_fp8_table.sh
. scripts/gpu_env.sh
E2E_EXTRA="--query-drift 0.15 --daemon process"
. scripts/gpu_e2e_lib.sh
if [ -z "${SKIP_TESTS:-}" ]; then
  timeout 240 python3 -m pytest -q --tb=short -p no:cacheprovider tests/kernels/test_unit_scores.py \
    tests/kernels/test_budget_select.py tests/test_worker_table.py tests/gpu/test_worker_selection_gpu.py \
    tests/gpu/test_captured_selection_gpu.py > "$OUT/logs/tests-fp8.log" 2>&1
  echo "tests exit $? after ${SECONDS}s: $(tail -1 "$OUT/logs/tests-fp8.log")"
fi
timeout 120 python3 scripts/score_probe.py --out "$OUT/score-probe.json"
FP8="--daemon-env KVRECALL_UNIT_REPS_DTYPE=fp8"
S128="--parts step --contexts 131072 --batches 8 --rates 0,0.117 --shared-prompt"
S32="--parts step --contexts 32768 --batches 8 --rates 0,0.117"
for run in ${RUNS:-b16-1 fp8-1 b16-2 fp8-2 b16-32k fp8-32k}; do
  [ "$SECONDS" -lt "${BUDGET_S:-420}" ] || { echo "skipped $run (budget)"; continue; }
  case $run in
    b16-32k) e2e_run "$run" 100 $S32 ;;
    fp8-32k) e2e_run "$run" 100 $S32 $FP8 ;;
    b16-*) e2e_run "$run" 150 $S128 ;;
    fp8-*) e2e_run "$run" 150 $S128 $FP8 ;;
  esac
done
[ "${PACK_TRITON:-0}" = 1 ] && pack_triton_cache
e2e_finish
