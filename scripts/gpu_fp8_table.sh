#!/usr/bin/env bash
# Device run (one call, ~6-8 min): louiskv's unit table in float8 e4m3 (the daemon's unit_reps_dtype fp8) against
# bf16 (issue #17: at 128K a retrieval's scoring reads the whole table, ~0.27 ms of the daemon's ~1.2 ms a 128K x 8
# call). On one machine:
# 0. (unless SKIP_TESTS) GPU tests of the paths fp8 touches: the score kernel (fp8 reps), the chunked selection,
#    the worker's choice over a mapped fp8 table, worker selection and captured selection (logs/tests-fp8.log);
# 1. scripts/score_probe.py (the score kernel alone, bf16 against fp8 tables, per (units a program, warps));
#    with SET_BLOCKS=1 the fastest variant of each dtype (summed over the probe's sizes) is written into this copy's
#    unit_scores_triton.SCORE_BLOCKS for the runs below (logged);
# 2. RUNS in turn (no run starts past BUDGET_S, default 420), a daemon process, drift 0.15:
#    b16-N / fp8-N    128K x 8 over a shared document (bench e2e --shared-prompt), rates 0 and 11.7%;
#    b16-32k / fp8-32k  32K x 8;
#    table-b16 / table-fp8  README's table (32K and 128K, batch 1 and 8, shared document).
#    Results (JSON, logs) in $OUT/logs.tgz (a call returns at most 8 files).
#   usage (device, carry .whl/eval .whl/triton): [RUNS=...] [BUDGET_S=420] [SKIP_TESTS=1] [SET_BLOCKS=1] [PACK_TRITON=1]
#          bash scripts/gpu_fp8_table.sh
. scripts/gpu_env.sh
E2E_EXTRA="--query-drift 0.15 --daemon process"
. scripts/gpu_e2e_lib.sh
if [ -z "${SKIP_TESTS:-}" ]; then
  timeout 240 python3 -m pytest -q --tb=short -p no:cacheprovider tests/kernels/test_unit_scores.py \
    tests/kernels/test_budget_select.py tests/test_worker_table.py tests/gpu/test_worker_selection_gpu.py \
    tests/gpu/test_captured_selection_gpu.py > "$OUT/logs/tests-fp8.log" 2>&1
  echo "tests exit $? after ${SECONDS}s: $(tail -1 "$OUT/logs/tests-fp8.log")"
fi
timeout 150 python3 scripts/score_probe.py --out "$OUT/logs/score-probe.json" | tee "$OUT/logs/score-probe.txt"
if [ -n "${SET_BLOCKS:-}" ] && [ -f "$OUT/logs/score-probe.json" ]; then
  python3 - "$OUT/logs/score-probe.json" <<'PY' | tee "$OUT/logs/score-blocks.txt"
import json, re, sys
rows = json.load(open(sys.argv[1]))["results"]
path = "kvrecall/kernels/unit_scores_triton.py"
src = open(path).read()
blocks = dict(eval(re.search(r"^SCORE_BLOCKS = (\{.*\})$", src, re.M).group(1)))
for name, size in (("bf16", 2), ("fp8", 1)):
    keys = sorted({k[len(name) + 1 : -3] for k in rows[0] if k.startswith(name + "_u") and k.endswith("_ms")})
    total = {k: sum(r[f"{name}_{k}_ms"] for r in rows) for k in keys}
    best = min(total, key=total.get)
    u, w = (int(x) for x in best[1:].split("w"))
    print(name, "summed ms", {k: round(v, 3) for k, v in total.items()}, "->", (u, w))
    blocks[size] = (u, w)
src = re.sub(r"^SCORE_BLOCKS = \{.*\}$", f"SCORE_BLOCKS = {blocks}", src, flags=re.M)
open(path, "w").write(src)
print("SCORE_BLOCKS =", blocks)
PY
fi
FP8="--daemon-env KVRECALL_UNIT_REPS_DTYPE=fp8"
S128="--parts step --contexts 131072 --batches 8 --rates 0,0.117 --shared-prompt"
S32="--parts step --contexts 32768 --batches 8 --rates 0,0.117"
TABLE="--parts step --contexts 32768,131072 --batches 1,8 --rates 0,0.117 --shared-prompt"
for run in ${RUNS:-b16-1 fp8-1 b16-2 fp8-2 b16-32k fp8-32k}; do
  [ "$SECONDS" -lt "${BUDGET_S:-420}" ] || { echo "skipped $run (budget)"; continue; }
  case $run in
    b16-32k) e2e_run "$run" 100 $S32 ;;
    fp8-32k) e2e_run "$run" 100 $S32 $FP8 ;;
    table-b16) e2e_run "$run" 150 $TABLE ;;
    table-fp8) e2e_run "$run" 150 $TABLE $FP8 ;;
    b16-*) e2e_run "$run" 150 $S128 ;;
    fp8-*) e2e_run "$run" 150 $S128 $FP8 ;;
  esac
done
[ "${PACK_TRITON:-0}" = 1 ] && pack_triton_cache
e2e_pack_boundaries
