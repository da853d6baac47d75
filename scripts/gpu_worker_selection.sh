#!/usr/bin/env bash
# Device run (one call, ~8 min with a cold start): what a daemon process's boundary costs a worker at 32K x 8, and
# which part of the retrieval it is (issue #17; DEVELOPERS.md, "Measured: worker selection": worker selection was
# measured here on 2026-12-04 and is not a gain; the dry_* arms take the daemon's work apart). On one machine:
# 0. tests/gpu/test_worker_selection_gpu.py (the worker's choice decodes as the daemon's, CUDA IPC, Triton).
# 1. 32K x 8, drift 0.15, rates 0 and 11.7%, ROUNDS times in turn (no run starts past BUDGET_S, default 430: a run may take 100 s and the call 600):
#    proc      a daemon process as is (its selection and placement kernels beside the worker's step);
#    real      worker_selection, the choice placed from the host (worker copies at share 1: no daemon kernel
#              but the segment close);
#    realdev   worker_selection, placed by the daemon's kernels into the staging area (share 1);
#    realdev0  worker_selection, placed by the daemon's kernels into the working set (share 0: the daemon's
#              usual placement; only the selection kernels moved: the cleanest A/B against proc);
#    dry       the daemon's retrievals dry (no daemon kernel: the floor);
#    dryclose  dry, but louiskv's open segment still closes (dry_retrievals_close: what the close costs alone);
#    pdic      proc with dry_index_copies (the placement's rows moved but never index-copied into their slots);
#    pdt       proc with dry_transfers (no gather or DMA; zeros index-copied into the rows' slots);
#    pdis      proc with dry_index_scratch (gathered, moved and index-copied as always, into stand-ins of the
#              working sets that no worker reads: the daemon's index-copy kernels, another destination);
#    pisN      proc with dry_index_share N/100 (only that share of each session's rows index-copied, at least one:
#              pis0 the launches alone, pis50 half the rows);
#    kprof     proc with the daemon's kernel profile (KVRECALL_KERNEL_PROFILE_OUT: 3 s of its kernels from the first
#              retrieval, logs/kprof-NAME.json);
#    pdef      proc with dry_index_defer (a call's index copies launched at the next staged retrieval's start,
#              its answer not waiting for them: one burst of daemon kernels a call);
#    proc128 / pdef128  proc / pdef at 128K x 8 (a shared document, --shared-prompt);
#    capped    the 16 GiB GPU cap at 32K (--parts capped, a 90 GiB host tier), a daemon process;
#    table / tablee  README's table (32K and 128K, batch 1 and 8, a shared document), a daemon process / embedded;
#    pdu       proc with dry_uploads (the plan and its sync; no host gather, DMA or index copy);
#    procc     proc with plan_readback copy (the plan copied to the host after its kernel: the way before
#              2026-12-04; proc's plan is written there by the kernel itself);
#    pduc      pdu with plan_readback copy;
#    wcN       proc with worker_copy_share N/100 (the worker copies the staged rows into their slots; at 100 every
#              row, and its crossings read a light shadow); wkN the same at 128K x 8 (shared document);
#    pdns      proc with dry_plan_sync (the selection and plan launched, never waited for in the middle of the call);
#    lNxC      dry_launches N of C cycles each (e.g. l24x0-1, l1x400000-1): what a daemon launch costs against
#              the count and length of its kernels (~1,980 cycles a microsecond);
#    wdry      worker_selection with the daemon's retrievals dry (the worker's own choice, nothing placed);
#    rdu       realdev0 with dry_uploads (the worker's choice, the daemon's plan and its sync);
#    rdic      realdev0 with dry_index_copies (the daemon's kernels: the staged plan and the close);
#    emb       the embedded daemon as is;
#    wsel      dry plus the worker-selection EMULATION (bench e2e --worker-selection).
#    Round 1 of each, then 64 sequences at 4K (many-proc, many-real, many-realdev0), then the other rounds.
# 2. (GAPS=1; past 600 s with ROUNDS=2) The embedded daemon's 0.5 ms slower captured step (bench/results/README.md,
#    thirty-first session): the step captured again once all is idle, and both daemons' graphs dumped as Graphviz
#    (scripts/graph_gap_inbench.py).
# 3. Options: RUNS="proc-2 real-2 ..." runs those instead (the names above), SKIP_TESTS=1 skips step 0, PHASES=1
#    has each daemon write its Boundaries calls' phase times (KVRECALL_PHASES_OUT, kvrecall/phases.py) to
#    logs/phases-NAME.json.
#   usage (device, carry .whl/eval .whl/triton): [ROUNDS=2] [BUDGET_S=430] [GAPS=1] [RUNS=...] [SKIP_TESTS=1] [PHASES=1]
#          bash scripts/gpu_worker_selection.sh
. scripts/gpu_env.sh
E2E_EXTRA="--query-drift 0.15"
. scripts/gpu_e2e_lib.sh
E0="$E2E"
B="--parts step --contexts 32768 --batches 8 --rates 0,0.117"
TABLE="--parts step --contexts 32768,131072 --batches 1,8 --rates 0,0.117 --shared-prompt"
B128="--parts step --contexts 131072 --batches 8 --rates 0,0.117 --shared-prompt"
mkdir -p "$OUT/logs"
SECONDS=0
if [ -z "${SKIP_TESTS:-}" ]; then
  timeout 200 python3 -m pytest -v --tb=short -p no:cacheprovider -m gpu tests/gpu/test_worker_selection_gpu.py \
    > "$OUT/logs/worker-selection-gpu-tests.log" 2>&1
  echo "worker selection GPU tests: exit $? in ${SECONDS}s: $(tail -1 "$OUT/logs/worker-selection-gpu-tests.log")"
