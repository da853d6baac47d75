#!/usr/bin/env bash
# Every GPU measurement of a session in three back-to-back device calls on one warm
# nvidia-h200-x2 machine (it goes back ~30 s after a call; the model file is 94 MiB and one call
# carries 64 MiB with the working tree, so it travels in three parts, one per call, each stashed on
# the machine: scripts/gpu_model.sh; a stage that runs the model needs all three staged by then,
# e.g. `bash scripts/gpu_accuracy.sh stage` carrying .whl/model2 between stages a and v/b/c).
#
#   stage a (carry .whl/model1 and the grpcio-health-checking / -reflection wheels in .whl/): GPU tests (tests/gpu, tests/kernels, tests/tp);
#            then, in parallel, the daemon round trip (GPU 0) and ceilings + gather + clustering
#            (GPU 1)
#   stage t (carry as stage a): the GPU tests, then the TP=2 check and bench (scripts/gpu_tp.sh)
#            instead of the single-GPU benches
#   stage r (carry the two grpc wheels in .whl/; any one-GPU kind): the boundary round trip
#            broken down, --session-ops thread vs inline, and the bare gRPC floor
#   stage s (carry as stage a): stash the model part carried, run only $GPU_TESTS (tests/tp)
#   stage v (carry .whl/eval .whl/model3): louiskv variants ($VARIANTS) on the full suite, one
#            eval per variant, side by side over the GPUs
#   stage b (carry .whl/eval .whl/model3): the TP=2 bench (both GPUs); then, in parallel, the
#            louiskv boundary sweep on the real model (GPU 0) and the decode + concurrency bench
#            (GPU 1); picks louiskv's boundary rule from the sweep (rule in docs/TUNING.md)
#   stage c (carry .whl/eval, and .whl/model3 when stage b did not run): the accuracy suite
#            (kvrecall eval --suite full) with that rule (none: the defaults), workers dealt over
#            every GPU (one daemon per GPU)
# Each stage writes at most 8 files under $OUT (the device tool's limit): JSON results and a
# tarball of the logs.
set -uo pipefail
stage=${1:?usage: gpu_session.sh a|t|b|c|s|v|r}
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
OUT=${OUT:-/tmp/kvrecall-gpu-out}; mkdir -p "$OUT"
REPO=$PWD SITE=/tmp/kvrecall-site STASH=/tmp/kvrecall-model LOGS=/tmp/kvrecall-logs/$stage
GGUF=SmolLM2-135M-Instruct.Q4_1.gguf
mkdir -p "$LOGS" "$SITE"
# stage a carries the two small grpc wheels at .whl/ (next to the 56 MiB model half); b and c
# carry .whl/eval (those two, gguf, transformers, regex)
wheels=.whl/eval; case $stage in a|t|s|r) wheels=.whl ;; esac
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$wheels"/*.whl || exit 2
export PYTHONPATH=$SITE:$REPO
pack() { tar -czf "$OUT/logs-$stage.tar.gz" -C "$LOGS" . ; ls -l "$OUT"; }
trap pack EXIT
SECONDS=0
# The model's parts (one per call, stashed on this machine) join in assemble_model.
. scripts/gpu_model.sh

case $stage in
a|t)
  stage_model
  {
    date -u; nvidia-smi --query-gpu=index,name,driver_version,memory.total --format=csv; nproc
    python3 -c "import torch,triton,grpc,google.protobuf as p;print('torch',torch.__version__,'triton',triton.__version__,'grpc',grpc.__version__,'protobuf',p.__version__)"
    python3 -c "import cupy;print('cupy',cupy.__version__)"
  } 2>&1 | tee "$OUT/env.txt"
  echo "== GPU tests"
  timeout 250 python3 -m pytest -q -p no:cacheprovider tests/gpu tests/kernels tests/tp 2>&1 | tee "$LOGS/gpu_tests.log" | tail -30
  if [ "$stage" = t ]; then
    # stage t: the TP=2 correctness check and per-rank step time instead of the single-GPU benches
    echo "== TP=2 check + bench (both GPUs)  [${SECONDS}s]"
    OUT=$LOGS/tp TP_BUDGET_S=${TP_BUDGET_S:-150} TP_STEPS=${TP_STEPS:-64} bash scripts/gpu_tp.sh 2>&1 | tail -40
    cp "$LOGS/tp/tp_bench.json" "$OUT/" 2>/dev/null
    exit 0
  fi
  echo "== daemon round trips (GPU 0) || ceilings, gather, clustering (GPU 1)  [${SECONDS}s]"
  CUDA_VISIBLE_DEVICES=0 timeout 170 python3 -m kvrecall.bench.daemon_rt --out "$OUT/daemon_rt.json" \
    --prompt 8192 --steps 240 --ops > "$LOGS/daemon_rt.log" 2>&1 &
  CUDA_VISIBLE_DEVICES=1 timeout 200 python3 -m kvrecall.bench --parts ceilings,gather,clustering \
    --time-budget-s 170 --out "$OUT/gather_cluster.json" > "$LOGS/gather_cluster.log" 2>&1 &
  wait
  tail -25 "$LOGS/daemon_rt.log"; tail -60 "$LOGS/gather_cluster.log"
  ;;
