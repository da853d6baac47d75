#!/usr/bin/env bash
# Where a retrieval's answer time goes in the daemon (issue #17), on one GPU (nvidia-h200; carry .whl/eval):
# a warm-up bench, then 32K x 8 and 64 sequences at 4K at 11.7% boundaries (lag 4), each with the daemon's
# per-phase clocks on (KVRECALL_PHASES_OUT, kvrecall/phases.py), one bench after another.
# PART=2: the 32K x 8 bench once per daemon environment in VARIANTS (name:KEY=VALUE[,KEY=VALUE], space-separated;
# default: the daemon as it is, 8 intra-op threads, passive OpenMP waits, a 0.1 ms interpreter switch interval).
# PART=3: the host tier over 4 KiB pages against huge pages (server/pinned.py): the host gather probe on a 40 GiB
# pinned tier both ways, then the 32K x 8 phases bench with KVRECALL_HOST_HUGEPAGES false / true / false / true,
# then 64 sequences with huge pages.
# Writes under $OUT: e2e-*.json (+ .png), phases-*.json, logs.tgz.
#   usage: bash scripts/gpu_phases.sh
set -uo pipefail
OUT=${OUT:-/tmp/kvrecall-gpu-out}; mkdir -p "$OUT"
. scripts/gpu_env.sh
. scripts/gpu_e2e_lib.sh
if [ "${PART:-1}" = 3 ]; then
  python3 scripts/host_gather_probe.py --pool-gib 40 --pools pinned4k,pinnedhuge --threads 8,16 --python-threads "" \
    --out "$OUT/host-gather-40g.json" 2>&1 | tail -12
  PART=2 VARIANTS="${VARIANTS:-small1:KVRECALL_HOST_HUGEPAGES=false huge1:KVRECALL_HOST_HUGEPAGES=true small2:KVRECALL_HOST_HUGEPAGES=false huge2:KVRECALL_HOST_HUGEPAGES=true}"
  MANY_TOO=1
fi
e2e_warmup 300
if [ "${PART:-1}" = 2 ]; then
  for variant in ${VARIANTS:-base: omp8:OMP_NUM_THREADS=8 passive:OMP_WAIT_POLICY=PASSIVE switch01:KVRECALL_SWITCH_INTERVAL_MS=0.1}; do
    name=${variant%%:*} envs=${variant#*:} extra=()
    for kv in ${envs//,/ }; do extra+=(--daemon-env "$kv"); done
    e2e_run "phases-32k8-$name" 90 --parts step --contexts 32768 --batches 8 --rates 0,0.117 \
      --daemon-env "KVRECALL_PHASES_OUT=$OUT/phases-32k8-$name.json" "${extra[@]}"
  done
  [ -n "${MANY_TOO:-}" ] && e2e_run phases-many-huge 120 --parts many --many 64 --many-context 4096 --rates 0.117 \
    --daemon-env "KVRECALL_PHASES_OUT=$OUT/phases-32k8-many-huge.json"
  rm -f "$OUT"/*.png  # (at most 8 files come back)
  e2e_finish
  python3 - "$OUT" <<'PY'
import json, pathlib, sys
for p in sorted(pathlib.Path(sys.argv[1]).glob("phases-*.json")):
    d = json.loads(p.read_text())["retrievals"]
    print(p.name, d["calls"], "retrieving calls, ms mean:", d["total_ms_mean"],
          {name: q["mean"] for name, q in d["phases"].items() if q["mean"]})
PY
  tar czf "$OUT/phases-32k8.tgz" -C "$OUT" $(cd "$OUT" && ls phases-32k8-*.json) && rm -f "$OUT"/phases-32k8-*.json
  exit 0
fi
[ -z "${SKIP_RUNS:-}" ] && e2e_run phases-32k8 90 --parts step --contexts 32768 --batches 8 --rates 0.117 \
  --daemon-env "KVRECALL_PHASES_OUT=$OUT/phases-32k8.json"
[ -z "${SKIP_RUNS:-}" ] && e2e_run phases-many 120 --parts many --many 64 --many-context 4096 --rates 0.117 \
  --daemon-env "KVRECALL_PHASES_OUT=$OUT/phases-many.json"
[ -z "${SKIP_RUNS:-}" ] && e2e_finish
python3 - "$OUT" <<'PY'
import json, pathlib, sys
for p in sorted(pathlib.Path(sys.argv[1]).glob("phases-*.json")):
    d = json.loads(p.read_text())
    for kind in ("retrievals", "notices"):
        if kind in d:
            print(p.name, kind, d[kind]["calls"], "calls, total ms mean", d[kind]["total_ms_mean"])
            for name, q in d[kind]["phases"].items():
                print(f"   {name:13} mean {q['mean']:8.3f} p50 {q['p50']:8.3f} p90 {q['p90']:8.3f} max {q['max']:8.3f}")
PY
