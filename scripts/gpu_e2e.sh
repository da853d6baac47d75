#!/usr/bin/env bash
# The GPU tests, `kvrecall bench e2e` and the prefill bench in one device call on nvidia-h200-x2
# (2 GPUs, 256 GiB host memory: the 128K x 8 host tier alone is 128 GiB). Carry .whl/eval
# (scripts/fetch_gpu_wheels.sh: the grpc wheels the GPU image lacks and the transformers version
# tested on CPU), and .triton-cache when an earlier run left one (TRITON_CACHE_DIR: the daemon's
# kernel warm-up then loads instead of compiling, minutes less per fresh machine).
# Writes under $OUT (a device call returns 8 files): e2e-step.json/.png (GPU 0: contexts x
# batches), prefill.json and e2e-load.json (capped GPU KV throughput and 64 sequences) from the
# last GPU while GPU 0 runs the step bench, logs.tgz (env.txt, the test and bench logs, the
# kernels Triton compiled) and, with SAVE_CACHE=1, triton-cache.tgz to carry next time.
# Time limits per part: FILE_S (per test file), STEP_S, PREFILL_S, LOAD_S; TESTS: the test files
# (scripts/gpu_tests.sh), KERNEL_TESTS: kernel test files run natively.
#   usage: [PARTS=tests,step,load,prefill] bash scripts/gpu_e2e.sh [step-contexts] [batches]
set -uo pipefail
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
OUT=${OUT:-/tmp/kvrecall-gpu-out}; mkdir -p "$OUT"
CONTEXTS=${1:-32768,131072} BATCHES=${2:-1,8}
SITE=/tmp/kvrecall-site; mkdir -p "$SITE"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" $(ls .whl/eval/*.whl 2>/dev/null | grep -v gguf || ls .whl/grpc/*.whl) || exit 2
export PYTHONPATH=$SITE:$PWD
export TRITON_CACHE_DIR=$PWD/.triton-cache; mkdir -p "$TRITON_CACHE_DIR"; STARTED=$(date +%s)
echo "triton cache: $(find "$TRITON_CACHE_DIR" -name '*.json' ! -name '__grp__*' | wc -l) kernels carried"
{
  date -u; nvidia-smi --query-gpu=index,name,driver_version,memory.total --format=csv; nproc; free -g | head -2
  python3 -c "import torch,triton,grpc,cupy,transformers;print('torch',torch.__version__,'triton',triton.__version__,'grpc',grpc.__version__,'cupy',cupy.__version__,'transformers',transformers.__version__)"
} 2>&1 | tee "$OUT/env.txt"
SECONDS=0
PARTS=${PARTS:-tests,step,load}
has() { case ,$PARTS, in *,$1,*) return 0 ;; esac; return 1; }
# The VM's memory grows as it is touched (about 3 s per 8 GiB): pinning a large host tier at once
# gets the daemon OOM-killed, so the step bench touches GROW_GIB first, 8 GiB at a time (the
# last GPU's parts do not wait for it).
grow() {
  [ "${GROW_GIB:-0}" -gt 0 ] || return 0
  python3 - "$GROW_GIB" <<'PY'
import sys, time, torch
chunks = []
for _ in range(int(sys.argv[1]) // 8):
    chunks.append(torch.ones(8 << 30, dtype=torch.uint8))
    time.sleep(0.5)
PY
  free -g | head -2; echo "grown [${SECONDS}s]"
}
# GPU 0: the decode step bench. The last GPU (1 on a two-GPU machine, else 0 after the step
# bench): the GPU tests, the prefill bench, then the load parts.
LAST=$(( $(nvidia-smi -L | wc -l) - 1 ))
step=
if has step; then
  echo "== bench e2e step on GPU 0  [${SECONDS}s]"
  (grow; CUDA_VISIBLE_DEVICES=0 timeout ${STEP_S:-380} python3 -m kvrecall.cli bench e2e --parts step --contexts "$CONTEXTS" \
    --batches "$BATCHES" ${STEP_ARGS:-} --out "$OUT/e2e-step.json") > "$OUT/e2e-step.log" 2>&1 &
  step=$!
  [ "$LAST" -eq 0 ] && { wait $step; echo "step bench exit $?"; step=; }
fi
run_tests() {
  echo "== GPU tests on GPU $LAST  [${SECONDS}s]"
  CUDA_VISIBLE_DEVICES=$LAST KERNEL_TESTS=${KERNEL_TESTS:-} bash scripts/gpu_tests.sh ${TESTS:-}
}
run_prefill() {
  echo "== prefill bench on GPU $LAST  [${SECONDS}s]"
  CUDA_VISIBLE_DEVICES=$LAST timeout ${PREFILL_S:-400} python3 -m kvrecall.bench.prefill --device cuda \
    --contexts "${PREFILL_CONTEXTS:-32768,131072}" --chunk ${PREFILL_CHUNK:-8192} ${PREFILL_ARGS:-} --out "$OUT/prefill.json" \
    > "$OUT/prefill.log" 2>&1
  echo "prefill bench exit $?"; tail -5 "$OUT/prefill.log"
}
run_load() {
  echo "== bench e2e capped,many on GPU $LAST  [${SECONDS}s]"
  CUDA_VISIBLE_DEVICES=$LAST timeout ${LOAD_S:-380} python3 -m kvrecall.cli bench e2e --parts capped,many \
    ${LOAD_ARGS:---host-cap-gib 90} --many 64 --many-context 4096 --out "$OUT/e2e-load.json" > "$OUT/e2e-load.log" 2>&1
  echo "load bench exit $?"; tail -12 "$OUT/e2e-load.log"
}
# The last GPU's parts, in ORDER (default tests, prefill, load), those of PARTS only.
for part in ${ORDER:-tests prefill load}; do has "$part" && "run_$part"; done
[ -n "$step" ] && { wait $step; echo "step bench exit $?"; }
has step && tail -30 "$OUT/e2e-step.log"
python3 scripts/triton_compiles.py "$TRITON_CACHE_DIR" "$STARTED" > "$OUT/triton-compiles.txt" 2>&1
tail -1 "$OUT/triton-compiles.txt"
[ "${SAVE_CACHE:-0}" = 1 ] && tar czf "$OUT/triton-cache.tgz" -C "$TRITON_CACHE_DIR" . && ls -la "$OUT/triton-cache.tgz"
(cd "$OUT" && tar czf logs.tgz --remove-files $(ls -d *.log *.txt tests 2>/dev/null))
echo "done [${SECONDS}s]"