b)
  assemble_model || exit 2
  echo "== TP=2 bench (both GPUs)"
  OUT=$LOGS/tp TP_BUDGET_S=${TP_BUDGET_S:-150} TP_STEPS=${TP_STEPS:-64} bash scripts/gpu_tp.sh 2>&1 | tail -40
  cp "$LOGS/tp/tp_bench.json" "$OUT/" 2>/dev/null
  echo "== louiskv sweep (GPU 0) || decode + concurrency bench (GPU 1)  [${SECONDS}s]"
  # four sweep shards share GPU 0 (the 135M model leaves it mostly idle: the steps are Python-bound)
  shard=0
  for sig in post pre; do for seg in 16 64; do
    refs=--no-references; [ $shard = 0 ] && refs=
    CUDA_VISIBLE_DEVICES=0 timeout 330 python3 scripts/louiskv_sweep.py --device cuda --prompts 2 --tokens 384 \
      --long-input 4096 --long-tokens 256 --budget 128 --signals $sig --thresholds 0.6,0.7,0.75,0.8,0.85 \
      --max-segments $seg $refs --out "$LOGS/sweep$shard.json" > "$LOGS/sweep$shard.log" 2>&1 &
    shard=$((shard + 1))
  done; done
  CUDA_VISIBLE_DEVICES=1 timeout 330 python3 -m kvrecall.bench --parts decode,concurrency --time-budget-s 270 \
    --measured-rate "${RATE:-0.1}" --out "$OUT/decode.json" > "$LOGS/decode.log" 2>&1 &
  wait
  tail -80 "$LOGS/decode.log"; tail -3 "$LOGS"/sweep*.log
  python3 - "$LOGS"/sweep?.json > "$OUT/louiskv_sweep.json" <<'PY'
import json, sys
parts = [json.load(open(p)) for p in sys.argv[1:]]
print(json.dumps({**parts[0], "shards": [p["command"] for p in parts], "rows": [r for p in parts for r in p["rows"]]}, indent=1))
PY
  python3 scripts/pick_boundary_rule.py "$OUT/louiskv_sweep.json" --out /tmp/kvrecall-rule.json
  ;;
c)
  assemble_model || { echo "model missing: run stage a first on this machine and carry .whl/model3"; exit 2; }
  rule=$(python3 -c "import json;print(json.dumps(json.load(open('/tmp/kvrecall-rule.json'))['config']))" 2>/dev/null || echo '{}')
  echo "louiskv rule from the sweep: $rule"
  timeout 560 python3 -m kvrecall.cli eval --suite "${SUITE:-full}" --device cuda --workers "${WORKERS:-8}" \
    --time-budget-s "${BUDGET_S:-330}" --policy-config "louiskv=$rule" --json --out "$OUT" 2> "$LOGS/eval.log"
  rc=$?
  echo "kvrecall eval exited $rc after ${SECONDS}s"; tail -c 3000 "$LOGS/eval.log" | tr '\r' '\n' | tail -15
  ;;
r)
  # the boundary round trip, broken down (--ops), with the daemon's session work in a worker
  # thread and then inline on its event loop, and the bare gRPC floor of this machine
  for mode in thread inline; do
    timeout 200 python3 -m kvrecall.bench.daemon_rt --prompt 8192 --steps 160 --ops --session-ops $mode \
      --out "$OUT/daemon_rt-$mode.json" > "$LOGS/daemon_rt-$mode.log" 2>&1
    grep -E "^(append|boundary)" "$LOGS/daemon_rt-$mode.log" | sed "s/^/$mode /"
  done
  python3 scripts/grpc_echo_floor.py plain; python3 scripts/grpc_echo_floor.py thread
  ;;
s)
  # stash the model part carried and run only the GPU tests named in $GPU_TESTS
  stage_model
  timeout 400 python3 -m pytest -q -p no:cacheprovider ${GPU_TESTS:-tests/tp} 2>&1 | tee "$LOGS/gpu_tests.log" | tail -30
  ;;
v)
  # louiskv variants side by side: the full suite with only louiskv (and full), one eval per
  # entry of $VARIANTS (JSON configs separated by ';'), dealt over the GPUs, $WORKERS each
  assemble_model || { echo "model missing: run stage a, t or s first"; exit 2; }
  IFS=';' read -ra variants <<< "${VARIANTS:?set VARIANTS='{...};{...}'}"
  gpus=$(nvidia-smi -L | wc -l); i=0
  for v in "${variants[@]}"; do
    CUDA_VISIBLE_DEVICES=$((i % gpus)) timeout 540 python3 -m kvrecall.cli eval --suite "${SUITE:-full}" \
      --policies full,louiskv --device cuda --workers "${WORKERS:-8}" --time-budget-s "${BUDGET_S:-380}" \
      --policy-config "louiskv=$v" --json --out "$LOGS/v$i" > "$LOGS/v$i.summary" 2> "$LOGS/v$i.log" &
    i=$((i + 1))
  done
  wait
  for j in $(seq 0 $((i - 1))); do
    cp "$LOGS/v$j"/accuracy-*.json "$OUT/variant$j.json" 2>/dev/null; tail -1 "$LOGS/v$j.summary" | cut -c1-1500
  done
  ;;
esac
echo "stage $stage done in ${SECONDS}s"
