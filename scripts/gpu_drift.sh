#!/usr/bin/env bash
# The bench's retrievals at the real model's overlap (issue #17), on one GPU (nvidia-h200; carry .whl/eval):
# random weights make every retrieval choose a fresh set (moved_share 0.96 at 32K x 8); the bundled real
# model's retrievals move about 0.2 of a budget (scripts/lag_fidelity.py moved_share). A warm-up bench, then
# 32K x 8 at 0% / 11.7% boundaries for each --query-drift in DRIFTS (default 1 0.3 0.15 0.08: find the one whose
# moved_share matches the real model's), then 64 sequences at 4K and README's table at DRIFT (default 0.15).
# Writes under $OUT: e2e-*.json, logs.tgz, triton-cache.tgz (at most 8 files come back: no plots). Copy the
# cache to .whl/triton/triton-cache.tgz and carry .whl/triton in later calls: a fresh machine then skips the
# kernels' compile (the daemon's start took 100-150 s cold against ~10 s warm).
# PART=2: at DRIFT (0.15 measured moved_share 0.21, the real model's 0.20): Engine overlap off against on at
# 32K x 8 and 64 sequences, README's table with overlap, then capped 16 GiB at 32K (90 GiB host pool).
# PART=3: with overlap the default (auto): the GPU engine and launch-gate tests; the daemon's launch gate
# on / off / on at 32K x 8; the time-slice probe with the worker never
# idle (--continuous, a gated mode); 32K x 8 with the worker's kernels per step
# (--worker-kernel-steps) and the daemon's (KVRECALL_KERNEL_PROFILE_OUT); capped; 64 sequences at lag 4 and 6;
# PART=4: the GPU tests of the launch gate, the engine and the staged plan kernel (natively), then the launch
# gate on / off alternating at 32K x 8 (x2) and 64 sequences, at DRIFT.
# PART=5: PART=4's tests, then the time-slice probe (--continuous, a gated mode), and the Triton cache.
# PART=6: 32K x 8 (twice) and 64 sequences under CUDA MPS, then 32K x 8 without it, at DRIFT.
# PART=7: the worker's kernels per step under MPS and without (MPS_TABLE=1: batch 1 under MPS too;
# SKIP_TESTS=1: without the staged placement's native tests first).
# PART=8: the captured selection's GPU test, then capture_selection on / off alternating at 32K x 8 (x2) and
# 64 sequences, at DRIFT (each daemon's log under logs/ has its capture counts); C32 / CMANY: the on / off
# order of each (default "1 0 1 0" / "1 0"), SKIP_TESTS=1: no GPU test first.
# PART=9: the retrieval kernels that read less (expand_grouped, the placement plan without sorts) against the
# code before them (carry .whl/old: `git archive d6bc193 kvrecall | tar -x -C .whl/old`): their native kernel
# tests, the kernels' probes (scripts/expand_probe.py, scripts/place_kernel_probe.py), then new / old
# alternating at 32K x 8 and 64 sequences at DRIFT, in the order of RUNS (default "new32 old32 new32 old32
# newmany oldmany"; the first two 32K runs with the daemon's kernel profile). Old runs start from .whl/old
# (python -m finds the package in the working directory first). NO_WARMUP=1: no warm-up bench (the first run
# gets the compile's time instead); BUDGET_S: skip a run that could end past that many seconds.
# PART=10: README's figures with the code as it is, in one call (no warm-up: the first bench takes the compile):
# README's table (32K and 128K, batch 1 and 8; render it with `python -m kvrecall.bench.readme FILE`), 64
# sequences at 4K, the 16 GiB GPU cap at 32K (90 GiB host tier), 32K x 8 once more; BUDGET_S as in PART=9.
# PART=11: settings A/B: ARMS (space-separated arms, each a comma-separated list of the daemon's KEY=VALUE
# environment and bench flags written --flag=value, e.g. --switch=patient; default
# "KVRECALL_COALESCE_RETRIEVALS=1 KVRECALL_COALESCE_RETRIEVALS=0") alternating at 32K x 8
# for ROUNDS rounds (default 2), then each at 64 sequences; each daemon's phases in logs/phases-<run>.json, the arms
# in logs/arms.txt; NO_WARMUP and BUDGET_S as in PART=9; MANY: the arms (indexes, in order) run at 64 sequences
# (default all; MANY=" " none); CAPPED: the arms run at the 16 GiB GPU cap (32K, 90 GiB host tier) last (default
# none); the JSONs come back in e2e-json.tgz; PACK_TRITON=1: the Triton cache too. E.g. ARMS="KVRECALL_COALESCE_RETRIEVALS=0
# KVRECALL_COALESCE_RETRIEVALS=1 KVRECALL_GATE_LAUNCHES=1,KVRECALL_COALESCE_RETRIEVALS=1".
# PART=12: the next lever's evidence (DEVELOPERS.md): scripts/host_selection_probe.py on this host's cores, then PART=11
# with ARMS "--switch=fixed KVRECALL_DRY_INDEX_COPIES=1 KVRECALL_DRY_RETRIEVALS=1" and no 64-sequence runs (both overridable).
# PART=13: worker copies (the daemon's worker_copy_share, placement_staged.py): their GPU test and the placement's
# native kernel tests named by PLACEMENT_TESTS (a pytest -k expression; default none; SKIP_TESTS=1: no tests), then PART=11 with ARMS "--switch=fixed KVRECALL_WORKER_COPY_SHARE=1
# KVRECALL_WORKER_COPY_SHARE=1,KVRECALL_GATE_LAUNCHES=1 KVRECALL_DRY_RETRIEVALS=1 KVRECALL_WORKER_COPY_SHARE=0.25"
# (share 1: one burst and the light shadow; with the launch gate the one burst is one gated launch; dry: the
# floor on the same machine; 0.25: the burst without the light shadow) and no 64-sequence runs (both
# overridable; e.g. MANY="0 1"). BUDGET_S counts the tests too; ROUNDS=1 needs ~540 s with them (SKIP_TESTS=1 on a
# second call).
# PART=14: host selection (the daemon's host_selection, server/host_selection.py): its GPU test and
# scripts/host_selection_probe.py at 32K (SKIP_TESTS=1: neither), then PART=11 with ARMS "--switch=fixed
# KVRECALL_WORKER_COPY_SHARE=1,KVRECALL_HOST_SELECTION=1 KVRECALL_DRY_RETRIEVALS=1" and MANY "0 1" (both
# overridable); BUDGET_S counts the tests too.
# PART=15: the daemon embedded in the worker's process (server/embedded.py, bench e2e --daemon embedded):
# its GPU tests and the CUDA IPC ones (SKIP_TESTS=1: none), then PART=11 with ARMS "--switch=fixed
# --daemon=embedded" and MANY "1 0" (both overridable).
# PART=16: 32K x 1, a daemon process against an embedded one (B1_ARMS).
#   usage: [PART=1..16] [DRIFTS="1 0.3 0.15 0.08"] [DRIFT=0.15] bash scripts/gpu_drift.sh
set -uo pipefail
OUT=${OUT:-/tmp/kvrecall-gpu-out}; mkdir -p "$OUT"
. scripts/gpu_env.sh
. scripts/gpu_e2e_lib.sh
D=${DRIFT:-0.15}
gpu_test() {  # log name, seconds, pytest arguments: the run's log under $OUT/tests, its last line echoed
  local name=$1 limit=$2; shift 2
  mkdir -p "$OUT/tests"
  timeout "$limit" python3 -m pytest --tb=short -p no:cacheprovider "$@" > "$OUT/tests/$name.log" 2>&1
  echo "$name: exit $?: $(tail -1 "$OUT/tests/$name.log")"
}
fits() {  # seconds [name]: whether a run of that limit can end by BUDGET_S (else says so)
  [ $((SECONDS + $1)) -le "${BUDGET_S:-100000}" ] || { echo "skip ${2:-}: ${SECONDS}s + $1s > BUDGET_S"; return 1; }
}
mps_start() {  # a CUDA MPS control daemon for the processes started after it (this call only)
  command -v nvidia-cuda-mps-control || { echo "no nvidia-cuda-mps-control on this machine"; exit 3; }
  export CUDA_MPS_PIPE_DIRECTORY=/tmp/mps-pipe CUDA_MPS_LOG_DIRECTORY=$OUT/logs/mps
  mkdir -p "$CUDA_MPS_PIPE_DIRECTORY" "$CUDA_MPS_LOG_DIRECTORY"
  nvidia-cuda-mps-control -d && echo "MPS control daemon started"
}
mps_stop() {
  echo quit | nvidia-cuda-mps-control; sleep 2; echo "MPS stopped: $(pgrep -c nvidia-cuda-mps || true) processes left"
  unset CUDA_MPS_PIPE_DIRECTORY CUDA_MPS_LOG_DIRECTORY
}
capped_run() {  # name, seconds, arguments: e2e_run at the 16 GiB GPU cap's 90 GiB host tier (E2E's is 40 GiB)
  local small=$E2E
  E2E=${E2E/--host-cap-gib 40 --host-pool-gib 40/--host-cap-gib 90 --host-pool-gib 90}
  e2e_run "$@"
  E2E=$small
}
print_worker_kernels() {  # glob under $OUT, kernels per row: the rows' worker_kernels (bench e2e --worker-kernel-steps)
  python3 - "$OUT" "$1" "$2" <<'PY'
import json, pathlib, sys
for p in sorted(pathlib.Path(sys.argv[1]).glob(sys.argv[2])):
    for r in json.loads(p.read_text())["rows"]:
        k = r.get("worker_kernels")
        if k:
            print(p.name, "rate", r["rate"], "gpu", r.get("graph_gpu_ms_mean"), "kernel ms/step", k["kernel_ms_per_step"])
            for row in k["kernels"][: int(sys.argv[3])]:
                print("   ", row)
            for row in k["copies"]:
                print("   copy", row)
PY
}
if [ "${PART:-1}" = 16 ]; then  # batch 1 at 32K: a daemon process against an embedded one, alternating
  for arm in ${B1_ARMS:-process embedded process embedded}; do
    e2e_run "b1-$arm-$SECONDS" 150 --parts step --contexts 32768 --batches 1 --rates 0,0.117 --query-drift "$D" --daemon "$arm"
  done
  e2e_finish
  exit 0
