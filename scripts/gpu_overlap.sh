#!/usr/bin/env bash
# Engine overlap (each step launched before the host work of the one before) against the step as
# before, on one GPU (nvidia-h200; carry .whl/eval), one bench after another (each alone on the machine).
#   PART=1: an untimed warm-up bench, then 32K x 8 at rates 0 / 0.117, overlap off then on, then the
#           GPU engine tests (captured step equals eager and full attention, with overlap too)
#   PART=2: 64 sequences at 4K, rate 0.117, overlap on then off; capped 16 GiB at 32K with overlap on
#   PART=3: README's table with overlap on: 32K and 128K, batch 1 and 8 (128K x 8 needs a 256 GiB host)
# Writes under $OUT: e2e-*.json (+ .png), logs.tgz.
#   usage: PART=1 bash scripts/gpu_overlap.sh
set -uo pipefail
OUT=${OUT:-/tmp/kvrecall-gpu-out}; mkdir -p "$OUT/logs"
. scripts/gpu_env.sh
{ date -u; nvidia-smi --query-gpu=index,name,driver_version --format=csv; nproc; free -g | head -2; } > "$OUT/logs/env.txt" 2>&1
E2E="python3 -m kvrecall.cli bench e2e --policies louiskv --lag 4 --steps 96 --warmup 16 --host-cap-gib 40 --host-pool-gib 40"
SECONDS=0
run() {  # name, seconds, arguments
  local name=$1 limit=$2; shift 2
  timeout "$limit" $E2E "$@" --out "$OUT/e2e-$name.json" > "$OUT/logs/e2e-$name.log" 2>&1
  echo "e2e $name exit $? after ${SECONDS}s"
}
if [ "${PART:-1}" = 1 ]; then
  timeout 150 $E2E --parts step --contexts 32768 --batches 8 --rates 0.117 --steps 16 --warmup 8 \
    --out /tmp/e2e-warm.json > "$OUT/logs/e2e-warm.log" 2>&1
  echo "warm-up bench exit $? after ${SECONDS}s"
  run 32k8-off 170 --parts step --contexts 32768 --batches 8 --rates 0,0.117 --overlap off
  run 32k8-on 170 --parts step --contexts 32768 --batches 8 --rates 0,0.117 --overlap on
  FILE_S=${FILE_S:-100} bash scripts/gpu_tests.sh tests/gpu/test_engine_gpu.py
elif [ "$PART" = 2 ]; then
  run many-on 170 --parts many --many 64 --many-context 4096 --rates 0,0.117 --overlap on
  run many-off 150 --parts many --many 64 --many-context 4096 --rates 0.117 --overlap off
  E2E=${E2E/--host-cap-gib 40 --host-pool-gib 40/--host-cap-gib 90 --host-pool-gib 90}
  run capped-on 250 --parts capped --contexts 32768 --rates 0.117 --overlap on
else
  run table-on 570 --parts step --contexts 32768,131072 --batches 1,8 --rates 0,0.117 --overlap on
fi
echo "done after ${SECONDS}s"
mv "$OUT/tests" "$OUT/logs/" 2>/dev/null
tar czf "$OUT/logs.tgz" -C "$OUT" logs && rm -rf "$OUT/logs"
python3 - "$OUT" <<'PY'
import json, pathlib, sys
for p in sorted(pathlib.Path(sys.argv[1]).glob("e2e-*.json")):
    d = json.loads(p.read_text())
    print(p.name, d["meta"].get("ratios"), d.get("errors"))
    for r in d["rows"]:
        print(" ", r["policy"], r["context"], r["batch"], r.get("rate"), "mean", r["mean_ms"], "p90", r["p90_ms"],
              "tok/s", r.get("tokens_per_s"), "sync", r.get("sync_ms_mean"), "gpu", r.get("graph_gpu_ms_mean"),
              "host", r.get("host_ms_mean"), "wait", r.get("wait_ms_mean"), "late", r.get("late_steps"),
              "answer", r.get("answer_ms_median"), r.get("answer_ms_p90"))
PY
