#!/usr/bin/env bash
# Issue #17, deferred eviction (AppendNotices the step does not wait for), in one device call on one
# GPU (nvidia-h200; carry .whl/eval), one part after another (e2e rows alone on the machine):
#   1. `kvrecall bench e2e` step rows at 32K, batch 1 and 8, rates 0 and 0.117, --notices deferred
#   2. the same rows with --notices waited (the behaviour before), same machine, same weights seed
#   3. the GPU tests named in TESTS and the kernel tests in KERNEL_TESTS, natively
# MORE (optional): a command run last (e.g. a 128K e2e), its output under $OUT.
# Writes under $OUT: e2e-deferred.json/.png, e2e-waited.json/.png, logs.tgz.
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/kvrecall-gpu-out}; mkdir -p "$OUT/logs"
. scripts/gpu_env.sh
{ date -u; nvidia-smi --query-gpu=index,name,driver_version --format=csv; nproc; } > "$OUT/logs/env.txt" 2>&1
E2E="python3 -m kvrecall.cli bench e2e --parts step --policies louiskv --lag 4 --steps 96 --warmup 16 --contexts 32768 --host-cap-gib 40"
SECONDS=0
for mode in ${MODES:-deferred waited}; do
  timeout "${STEP_S:-200}" $E2E --batches 1,8 --rates 0,0.117 --notices "$mode" --out "$OUT/e2e-$mode.json" \
    > "$OUT/logs/e2e-$mode.log" 2>&1
  echo "e2e $mode exit $? after ${SECONDS}s"
done
FILE_S=${FILE_S:-150} KERNEL_TESTS=${KERNEL_TESTS:-} bash scripts/gpu_tests.sh ${TESTS:-tests/gpu/test_engine_gpu.py}
echo "tests done after ${SECONDS}s"
if [ -n "${MORE:-}" ]; then bash -c "$MORE" > "$OUT/logs/more.log" 2>&1; echo "more exit $? after ${SECONDS}s"; fi
mv "$OUT/tests" "$OUT/logs/" 2>/dev/null
tar czf "$OUT/logs.tgz" -C "$OUT" logs && rm -rf "$OUT/logs"
python3 - "$OUT" <<'PY'
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
for p in sorted(out.glob("e2e-*.json")):
    d = json.loads(p.read_text())
    print(p.name, d["meta"].get("ratios"))
    for r in d["rows"]:
        print(" ", r["policy"], r["context"], r["batch"], r.get("rate"), "mean", r["mean_ms"], "p90", r["p90_ms"],
              "graph_gpu", r.get("graph_gpu_ms_mean"), "wait", r.get("wait_ms_mean"), "late", r.get("late_steps"),
              "host", r.get("host_ms_mean"), "shadow", r.get("shadow_ms_mean"), "answer", r.get("answer_ms_median"),
              r.get("answer_ms_p90"), "ret q/s/s", r.get("retrieval_queued_ms_mean"), r.get("retrieval_serve_ms_mean"),
              r.get("retrieval_sync_ms_mean"), "notice_answer", r.get("notice_answer_ms_mean"))
PY
