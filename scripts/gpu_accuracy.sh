#!/usr/bin/env bash
# The full accuracy suite (`kvrecall eval --suite full`) on one GPU, the model and its daemon on
# CUDA (working sets shared by CUDA IPC), WORKERS model processes sharing the GPU.
#
# The model file (93.8 MiB) is larger than one device call carries (64 MiB with the working tree), so
# it comes in three calls on the same warm machine (it stays warm ~30 s after a call). Here, once:
#   bash scripts/fetch_gpu_wheels.sh
# Device calls 1 and 2 (carry .whl/model1, then .whl/model2), seconds each:  bash scripts/gpu_accuracy.sh stage
# Device call 3 (carry .whl/model3 and .whl/eval):                           bash scripts/gpu_accuracy.sh
# Writes under $OUT: accuracy-<suite>-<date>.json/.md, -score/-fidelity/-depth.png, eval.log, env.txt
# (the JSON holds the date, device and command). Knobs: SUITE (full), WORKERS (8), BUDGET_S (330:
# no unit starts later; running ones give up 66 s after), EXTRA (more `kvrecall eval` flags).
# Several evals at once: RUNS="name:workers:flags;name:workers:flags" (each its own daemon, output
# in $OUT/name.tgz; SUITE, BUDGET_S and EXTRA apply to all). TESTS / KERNEL_TESTS: GPU test files
# run first (scripts/gpu_tests.sh; logs in $OUT/tests.tgz).
set -uo pipefail
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
OUT=${OUT:-/tmp/kvrecall-gpu-out}; mkdir -p "$OUT"
REPO=$PWD
. scripts/gpu_model.sh  # STASH, SITE, stage_model, assemble_model
if [ "${1:-}" = stage ]; then
  stage_model; exit 0
fi
assemble_model || exit 2
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/eval/*.whl || exit 2
export PYTHONPATH=$SITE:$REPO
{
  date -u; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  python3 -c "import torch,transformers,grpc,matplotlib;print('torch',torch.__version__,'transformers',transformers.__version__,'grpc',grpc.__version__,'matplotlib',matplotlib.__version__)"
  nproc
} 2>&1 | tee "$OUT/env.txt"
if [ -n "${TESTS:-}${KERNEL_TESTS:-}" ]; then
  FILE_S=${FILE_S:-120} KERNEL_TESTS=${KERNEL_TESTS:-} bash scripts/gpu_tests.sh ${TESTS:-} | tee "$OUT/tests.txt"
  tar czf "$OUT/tests.tgz" -C "$OUT" tests && rm -rf "$OUT/tests"
fi
if [ -n "${RUNS:-}" ]; then
  SECONDS=0
  IFS=';' read -ra runs <<< "$RUNS"
  for run in "${runs[@]}"; do
    IFS=':' read -r name workers flags <<< "$run"
    mkdir -p "$OUT/$name"
    # shellcheck disable=SC2086  # flags are words
    timeout 560 python3 -m kvrecall.cli eval --suite "${SUITE:-full}" --device cuda --workers "$workers" \
      --time-budget-s "${BUDGET_S:-330}" --json --out "$OUT/$name" ${EXTRA:-} $flags 2> "$OUT/$name/eval.log" \
      > "$OUT/$name/summary.txt" &
  done
  wait
  for run in "${runs[@]}"; do
    name=${run%%:*}
    echo "== $name after ${SECONDS}s: $(tail -c 600 "$OUT/$name/summary.txt")"
    tar czf "$OUT/$name.tgz" -C "$OUT" "$name" && rm -rf "${OUT:?}/$name"
  done
  exit 0
fi
SECONDS=0
timeout 560 python3 -m kvrecall.cli eval --suite "${SUITE:-full}" --device cuda --workers "${WORKERS:-8}" \
  --time-budget-s "${BUDGET_S:-330}" --json --out "$OUT" ${EXTRA:-} 2> "$OUT/eval.log"
rc=$?
echo "kvrecall eval exited $rc after ${SECONDS}s"; tail -c 3000 "$OUT/eval.log" | tr '\r' '\n' | tail -15
exit $rc
