#!/usr/bin/env bash
# The GPU tests, `kvrecall bench e2e` and the prefill bench in one device call on nvidia-h200-x2
# (2 GPUs, 256 GiB host memory: the 128K x 8 host tier alone is 128 GiB). Carry .whl/eval
# (scripts/fetch_gpu_wheels.sh: the grpc wheels the GPU image lacks and the transformers version
# tested on CPU). Writes under $OUT: env.txt, tests.log, e2e-step.json/.png (GPU 0: contexts x
# batches), e2e-load.json (GPU 1: capped GPU KV throughput and 64 sequences), prefill.json
# (GPU 0, after the step bench), bench logs.
#   usage: [PARTS=tests,step,load,prefill] bash scripts/gpu_e2e.sh [step-contexts] [batches]
set -uo pipefail
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
OUT=${OUT:-/tmp/kvrecall-gpu-out}; mkdir -p "$OUT"
CONTEXTS=${1:-32768,131072} BATCHES=${2:-1,8}
SITE=/tmp/kvrecall-site; mkdir -p "$SITE"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" $(ls .whl/eval/*.whl 2>/dev/null | grep -v gguf || ls .whl/grpc/*.whl) || exit 2
export PYTHONPATH=$SITE:$PWD
{
  date -u; nvidia-smi --query-gpu=index,name,driver_version,memory.total --format=csv; nproc; free -g | head -2
  python3 -c "import torch,triton,grpc,cupy,transformers;print('torch',torch.__version__,'triton',triton.__version__,'grpc',grpc.__version__,'cupy',cupy.__version__,'transformers',transformers.__version__)"
} 2>&1 | tee "$OUT/env.txt"
SECONDS=0
PARTS=${PARTS:-tests,step,load}
case ,$PARTS, in *,tests,*)
echo "== GPU tests (engine, ws_decode kernels)"
timeout ${TEST_S:-300} python3 -m pytest -q -rA -p no:cacheprovider --continue-on-collection-errors -m gpu ${TESTS:-tests} 2>&1 | tee "$OUT/tests.log" | tail -15 ;;
esac
echo "== bench e2e  [${SECONDS}s]"
# The VM's memory grows as it is touched (about 3 s per 8 GiB): pinning a large host tier at once
# gets the daemon OOM-killed, so touch GROW_GIB first, 8 GiB at a time.
if [ "${GROW_GIB:-0}" -gt 0 ]; then
  python3 - "$GROW_GIB" <<'PY'
import sys, time, torch
chunks = []
for _ in range(int(sys.argv[1]) // 8):
    chunks.append(torch.ones(8 << 30, dtype=torch.uint8))
    time.sleep(0.5)
PY
  free -g | head -2; echo "grown [${SECONDS}s]"
fi
step=; load=
case ,$PARTS, in *,step,*)
CUDA_VISIBLE_DEVICES=0 timeout ${STEP_S:-380} python3 -m kvrecall.cli bench e2e --parts step --contexts "$CONTEXTS" \
  --batches "$BATCHES" ${STEP_ARGS:-} --out "$OUT/e2e-step.json" > "$OUT/e2e-step.log" 2>&1 &
step=$! ;;
esac
case ,$PARTS, in *,load,*)
CUDA_VISIBLE_DEVICES=1 timeout ${LOAD_S:-380} python3 -m kvrecall.cli bench e2e --parts capped,many ${LOAD_ARGS:---host-cap-gib 48} \
  --many 64 --many-context 4096 --out "$OUT/e2e-load.json" > "$OUT/e2e-load.log" 2>&1 &
load=$! ;;
esac
[ -n "$step" ] && { wait $step; echo "step bench exit $?"; tail -30 "$OUT/e2e-step.log"; }
[ -n "$load" ] && { wait $load; echo "load bench exit $?"; tail -12 "$OUT/e2e-load.log"; }
case ,$PARTS, in *,prefill,*)
echo "== prefill bench  [${SECONDS}s]"
CUDA_VISIBLE_DEVICES=0 timeout ${PREFILL_S:-400} python3 -m kvrecall.bench.prefill --device cuda \
  --contexts "${PREFILL_CONTEXTS:-32768,131072}" --chunk ${PREFILL_CHUNK:-8192} ${PREFILL_ARGS:-} --out "$OUT/prefill.json" \
  > "$OUT/prefill.log" 2>&1
echo "prefill bench exit $?"; tail -12 "$OUT/prefill.log" ;;
esac
echo "done [${SECONDS}s]"