fi
if [ "${PART:-1}" = 15 ]; then  # the embedded daemon: its GPU tests, then the A/B against a daemon process
  if [ -z "${SKIP_TESTS:-}" ]; then
    PYTHONFAULTHANDLER=1 gpu_test embedded 150 -q --basetemp="$OUT/logs/pytest" tests/gpu/test_embedded_gpu.py \
      tests/gpu/test_ipc_events.py  # (the daemons' logs come back under logs/pytest)
  fi
  [ -n "${BUDGET_S:-}" ] && BUDGET_S=$((BUDGET_S - SECONDS))
  BUDGET_S=${BUDGET_S:-} PART=11 MANY=${MANY:-1 0} ARMS=${ARMS:---switch=fixed --daemon=embedded} exec bash "$0"
fi
if [ "${PART:-1}" = 14 ]; then  # host selection: its GPU test and the host probe, then the A/B
  if [ -z "${SKIP_TESTS:-}" ]; then
    gpu_test host-selection 200 tests/gpu/test_host_selection_gpu.py -q
    timeout 90 python3 scripts/host_selection_probe.py --contexts 32768 --out "$OUT/logs/host-selection-probe.json" \
      > "$OUT/logs/host-selection-probe.log" 2>&1; echo "host selection probe exit $?"; tail -4 "$OUT/logs/host-selection-probe.log"
  fi
  [ -n "${BUDGET_S:-}" ] && BUDGET_S=$((BUDGET_S - SECONDS))
  BUDGET_S=${BUDGET_S:-} PART=11 MANY=${MANY:-0 1} ARMS=${ARMS:---switch=fixed KVRECALL_WORKER_COPY_SHARE=1,KVRECALL_HOST_SELECTION=1 KVRECALL_DRY_RETRIEVALS=1} \
    exec bash "$0"
