#!/usr/bin/env bash
# Device run: the daemon-sustain part of `kvrecall bench e2e` (64 sequences x 4K, Llama-3-8B shape, 11.7%
# boundaries, drift 0.15, lag 4), arms alternating in one call. An arm is NAME[:KEY=VALUE,...]: NAME is
# embedded or process (the daemon), KEY=VALUE the daemon's settings (KVRECALL_*), or STACK=BYTES (louiskv's
# STACK_MAX_BYTES, embedded only: the bench runs in this process) or WORKER_CPUS=LIST (bench --worker-cpus; with
# KVRECALL_CPUS=LIST the daemon's), e.g. embedded:KVRECALL_CPUS=8-15,WORKER_CPUS=0-7. JSONs under $OUT (many-I-NAME.json).
#   usage (device, carry .whl/eval [.whl/triton]): ARMS="embedded process ..." [STEPS=96] [PACK_TRITON=1] bash scripts/gpu_many.sh
. scripts/gpu_env.sh
mkdir -p "$OUT/logs"; SECONDS=0
BASE="--device cuda --policies louiskv --parts many --many ${MANY_SEQ:-64} --many-context 4096 --rates 0.117 --lag 4 --host-cap-gib 40 --host-pool-gib 40 --query-drift 0.15 --steps ${STEPS:-96} --warmup 16"
i=0
for arm in ${ARMS:-embedded process}; do
  i=$((i + 1)); name=${arm%%:*}; settings=; [ "$arm" != "$name" ] && settings=${arm#*:}
  extra=(--daemon "$name"); stack=
  for kv in ${settings//,/ }; do
    case $kv in STACK=*) stack=${kv#STACK=} ;; WORKER_CPUS=*) extra+=(--worker-cpus "${kv#WORKER_CPUS=}") ;;
      *) extra+=(--daemon-env "$kv") ;; esac
  done
  tag=$(echo "$arm" | tr ':,=' '---')
  timeout ${RUN_S:-150} python3 - $BASE "${extra[@]}" --out "$OUT/many-$i-$tag.json" > "$OUT/logs/many-$i-$tag.log" 2>&1 <<PY
import sys
from kvrecall.server.policies import louiskv
if "$stack": louiskv.STACK_MAX_BYTES = int("$stack")
from kvrecall.bench import e2e
sys.exit(e2e.main(sys.argv[1:]))
PY
  echo "arm $i $arm exit $? after ${SECONDS}s"; grep -E "^many  " "$OUT/logs/many-$i-$tag.log"
  [ -n "$stack" ] && python3 - "$OUT/many-$i-$tag.json" "$stack" <<'PY'
import json, sys
d = json.load(open(sys.argv[1]))
notes = d.get("notes") or []
d["notes"] = (notes if isinstance(notes, list) else [notes]) + [f"louiskv.STACK_MAX_BYTES = {sys.argv[2]} (gpu_many.sh STACK=)"]
json.dump(d, open(sys.argv[1], "w"), indent=1)
PY
done
[ "${PACK_TRITON:-0}" = 1 ] && pack_triton_cache  # the compiled kernels for the next call (carry .whl/triton)
