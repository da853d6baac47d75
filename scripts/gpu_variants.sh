#!/usr/bin/env bash
# `kvrecall bench e2e` once per daemon variant, on two GPUs of one machine (nvidia-h200-x2), plus
# the GPU tests named in TESTS / KERNEL_TESTS and the in-process notices bench on the last GPU.
# A variant is NAME or NAME:KEY=VALUE,KEY=VALUE (the daemon's KVRECALL_* environment); GPU 0
# runs the STEP0 variants, the last GPU the STEP1 variants after its tests (E2E_ARGS: the e2e
# flags of both, E2E_ARGS0 / E2E_ARGS1: of one GPU's). Carry .whl/eval and
# .triton-cache (SAVE_CACHE=1 returns a new one). Writes $OUT/e2e-NAME.json per variant (with
# PROFILE=1 also the daemon's profile-NAME.json: KVRECALL_PROFILE_OUT), notices.json
# (NOTICES_ARGS), logs.tgz with the logs and plots (and triton-cache.tgz): a device call returns
# at most 8 files.
#   usage: STEP0="new old:KVRECALL_SWITCH_INTERVAL_MS=5" STEP1="inline:KVRECALL_NOTICE_OPS=inline" \
#          E2E_ARGS="--contexts 32768 --batches 1,8" bash scripts/gpu_variants.sh
set -uo pipefail
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
OUT=${OUT:-/tmp/kvrecall-gpu-out}; mkdir -p "$OUT"
SITE=/tmp/kvrecall-site; mkdir -p "$SITE"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" $(ls .whl/eval/*.whl | grep -v gguf) || exit 2
export PYTHONPATH=$SITE:$PWD
export TRITON_CACHE_DIR=$PWD/.triton-cache; mkdir -p "$TRITON_CACHE_DIR"; STARTED=$(date +%s)
{
  date -u; nvidia-smi --query-gpu=index,name,driver_version,memory.total --format=csv; nproc; free -g | head -2
  python3 -c "import torch,triton,grpc;print('torch',torch.__version__,'triton',triton.__version__,'grpc',grpc.__version__)"
} > "$OUT/env.txt" 2>&1
SECONDS=0
LAST=$(( $(nvidia-smi -L | wc -l) - 1 ))
# The e2e of each variant in $1 on GPU $2, one after another, none started after DEADLINE_S.
variants() {
  for variant in $1; do
    [ "$SECONDS" -lt "${DEADLINE_S:-420}" ] || { echo "skipped $variant (deadline)"; continue; }
    name=${variant%%:*}; envs=; [ "$variant" != "$name" ] && envs=${variant#*:}
    flags=(); for kv in ${envs//,/ }; do flags+=(--daemon-env "$kv"); done
    [ "${PROFILE:-0}" = 1 ] && flags+=(--daemon-env "KVRECALL_PROFILE_OUT=$OUT/profile-$name.json")
    echo "== e2e $name on GPU $2 [${SECONDS}s] ${flags[*]:-}"
    CUDA_VISIBLE_DEVICES=$2 timeout ${E2E_S:-300} python3 -m kvrecall.cli bench e2e --parts ${PARTS:-step} --policies louiskv \
      --lag 4 --steps ${STEPS:-96} --warmup 16 --rates 0,0.117 ${E2E_ARGS:-} $3 "${flags[@]}" --out "$OUT/e2e-$name.json" \
      > "$OUT/e2e-$name.log" 2>&1
    echo "e2e $name exit $? [${SECONDS}s]"; grep -E "^(step|many|capped) |^speedup|^over_bound" "$OUT/e2e-$name.log" | tail -12
  done
}
variants "${STEP0:-}" 0 "${E2E_ARGS0:-}" > "$OUT/gpu0.txt" 2>&1 &
gpu0=$!
if [ -n "${TESTS:-}${KERNEL_TESTS:-}" ]; then
  echo "== tests on GPU $LAST [${SECONDS}s]"
  CUDA_VISIBLE_DEVICES=$LAST FILE_S=${FILE_S:-200} KERNEL_TESTS=${KERNEL_TESTS:-} bash scripts/gpu_tests.sh ${TESTS:-}
fi
if [ "${NOTICES:-1}" = 1 ]; then
  echo "== notices bench on GPU $LAST [${SECONDS}s]"
  CUDA_VISIBLE_DEVICES=$LAST timeout 200 python3 -m kvrecall.bench.notices --device cuda:0 ${NOTICES_ARGS:---sessions 1,8,64} \
    --out "$OUT/notices.json" > "$OUT/notices.log" 2>&1; echo "notices exit $?"; tail -7 "$OUT/notices.log"
fi
variants "${STEP1:-}" "$LAST" "${E2E_ARGS1:-}"
wait $gpu0; cat "$OUT/gpu0.txt"
python3 scripts/triton_compiles.py "$TRITON_CACHE_DIR" "$STARTED" > "$OUT/triton-compiles.txt" 2>&1
[ "${SAVE_CACHE:-0}" = 1 ] && tar czf "$OUT/triton-cache.tgz" -C "$TRITON_CACHE_DIR" . && ls -la "$OUT/triton-cache.tgz"
(cd "$OUT" && tar czf logs.tgz --remove-files $(ls -d *.log *.txt *.png tests 2>/dev/null))
echo "done [${SECONDS}s]"
