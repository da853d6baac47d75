#!/usr/bin/env bash
# Does the daemon's retrieval work time-slice with the worker's steps? The same `bench e2e` run
# as the processes share a GPU by default (time-slicing between CUDA contexts) and under CUDA
# MPS (kernels of both processes may run at once). On a two-GPU machine both run at once, GPU 0
# time-sliced and GPU 1 under an MPS server started for GPU 1 only; on one GPU one after the
# other. MPS runs as a user-space daemon with its pipe and log directories under /tmp and is
# stopped at the end; no setting of the card changes. Carry .whl/eval and .triton-cache.
# Writes under $OUT: nomps-e2e.json, mps-e2e.json (and their PNGs), logs.tgz; with SAVE_CACHE=1
# triton-cache.tgz (unpack into .triton-cache to carry next time).
# AFTER: a command run on GPU 0 after its bench (two-GPU machines). MPS_ARGS: bench arguments of
# the MPS run only (e.g. --daemon-env CUDA_MPS_ACTIVE_THREAD_PERCENTAGE=20).
#   usage: [E2E_ARGS="..."] [MPS=0] [RUN_S=420] [AFTER="..."] bash scripts/gpu_mps.sh
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/kvrecall-gpu-out}; mkdir -p "$OUT"
export TRITON_CACHE_DIR=$PWD/.triton-cache; . scripts/gpu_env.sh
ARGS=${E2E_ARGS:-"--parts step --contexts 32768 --batches 8 --policies louiskv --rates 0,0.117 --steps 32 --warmup 12 --host-pool-gib 40"}
GPUS=$(nvidia-smi -L | wc -l)
{ date -u; nvidia-smi --query-gpu=index,name,driver_version,memory.total --format=csv; free -g | head -2; } > "$OUT/env.txt" 2>&1
SECONDS=0
bench() {  # name gpu [extra bench args]
  CUDA_VISIBLE_DEVICES=$2 timeout ${RUN_S:-420} python3 -m kvrecall.cli bench e2e $ARGS ${3:-} --out "$OUT/$1-e2e.json" > "$OUT/$1.log" 2>&1
  echo "$1 on GPU $2: exit $? [${SECONDS}s]"; grep -v "^  policy" "$OUT/$1.log" | tail -22
}
mps_on() {  # gpu: the server and its clients name it by UUID (an index would mean another
  # device to NVML, which sees every GPU, than to the MPS server's clients, which see one)
  export CUDA_MPS_PIPE_DIRECTORY=/tmp/kvrecall-mps/pipe CUDA_MPS_LOG_DIRECTORY=/tmp/kvrecall-mps/log
  mkdir -p "$CUDA_MPS_PIPE_DIRECTORY" "$CUDA_MPS_LOG_DIRECTORY"
  MPS_GPU=$(nvidia-smi --query-gpu=uuid --format=csv,noheader -i "$1")
  CUDA_VISIBLE_DEVICES=$MPS_GPU nvidia-cuda-mps-control -d && echo "MPS started for GPU $1 ($MPS_GPU) [${SECONDS}s]"
}
mps_off() {
  echo quit | nvidia-cuda-mps-control
  cp "$CUDA_MPS_LOG_DIRECTORY/control.log" "$OUT/mps-control.log" 2>/dev/null
}
if [ "${MPS:-1}" != 1 ]; then
  bench nomps 0
elif [ "$GPUS" -ge 2 ]; then
  (bench nomps 0; [ -n "${AFTER:-}" ] && CUDA_VISIBLE_DEVICES=0 bash -c "$AFTER") > "$OUT/nomps-summary.txt" 2>&1 &
  ( mps_on 1 && bench mps "$MPS_GPU" "${MPS_ARGS:-}"; mps_off ) > "$OUT/mps-summary.txt" 2>&1
  wait; cat "$OUT/nomps-summary.txt" "$OUT/mps-summary.txt"
else
  bench nomps 0
  mps_on 0 && bench mps "$MPS_GPU" "${MPS_ARGS:-}"
  mps_off
fi
[ "${SAVE_CACHE:-0}" = 1 ] && tar czf "$OUT/triton-cache.tgz" -C "$TRITON_CACHE_DIR" .
(cd "$OUT" && tar czf logs.tgz --remove-files $(ls *.log *.txt 2>/dev/null))
echo "done [${SECONDS}s]"