fi
W="--daemon-env KVRECALL_WORKER_SELECTION=1"
S1="--daemon-env KVRECALL_WORKER_COPY_SHARE=1"
DEV="--daemon-env KVRECALL_WORKER_SELECTION_PLACE=device"
M="--parts many --many 64 --many-context 4096 --rates 0,0.117"
runs="proc-1 real-1 realdev-1 realdev0-1 dry-1 emb-1 wsel-1 many-proc many-real many-realdev0"
for r in $(seq 2 "${ROUNDS:-2}"); do runs="$runs proc-$r real-$r realdev-$r realdev0-$r dry-$r emb-$r"; done
for run in ${RUNS:-$runs}; do
  [ "$SECONDS" -lt "${BUDGET_S:-430}" ] || { echo "skipped $run (budget)"; continue; }
  E2E="$E0 --daemon process"
  [ -z "${PHASES:-}" ] || E2E="$E2E --daemon-env KVRECALL_PHASES_OUT=$OUT/logs/phases-$run.json"
  case $run in
    proc-*) e2e_run "$run" 90 $B ;;
    real-*) e2e_run "$run" 90 $B $W $S1 ;;
    realdev-*) e2e_run "$run" 90 $B $W $S1 $DEV ;;
    realdev0-*) e2e_run "$run" 90 $B $W $DEV ;;
    dry-*) e2e_run "$run" 90 $B --daemon-env KVRECALL_DRY_RETRIEVALS=1 ;;
    pdic-*) e2e_run "$run" 90 $B --daemon-env KVRECALL_DRY_INDEX_COPIES=1 ;;
    kprof-*) e2e_run "$run" 90 $B --daemon-env "KVRECALL_KERNEL_PROFILE_OUT=$OUT/logs/kprof-$run.json" ;;
    capped-*) e2e_run "$run" 120 --parts capped --rates 0,0.117 --host-cap-gib 90 --host-pool-gib 90 ;;
    table-*) e2e_run "$run" 200 $TABLE ;;
    tablee-*) E2E="$E0 --daemon embedded"; e2e_run "$run" 200 $TABLE ;;
    pdef-*) e2e_run "$run" 90 $B --daemon-env KVRECALL_DRY_INDEX_DEFER=1 ;;
    pdef128-*) e2e_run "$run" 100 $B128 --daemon-env KVRECALL_DRY_INDEX_DEFER=1 ;;
    proc128-*) e2e_run "$run" 100 $B128 ;;
    pdu-*) e2e_run "$run" 90 $B --daemon-env KVRECALL_DRY_UPLOADS=1 ;;
    pdt-*) e2e_run "$run" 90 $B --daemon-env KVRECALL_DRY_TRANSFERS=1 ;;
    pdis-*) e2e_run "$run" 90 $B --daemon-env KVRECALL_DRY_INDEX_SCRATCH=1 ;;
    pis[0-9]*-*) share=${run%-*}; share=${share#pis}
      e2e_run "$run" 90 $B --daemon-env "KVRECALL_DRY_INDEX_SHARE=$(python3 -c "print($share / 100)")" ;;
    pduc-*) e2e_run "$run" 90 $B --daemon-env KVRECALL_DRY_UPLOADS=1 --daemon-env KVRECALL_PLAN_READBACK=copy ;;
    procc-*) e2e_run "$run" 90 $B --daemon-env KVRECALL_PLAN_READBACK=copy ;;
    wc[0-9]*-*) share=${run%-*}; share=${share#wc}
      e2e_run "$run" 90 $B --daemon-env "KVRECALL_WORKER_COPY_SHARE=$(python3 -c "print($share / 100)")" ;;
    wk[0-9]*-*) share=${run%-*}; share=${share#wk}
      e2e_run "$run" 100 $B128 --daemon-env "KVRECALL_WORKER_COPY_SHARE=$(python3 -c "print($share / 100)")" ;;
    l[0-9]*x[0-9]*-*) spec=${run%-*}; spec=${spec#l}
      e2e_run "$run" 90 $B --daemon-env "KVRECALL_DRY_LAUNCHES=${spec%x*}" --daemon-env "KVRECALL_DRY_LAUNCH_CYCLES=${spec#*x}" ;;
    pdns-*) e2e_run "$run" 90 $B --daemon-env KVRECALL_DRY_PLAN_SYNC=1 ;;
    wdry-*) e2e_run "$run" 90 $B $W $DEV --daemon-env KVRECALL_DRY_RETRIEVALS=1 ;;
    rdu-*) e2e_run "$run" 90 $B $W $DEV --daemon-env KVRECALL_DRY_UPLOADS=1 ;;
    rdic-*) e2e_run "$run" 90 $B $W $DEV --daemon-env KVRECALL_DRY_INDEX_COPIES=1 ;;
    dryclose-*) e2e_run "$run" 90 $B --daemon-env KVRECALL_DRY_RETRIEVALS_CLOSE=1 ;;
    emb-*) E2E="$E0 --daemon embedded"; e2e_run "$run" 90 $B ;;
    wsel-*) e2e_run "$run" 90 $B --daemon-env KVRECALL_DRY_RETRIEVALS=1 --worker-selection ;;
    many-proc) e2e_run "$run" 100 $M ;;
    many-real) e2e_run "$run" 100 $M $W $S1 ;;
    many-realdev0) e2e_run "$run" 100 $M $W $DEV ;;
  esac
done
if [ -n "${GAPS:-}" ]; then
  C="--policies louiskv --lag 4 --steps 24 --warmup 8 --host-pool-gib 40 --query-drift 0.15 --parts step --contexts 32768 --batches 1 --rates 0"
  for d in embedded process; do
    timeout 120 python3 scripts/graph_gap_inbench.py --recapture --dump-dir "/tmp/dump-$d" $C --daemon $d \
      --out "/tmp/e2e-gap-$d.json" > "$OUT/logs/gap-$d.log" 2>&1
    grep -E "SYNTH|RECAPTURE|STREAM|DUMP" "$OUT/logs/gap-$d.log" | head -20
  done
  tar czf "$OUT/dumps.tgz" -C /tmp $(cd /tmp && ls -d dump-* 2>/dev/null) 2>/dev/null
fi
e2e_pack_boundaries