fi
if [ "${PART:-1}" = 13 ]; then  # worker copies: their tests, then the A/B against the daemon's own copies
  if [ -z "${SKIP_TESTS:-}" ]; then
    gpu_test worker-copies 200 tests/gpu/test_worker_copies_gpu.py -q
    [ -n "${PLACEMENT_TESTS:-}" ] && gpu_test placement 150 tests/kernels/test_placement.py -q -k "$PLACEMENT_TESTS"
  fi
  [ -n "${BUDGET_S:-}" ] && BUDGET_S=$((BUDGET_S - SECONDS))  # (the A/B's clock starts again at the exec)
  BUDGET_S=${BUDGET_S:-} PART=11 MANY=${MANY:- } ARMS=${ARMS:---switch=fixed KVRECALL_WORKER_COPY_SHARE=1 KVRECALL_WORKER_COPY_SHARE=1,KVRECALL_GATE_LAUNCHES=1 KVRECALL_DRY_RETRIEVALS=1 KVRECALL_WORKER_COPY_SHARE=0.25} \
    exec bash "$0"
fi
if [ "${PART:-1}" = 12 ]; then  # the next lever's evidence: host selection on this host, then the dry A/B
  python3 scripts/host_selection_probe.py --contexts 32768,131072 --out "$OUT/host-selection-probe.json" \
    > "$OUT/logs/host-selection-probe.log" 2>&1; echo "host selection probe exit $?"; cat "$OUT/logs/host-selection-probe.log"
  nproc; PART=11 MANY=${MANY:- } ARMS=${ARMS:---switch=fixed KVRECALL_DRY_INDEX_COPIES=1 KVRECALL_DRY_RETRIEVALS=1} \
    exec bash "$0"
