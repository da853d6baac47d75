#!/usr/bin/env bash
# One device call: GPU tests, the daemon round-trip bench and the decode benchmark.
# Usage on the GPU machine (carry .whl): bash scripts/gpu_run.sh   (writes under $OUT)
set -uo pipefail
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
OUT=${OUT:-/tmp/kvrecall-gpu-out}; mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
{
  date -u; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  python3 -c "import torch,triton,grpc,google.protobuf as p;print('torch',torch.__version__,'triton',triton.__version__,'grpc',grpc.__version__,'protobuf',p.__version__)"
  python3 -c "import cupy;print('cupy',cupy.__version__)"
} 2>&1 | tee "$OUT/env.txt"
echo "== GPU tests"; timeout 200 python3 -m pytest -q -p no:cacheprovider tests/gpu tests/kernels -x 2>&1 | tee "$OUT/gpu_tests.log" | tail -25
echo "== daemon round trips"; timeout 150 python3 -m kvrecall.bench.daemon_rt --out "$OUT/daemon_rt.json" --prompt 8192 --steps 240 2>&1 | tail -8
echo "== decode bench"; timeout 330 python3 -m kvrecall.bench --out "$OUT/results.json" --time-budget-s 270 --measured-rate ${RATE:-0.1} 2>&1 | tee "$OUT/bench.log" | tail -60
