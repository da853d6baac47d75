#!/usr/bin/env bash
# Does the daemon's retrieval work time-slice with the worker's steps? `bench e2e` at 32K x 8
# (louiskv, lag 3) twice on one GPU: as the processes share it by default (time-slicing between
# CUDA contexts), then under CUDA MPS (kernels of both processes may run at once). MPS runs as a
# user-space daemon with its pipe and log directories under /tmp and is stopped at the end; no
# setting of the card changes. Carry .whl/eval and .triton-cache. Writes under $OUT:
# nomps-e2e.json, mps-e2e.json, logs.tgz. MPS=0: the time-sliced run only.
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/kvrecall-gpu-out}; mkdir -p "$OUT"
SITE=/tmp/kvrecall-site; mkdir -p "$SITE"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
  $(ls .whl/eval/*.whl | grep -v gguf) || exit 2
export PYTHONPATH=$SITE:$PWD TRITON_CACHE_DIR=$PWD/.triton-cache
ARGS="--parts step --contexts ${CONTEXT:-32768} --batches ${BATCH:-8} --policies louiskv --rates 0,0.117 --lag 3
  --steps 32 --warmup 12 --host-pool-gib 40"
SECONDS=0
timeout ${RUN_S:-220} python3 -m kvrecall.cli bench e2e $ARGS --out "$OUT/nomps-e2e.json" > "$OUT/nomps.log" 2>&1
echo "time-sliced: exit $? [${SECONDS}s]"; tail -6 "$OUT/nomps.log"
[ "${MPS:-1}" = 1 ] || { (cd "$OUT" && tar czf logs.tgz --remove-files $(ls *.log)); exit 0; }
export CUDA_MPS_PIPE_DIRECTORY=/tmp/kvrecall-mps/pipe CUDA_MPS_LOG_DIRECTORY=/tmp/kvrecall-mps/log
mkdir -p "$CUDA_MPS_PIPE_DIRECTORY" "$CUDA_MPS_LOG_DIRECTORY"
if nvidia-cuda-mps-control -d; then
  echo "MPS started [${SECONDS}s]"
  timeout ${RUN_S:-220} python3 -m kvrecall.cli bench e2e $ARGS --out "$OUT/mps-e2e.json" > "$OUT/mps.log" 2>&1
  echo "MPS: exit $? [${SECONDS}s]"; tail -6 "$OUT/mps.log"
  echo quit | nvidia-cuda-mps-control
  cp "$CUDA_MPS_LOG_DIRECTORY/control.log" "$OUT/mps-control.log" 2>/dev/null
else
  echo "nvidia-cuda-mps-control could not start"
fi
(cd "$OUT" && tar czf logs.tgz --remove-files $(ls *.log 2>/dev/null))
