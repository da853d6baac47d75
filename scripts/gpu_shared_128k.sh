#!/usr/bin/env bash
# Device run: 128K x 8 (#17's last unmeasured target: >= 2.5x full's tokens/s) on a 128 GiB host, the eight
# sequences over one shared 128K document (bench e2e --shared-prompt: the host tier holds it once, 16 GiB, where
# eight copies need 128 GiB). Each arm (DAEMONS: process, embedded) is one bench: full (its KV buffers shared
# by layers where 128 GiB does not fit: kv_layers_shared) and louiskv at 0% and 11.7%, drift 0.15, lag 4.
#   usage (device, carry .whl/eval [.whl/triton]): [DAEMONS="process embedded"] [PACK_TRITON=1] bash scripts/gpu_shared_128k.sh
. scripts/gpu_env.sh
mkdir -p "$OUT/tests"  # first the engine over a shared document on CUDA (gpu test), then the benches
timeout 200 python3 -m pytest -v --tb=short -p no:cacheprovider -m gpu tests/gpu/test_shared_prompt_gpu.py > "$OUT/tests/shared-prompt-gpu.log" 2>&1
echo "shared-prompt gpu test exit $?"; tail -2 "$OUT/tests/shared-prompt-gpu.log"
for daemon in ${DAEMONS:-process embedded}; do
  E2E_EXTRA="--daemon $daemon --query-drift 0.15"
  . scripts/gpu_e2e_lib.sh
  e2e_run "shared-128k8-$daemon" ${RUN_S:-280} --parts step --contexts 131072 --batches 8 --rates 0,0.117 --shared-prompt
done
[ "${PACK_TRITON:-0}" = 1 ] && pack_triton_cache  # the compiled kernels for the next call (carry .whl/triton)
e2e_finish
