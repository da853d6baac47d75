#!/usr/bin/env bash
# Tensor parallelism on 2 GPUs of one host (nvidia-h200-x2 / nvidia-h100-x2), one device call:
# a daemon per GPU, the TP=2 correctness check (NCCL) and per-rank decode step time of a
# Llama-3-8B-shaped bf16 model at 32K context with louiskv, TP=2 against the same on one GPU.
# Usage on the GPU machine (carry .whl): bash scripts/gpu_tp.sh   (writes under $OUT; ~3-5 min)
# Knobs: TP_CONTEXT (32768), TP_LAYERS (32), TP_STEPS (128), TP_BUDGET_S (300); a CPU smoke run of
# the script itself: TP_DEVICE=cpu TP_SHAPE=tiny TP_CONTEXT=256 TP_LAYERS=4 TP_HOST_POOL_GB=0.5.
set -uo pipefail
# NVLink multicast stays off (it can take the host's shared GPUs out of service).
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
OUT=${OUT:-/tmp/kvrecall-gpu-out}; mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD
fi
{
  date -u; nvidia-smi --query-gpu=index,name,driver_version,memory.total,pci.bus_id --format=csv
  nvidia-smi topo -m
  python3 -c "import torch,triton,grpc,transformers;print('torch',torch.__version__,'nccl',torch.cuda.nccl.version(),'triton',triton.__version__,'grpc',grpc.__version__,'transformers',transformers.__version__,'gpus',torch.cuda.device_count())"
} 2>&1 | tee "$OUT/env.txt"
work=$(mktemp -d /tmp/kvrecall-tp.XXXXXX)
echo "== tensor-parallel bench (work dir $work)"
timeout $(( ${TP_BUDGET_S:-300} + 45 )) python3 -m kvrecall.tp.bench --out "$work" --world 2 \
  --device "${TP_DEVICE:-cuda}" --shape "${TP_SHAPE:-llama3-8b}" --host-pool-gb "${TP_HOST_POOL_GB:-8}" \
  --context "${TP_CONTEXT:-32768}" --layers "${TP_LAYERS:-32}" --steps "${TP_STEPS:-128}" \
  --time-budget-s "${TP_BUDGET_S:-300}" 2>&1 | tee "$OUT/tp_bench.log"
status=${PIPESTATUS[0]}
# $OUT takes at most 8 files: the summary JSON (every rank's results inside) and the logs packed.
cp "$work/tp_bench.json" "$OUT/" 2>/dev/null || echo "no tp_bench.json (status $status)"
tar -czf "$OUT/tp_logs.tar.gz" -C "$work" logs 2>/dev/null
exit "$status"
