#!/usr/bin/env bash
# Device run: scripts/serve_step_profile.py at 64 sequences x 4K (Llama-3-8B shape, embedded daemon,
# 11.7% boundaries): op counts (COUNT_OPS=1: a short run) and the
# daemon's Boundaries calls timed by function (a longer one).
#   usage (device, carry .whl/eval [.whl/triton]): bash scripts/gpu_serve_profile.sh   [PACK_TRITON=1]
. scripts/gpu_env.sh
mkdir -p "$OUT/logs"; SECONDS=0
ARGS="--device cuda --policies louiskv --parts many --many ${MANY:-64} --many-context 4096 --rates 0.117 --lag 4 --host-cap-gib 40 --host-pool-gib 40 --query-drift 0.15 ${PROFILE_EXTRA:-}"
if [ "${COUNT_OPS:-0}" = 1 ]; then
  timeout ${COUNT_S:-200} python3 scripts/serve_step_profile.py --count-ops --profile-out "$OUT/profile-ops.json" -- \
    $ARGS --steps 24 --warmup 8 --out "$OUT/e2e-ops.json" > "$OUT/logs/ops.log" 2>&1
  echo "ops run exit $? after ${SECONDS}s"
fi
timeout ${PROFILE_S:-200} python3 scripts/serve_step_profile.py --profile-out "$OUT/profile-time.json" -- \
  $ARGS --steps 64 --warmup 8 --out "$OUT/e2e-time.json" > "$OUT/logs/time.log" 2>&1
echo "time run exit $? after ${SECONDS}s"
[ "${PACK_TRITON:-0}" = 1 ] && pack_triton_cache
[ -f "$OUT/logs/ops.log" ] && grep -A4 "^== " "$OUT/logs/ops.log"
grep -E "^(many|part|  policy)" "$OUT/logs/time.log" | cut -c1-400; grep -A40 "^== " "$OUT/logs/time.log" | head -100