fi
if [ "${PART:-1}" = 11 ]; then  # daemon settings A/B: each arm's daemon env, alternating, with its phases
  [ -z "${NO_WARMUP:-}" ] && e2e_warmup 240
  cold=${NO_WARMUP:+160}
  arms=(${ARMS:-KVRECALL_COALESCE_RETRIEVALS=1 KVRECALL_COALESCE_RETRIEVALS=0})
  runs=(); for r in $(seq "${ROUNDS:-2}"); do for a in "${!arms[@]}"; do runs+=("32k8:$a"); done; done
  for a in ${MANY:-${!arms[@]}}; do runs+=("many:$a"); done
  for a in ${CAPPED:-}; do runs+=("capped:$a"); done
  for spec in "${runs[@]}"; do
    part=${spec%%:*} a=${spec##*:}
    limit=$(( ${cold:-0} + 75 )); [ "$part" = many ] && limit=$((limit + 15)); [ "$part" = capped ] && limit=$((limit + 75))
    fits "$limit" "$spec" || continue
    cold=""; name="arm$a-$part-$D-$SECONDS"
    env=(--daemon-env "KVRECALL_PHASES_OUT=$OUT/logs/phases-$name.json")
    for kv in ${arms[$a]//,/ }; do case $kv in --*) env+=("$kv") ;; *) env+=(--daemon-env "$kv") ;; esac; done
    echo "$name: ${arms[$a]}" >> "$OUT/logs/arms.txt"
    if [ "$part" = 32k8 ]; then
      e2e_run "$name" "$limit" --parts step --contexts 32768 --batches 8 --rates 0,0.117 --query-drift "$D" "${env[@]}"
    elif [ "$part" = capped ]; then  # the 16 GiB GPU cap at 32K on a 90 GiB host tier (as PART=10)
      capped_run "$name" "$limit" --parts capped --contexts 32768 --rates 0.117 --query-drift "$D" "${env[@]}"
    else
      e2e_run "$name" "$limit" --parts many --many 64 --many-context 4096 --rates 0,0.117 --query-drift "$D" "${env[@]}"
    fi
  done
  rm -f "$OUT"/*.png
  [ -n "${PACK_TRITON:-}" ] && pack_triton_cache
  e2e_finish
  tar czf "$OUT/e2e-json.tgz" -C "$OUT" $(cd "$OUT" && ls e2e-*.json) && rm -f "$OUT"/e2e-*.json  # 8 files come back
  exit 0
fi
if [ "${PART:-1}" = 10 ]; then  # README's figures with the code as it is
  fits 250 && e2e_run "table-$D" 250 --parts step --contexts 32768,131072 --batches 1,8 --rates 0,0.117 --query-drift "$D"
  fits 90 && e2e_run "many-$D" 90 --parts many --many 64 --many-context 4096 --rates 0,0.117 --query-drift "$D"
  fits 150 && capped_run "capped-$D" 150 --parts capped --contexts 32768 --rates 0.117 --query-drift "$D"
  fits 75 && e2e_run "32k8-$D" 75 --parts step --contexts 32768 --batches 8 --rates 0,0.117 --query-drift "$D"
  find "$OUT" -maxdepth 1 -name '*.png' ! -name 'e2e-table-*' -delete  # at most 8 files come back
  e2e_finish
  exit 0
fi
if [ "${PART:-1}" = 9 ]; then  # the retrieval kernels that read less, against the code before them
  if [ -z "${SKIP_TESTS:-}" ]; then
    gpu_test kernels-expand-staged 120 -q -x tests/kernels/test_expand.py tests/kernels/test_staged_plan.py
    gpu_test kernels-placement 150 -q -x tests/kernels/test_placement.py
    gpu_test captured-selection-gpu 120 -q -m gpu tests/gpu/test_captured_selection_gpu.py
  fi
  mkdir -p "$OUT/logs/probes"
  timeout 60 python3 scripts/expand_probe.py --out "$OUT/logs/probes/expand-probe.json"; echo "expand probe exit $?"
  [ -f scripts/place_kernel_probe.py ] && { timeout 60 python3 scripts/place_kernel_probe.py --out "$OUT/logs/probes/place-new.json"
    echo "place probe (new) exit $?"
    PYTHONPATH=$SITE:$PWD/.whl/old timeout 60 python3 scripts/place_kernel_probe.py --out "$OUT/logs/probes/place-old.json"
    echo "place probe (old) exit $?"; }
  (cd .whl/old && python3 -c "import kvrecall.kernels as k; print('old runs import', k.__file__, hasattr(k, 'expand_grouped'))")
  [ -z "${NO_WARMUP:-}" ] && e2e_warmup 240
  cold=${NO_WARMUP:+1}; old_cold=${NO_WARMUP:+1}; n32=0
  for run in ${RUNS:-new32 old32 new32 old32 newmany oldmany}; do  # 32K x 8 and 64 sequences, real-model traffic
    limit=75; case $run in *many) limit=90 ;; esac
    [ -n "$cold" ] && limit=$((limit + 160))  # the first run's daemon compiles the kernels (no warm-up)
    case $run in old*) [ -n "$old_cold" ] && limit=$((limit + 120)) ;; esac  # the old kernels compile too
    fits "$limit" "$run" || continue
    cold=""; dir=.; case $run in old*) dir=.whl/old; old_cold="" ;; esac
    case $run in
      *32) n32=$((n32 + 1)); prof=(); [ "$n32" -le 2 ] && prof=(--daemon-env "KVRECALL_KERNEL_PROFILE_OUT=$OUT/logs/probes/daemon-kernels-$run.json")
        (cd "$dir" && e2e_run "$run-$D-$SECONDS" "$limit" --parts step --contexts 32768 --batches 8 --rates 0,0.117 \
          --query-drift "$D" "${prof[@]}") ;;
      *many) (cd "$dir" && e2e_run "$run-$D-$SECONDS" "$limit" --parts many --many 64 --many-context 4096 --rates 0,0.117 \
          --query-drift "$D") ;;
    esac
  done
  rm -f "$OUT"/*.png
  e2e_finish
  exit 0
fi
if [ "${PART:-1}" = 8 ]; then  # the captured selection (capture_selection): its GPU test, then on / off alternating
  [ -z "${SKIP_TESTS:-}" ] && gpu_test test_captured_selection_gpu 150 -v -m gpu tests/gpu/test_captured_selection_gpu.py
  e2e_warmup 240
  for c in ${C32:-1 0 1 0}; do  # 32K x 8 at the real model's traffic; the daemon's log keeps its capture counts
    e2e_run "capture$c-32k8-$D-$SECONDS" 70 --parts step --contexts 32768 --batches 8 --rates 0,0.117 --query-drift "$D" \
      --daemon-env "KVRECALL_CAPTURE_SELECTION=$c" --daemon-log "$OUT/logs/daemon-capture$c-$SECONDS.log"
  done
  for c in ${CMANY:-1 0}; do
    e2e_run "capture$c-many-$D-$SECONDS" 90 --parts many --many 64 --many-context 4096 --rates 0,0.117 --query-drift "$D" \
      --daemon-env "KVRECALL_CAPTURE_SELECTION=$c" --daemon-log "$OUT/logs/daemon-capture$c-many-$SECONDS.log"
  done
  grep -h "captured selections\|capturing a selection" "$OUT"/logs/daemon-*.log | sort | uniq -c | head -8
  rm -f "$OUT"/*.png
  e2e_finish
  exit 0
fi
if [ "${PART:-1}" = 7 ]; then  # why the step is slower under MPS: the worker's kernels per step with and without
  # natively first: the staged path's plan kernel on the GPU
  [ -z "${SKIP_TESTS:-}" ] && gpu_test test_placement_copy_engine 90 -q tests/kernels/test_placement.py -k copy_engine
  mps_start
  e2e_warmup 200
  e2e_run "mps-kernels-32k8-$D" 90 --parts step --contexts 32768 --batches 8 --rates 0,0.117 --query-drift "$D" \
    --worker-kernel-steps 24
  [ -n "${MPS_TABLE:-}" ] && e2e_run "mps-table-b1-$D" 150 --parts step --contexts 32768,131072 --batches 1 \
    --rates 0,0.117 --query-drift "$D"
  mps_stop
  e2e_run "nomps-kernels-32k8-$D" 90 --parts step --contexts 32768 --batches 8 --rates 0,0.117 --query-drift "$D" \
    --worker-kernel-steps 24
  rm -f "$OUT"/*.png
  e2e_finish
  print_worker_kernels "e2e-*kernels-*.json" 8
  exit 0
fi
if [ "${PART:-1}" = 6 ]; then  # the same runs under CUDA MPS (daemon and worker share the GPU without time slices)
  mps_start
  e2e_warmup 200
  echo get_server_list | nvidia-cuda-mps-control; echo "MPS servers above"
  for k in 1 2; do
    e2e_run "mps-32k8-$D-$k" 70 --parts step --contexts 32768 --batches 8 --rates 0,0.117 --query-drift "$D"
  done
  e2e_run "mps-many-$D" 90 --parts many --many 64 --many-context 4096 --rates 0,0.117 --query-drift "$D"
  mps_stop
  e2e_run "nomps-32k8-$D" 70 --parts step --contexts 32768 --batches 8 --rates 0,0.117 --query-drift "$D"
  rm -f "$OUT"/*.png
  e2e_finish
  exit 0
fi
if [ "${PART:-1}" = 5 ]; then  # PART=4's tests alone, then the time-slice probe with the worker never idle
  for t in test_launch_gate_gpu test_engine_gpu; do gpu_test $t 150 -v -m gpu tests/gpu/$t.py; done
  for t in test_staged_plan test_placement; do gpu_test $t 120 -q tests/kernels/$t.py; done  # natively: the plan kernel
  timeout 200 python3 scripts/gpu_timeslice_probe.py --continuous --modes idle,one,many,gappy,graph,tiny,gated \
    --n 70 --burst-us 470 --period-ms 10 --out "$OUT/timeslice-continuous.json" > "$OUT/logs/timeslice.log" 2>&1
  echo "timeslice probe exit $?"; tail -14 "$OUT/logs/timeslice.log"
  pack_triton_cache
  e2e_finish
  exit 0
fi
if [ "${PART:-1}" = 4 ]; then  # this session's unmeasured changes: their GPU tests, then the launch gate A/B
  gpu_test test_launch_gate_gpu 60 -v -m gpu tests/gpu/test_launch_gate_gpu.py
  # natively: the staged path with the plan kernel on the GPU (-k staged, run on 2026-12-02, matched no test)
  gpu_test test_placement_copy_engine 90 -q tests/kernels/test_placement.py -k copy_engine
  e2e_warmup 240
  for g in 1 0 1 0; do  # the daemon's launch gate on / off, alternating, 32K x 8 at the real model's traffic
    e2e_run "gate$g-32k8-$D-$SECONDS" 70 --parts step --contexts 32768 --batches 8 --rates 0,0.117 --query-drift "$D" \
      --daemon-env "KVRECALL_GATE_LAUNCHES=$g"
  done
  for g in 1 0; do
    e2e_run "gate$g-many-$D" 90 --parts many --many 64 --many-context 4096 --rates 0,0.117 --query-drift "$D" \
      --daemon-env "KVRECALL_GATE_LAUNCHES=$g"
  done
  grep -h "launch gate\|watchdog" "$OUT"/logs/*.log | sort | uniq -c | head -5
  rm -f "$OUT"/*.png
  e2e_finish
  exit 0
fi
if [ "${PART:-1}" = 3 ]; then
  e2e_warmup 240
  for t in test_launch_gate_gpu test_engine_gpu; do gpu_test $t 150 -v -m gpu tests/gpu/$t.py; done
  for g in 1 0 1; do  # the daemon's launch gate (gate_launches) on / off / on, 32K x 8
    e2e_run "gate$g-32k8-$D" 70 --parts step --contexts 32768 --batches 8 --rates 0,0.117 --query-drift "$D" \
      --daemon-env "KVRECALL_GATE_LAUNCHES=$g" --daemon-env "KVRECALL_PHASES_OUT=$OUT/logs/gate$g-phases.json"
    mv "$OUT/e2e-gate$g-32k8-$D.json" "$OUT/logs/e2e-gate$g-32k8-$D-$SECONDS.json" 2>/dev/null
  done
  grep -h "launch gate\|watchdog" "$OUT"/logs/*.log | sort | uniq -c | head -5
  python3 - "$OUT" <<'PY'
import json, pathlib, sys
for p in sorted(pathlib.Path(sys.argv[1], "logs").glob("e2e-gate*.json")):
    d = json.loads(p.read_text())
    for r in d["rows"]:
        print(p.name, r["policy"], r.get("rate"), "mean", r["mean_ms"], "gpu", r.get("graph_gpu_ms_mean"),
              "late", r.get("late_steps"), "answer", r.get("answer_ms_median"), d["meta"].get("ratios"))
PY
  timeout 300 python3 scripts/gpu_timeslice_probe.py --continuous --modes idle,one,many,gappy,graph,tiny,gated \
    --n 70 --burst-us 470 --period-ms 10 --out "$OUT/timeslice-continuous.json" > "$OUT/logs/timeslice.log" 2>&1
  echo "timeslice probe exit $?"; cat "$OUT/logs/timeslice.log" | tail -12
  e2e_run "kernels-32k8-$D" 90 --parts step --contexts 32768 --batches 8 --rates 0,0.117 --query-drift "$D" \
    --worker-kernel-steps 24 --daemon-env "KVRECALL_KERNEL_PROFILE_OUT=$OUT/kernels-32k8-$D-daemon-kernels.json"
  e2e_run "many-lag4-6-$D" 120 --parts many --many 64 --many-context 4096 --rates 0,0.117 --query-drift "$D" --lag 4,6
  E2E=${E2E/--host-cap-gib 40 --host-pool-gib 40/--host-cap-gib 90 --host-pool-gib 90}
  e2e_run "capped-$D-ovon" 150 --parts capped --contexts 32768 --rates 0.117 --query-drift "$D"
  rm -f "$OUT"/*.png
  e2e_finish
  print_worker_kernels "e2e-kernels-*.json" 12
  exit 0
fi
if [ "${PART:-1}" = 2 ]; then
  e2e_warmup 240
  for ov in off on; do
    e2e_run "drift-32k8-$D-ov$ov" 70 --parts step --contexts 32768 --batches 8 --rates 0,0.117 --query-drift "$D" --overlap $ov
  done
  for ov in off on; do
    e2e_run "drift-many-$D-ov$ov" 90 --parts many --many 64 --many-context 4096 --rates 0,0.117 --query-drift "$D" \
      --overlap $ov
  done
  e2e_run "drift-table-$D-ovon" 90 --parts step --contexts 32768,131072 --batches 1,8 --rates 0,0.117 \
    --query-drift "$D" --overlap on
  E2E=${E2E/--host-cap-gib 40 --host-pool-gib 40/--host-cap-gib 90 --host-pool-gib 90}
  e2e_run "drift-capped-$D" 150 --parts capped --contexts 32768 --rates 0.117 --query-drift "$D"
  rm -f "$OUT"/*.png
  e2e_finish
  exit 0
fi
e2e_warmup 300
pack_triton_cache
for drift in ${DRIFTS:-1 0.3 0.15 0.08}; do
  e2e_run "drift-32k8-$drift" 90 --parts step --contexts 32768 --batches 8 --rates 0,0.117 --query-drift "$drift"
done
e2e_run "drift-many-${DRIFT:-0.15}" 120 --parts many --many 64 --many-context 4096 --rates 0,0.117 \
  --query-drift "${DRIFT:-0.15}"
e2e_run "drift-table-${DRIFT:-0.15}" 150 --parts step --contexts 32768,131072 --batches 1,8 --rates 0,0.117 \
  --query-drift "${DRIFT:-0.15}"
rm -f "$OUT"/*.png
e2e_finish
python3 - "$OUT" <<'PY'
import json, pathlib, sys
for p in sorted(pathlib.Path(sys.argv[1]).glob("e2e-drift-*.json")):
    for r in json.loads(p.read_text())["rows"]:
        if r.get("moved_share") is not None:
            print(p.name, r["context"], r["batch"], "drift", r["query_drift"], "moved_share", r["moved_share"],
                  "mean", r["mean_ms"], "answer p50", r["answer_ms_median"])
PY
