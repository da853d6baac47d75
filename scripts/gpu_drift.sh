#!/usr/bin/env bash
# The bench's retrievals at the real model's overlap (issue #17), on one GPU (nvidia-h200; carry .whl/eval):
# random weights make every retrieval choose a fresh set (moved_share 0.96 at 32K x 8); the bundled real
# model's retrievals move about 0.2 of a budget (scripts/lag_fidelity.py moved_share). A warm-up bench, then
# 32K x 8 at 0% / 11.7% boundaries for each --query-drift in DRIFTS (default 1 0.3 0.15 0.08: find the one whose
# moved_share matches the real model's), then 64 sequences at 4K and README's table at DRIFT (default 0.15).
# Writes under $OUT: e2e-*.json, logs.tgz, triton-cache.tgz (at most 8 files come back: no plots). Copy the
# cache to .whl/triton/triton-cache.tgz and carry .whl/triton in later calls: a fresh machine then skips the
# kernels' compile (the daemon's start took 100-150 s cold against ~10 s warm).
#   usage: [DRIFTS="1 0.3 0.15 0.08"] [DRIFT=0.15] bash scripts/gpu_drift.sh
set -uo pipefail
OUT=${OUT:-/tmp/kvrecall-gpu-out}; mkdir -p "$OUT"
. scripts/gpu_env.sh
. scripts/gpu_e2e_lib.sh
e2e_warmup 300
pack_triton_cache
for drift in ${DRIFTS:-1 0.3 0.15 0.08}; do
  e2e_run "drift-32k8-$drift" 90 --parts step --contexts 32768 --batches 8 --rates 0,0.117 --query-drift "$drift"
done
e2e_run "drift-many-${DRIFT:-0.15}" 120 --parts many --many 64 --many-context 4096 --rates 0,0.117 \
  --query-drift "${DRIFT:-0.15}"
e2e_run "drift-table-${DRIFT:-0.15}" 150 --parts step --contexts 32768,131072 --batches 1,8 --rates 0,0.117 \
  --query-drift "${DRIFT:-0.15}"
rm -f "$OUT"/*.png
e2e_finish
python3 - "$OUT" <<'PY'
import json, pathlib, sys
for p in sorted(pathlib.Path(sys.argv[1]).glob("e2e-drift-*.json")):
    for r in json.loads(p.read_text())["rows"]:
        if r.get("moved_share") is not None:
            print(p.name, r["context"], r["batch"], "drift", r["query_drift"], "moved_share", r["moved_share"],
                  "mean", r["mean_ms"], "answer p50", r["answer_ms_median"])
PY
