#!/usr/bin/env bash
# Issue #17 in one device call on nvidia-h200-x2 (carry .whl/eval): how much GPU time a retrieval's
# kernels take from the worker beside it (two processes time-slice: scripts/gpu_timeslice_probe.py).
#   GPU 0: `kvrecall bench e2e` step rows at 32K, batch 1 and 8, rates 0 and 0.117 (the ratios)
#   GPU 1: the kernel and GPU tests named in KERNEL_TESTS / TESTS, `kvrecall.bench.daemon_rt --ops`
#          at 32K (each retrieval kernel's GPU time), then the 32K x 8 row again at 0.117 with the
#          daemon's kernel profile (KVRECALL_KERNEL_PROFILE_OUT: its busy ms per second)
# On one GPU (nvidia-h200) the same parts run one after another on GPU 0, nothing beside the e2e rows
# (two e2e runs at once on the x2 machine disturbed each other's host work: 13.3 against 11.6 ms).
# RT_OPS=0 skips the daemon_rt part.
# Writes under $OUT: e2e-32k.json/.png, rt-ops-32k.json, e2e-profiled.json, kernels.json, logs.tgz.
set -uo pipefail
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
OUT=${OUT:-/tmp/kvrecall-gpu-out}; mkdir -p "$OUT/logs"
. scripts/gpu_env.sh
{ date -u; nvidia-smi --query-gpu=index,name,driver_version --format=csv; nproc; } > "$OUT/logs/env.txt" 2>&1
E2E="python3 -m kvrecall.cli bench e2e --parts step --policies louiskv --lag 4 --steps 96 --warmup 16 --contexts 32768 --host-cap-gib 40"
SECONDS=0
GPUS=$(nvidia-smi -L | wc -l)
if [ "$GPUS" -eq 1 ]; then
  CUDA_VISIBLE_DEVICES=0 timeout "${STEP_S:-300}" $E2E --batches 1,8 --rates 0,0.117 --out "$OUT/e2e-32k.json" \
    > "$OUT/logs/e2e.log" 2>&1; echo "e2e exit $? after ${SECONDS}s"
  FILE_S=150 KERNEL_TESTS=${KERNEL_TESTS:-} bash scripts/gpu_tests.sh ${TESTS:-}
  timeout 200 $E2E --batches 8 --rates 0.117 --out "$OUT/e2e-profiled.json" \
    --daemon-env "KVRECALL_KERNEL_PROFILE_OUT=$OUT/kernels.json" > "$OUT/logs/e2e-profiled.log" 2>&1
  echo "profiled e2e exit $? after ${SECONDS}s"
else
(CUDA_VISIBLE_DEVICES=0 timeout "${STEP_S:-470}" $E2E --batches 1,8 --rates 0,0.117 --out "$OUT/e2e-32k.json" \
  > "$OUT/logs/e2e.log" 2>&1; echo "e2e exit $? after ${SECONDS}s") &
(
  export CUDA_VISIBLE_DEVICES=1
  FILE_S=150 KERNEL_TESTS=${KERNEL_TESTS:-} bash scripts/gpu_tests.sh ${TESTS:-}
  echo "tests done after ${SECONDS}s"
  [ "${RT_OPS:-1}" = 1 ] && timeout 150 python3 -m kvrecall.bench.daemon_rt --out "$OUT/rt-ops-32k.json" --device cuda:0 --prompt 32768 \
    --steps 100 --ops > "$OUT/logs/rt-ops.log" 2>&1; echo "rt-ops exit $? after ${SECONDS}s"
  timeout $(( ${STEP_S:-470} - SECONDS )) $E2E --batches 8 --rates 0.117 --out "$OUT/e2e-profiled.json" \
    --daemon-env "KVRECALL_KERNEL_PROFILE_OUT=$OUT/kernels.json" > "$OUT/logs/e2e-profiled.log" 2>&1
  echo "profiled e2e exit $? after ${SECONDS}s"
) &
wait
fi
mv "$OUT/tests" "$OUT/logs/" 2>/dev/null
tar czf "$OUT/logs.tgz" -C "$OUT" logs && rm -rf "$OUT/logs"
python3 - "$OUT" <<'PY'
import json, sys, pathlib
out = pathlib.Path(sys.argv[1])
for name in ("e2e-32k.json", "e2e-profiled.json"):
    p = out / name
    if p.exists():
        for r in json.loads(p.read_text())["rows"]:
            print(name, r["policy"], r["context"], r["batch"], r.get("rate"), "mean", r["mean_ms"],
                  "graph_gpu", r.get("graph_gpu_ms_mean"), "wait", r.get("wait_ms_mean"), "host", r.get("host_ms_mean"))
p = out / "rt-ops-32k.json"
if p.exists():
    for op, v in json.loads(p.read_text()).get("ops_per_operation", {}).items():
        print(op, v.get("gpu_kernel_us"), [(k["name"][:30], k["n"], k["us"]) for k in v.get("top_gpu_kernels", [])[:6]])
p = out / "kernels.json"
if p.exists():
    k = json.loads(p.read_text())
    print("daemon kernels: busy", k.get("busy_ms"), "of", k.get("wall_s"), "s; per s:", k.get("busy_ms_per_s"))
    for row in k.get("kernels", [])[:14]:
        print("  ", row)
PY
