# Sourced by the scripts/gpu_*.sh runs of `kvrecall bench e2e` (after scripts/gpu_env.sh): the bench's
# common arguments ($E2E, change it before calling), `e2e_run` (one bench with its own time limit, its log
# under $OUT/logs), `e2e_warmup` (an untimed bench first), `e2e_finish` (pack the logs, print each JSON's
# ratios and rows) and `e2e_pack_boundaries` (each run's boundary cost printed, then the JSONs and plots packed with the
# logs, as a call returns at most 8 files).
#   usage: . scripts/gpu_e2e_lib.sh; e2e_run NAME SECONDS ARGS...; e2e_finish
E2E="python3 -m kvrecall.cli bench e2e --policies louiskv --lag 4 --steps 96 --warmup 16 --host-cap-gib 40 --host-pool-gib 40 ${E2E_EXTRA:-}"
mkdir -p "$OUT/logs"
{ date -u; nvidia-smi --query-gpu=index,name,driver_version --format=csv; nproc; free -g | head -2; } > "$OUT/logs/env.txt" 2>&1
SECONDS=0
e2e_run() {  # name, seconds, arguments
  local name=$1 limit=$2; shift 2
  timeout "$limit" $E2E "$@" --out "$OUT/e2e-$name.json" > "$OUT/logs/e2e-$name.log" 2>&1
  echo "e2e $name exit $? after ${SECONDS}s"
}
e2e_warmup() {  # seconds: an untimed bench at 32K x 8 (compiles what the timed ones reuse)
  timeout "$1" $E2E --parts step --contexts 32768 --batches 8 --rates 0.117 --steps 16 --warmup 8 \
    --out /tmp/e2e-warm.json > "$OUT/logs/e2e-warm.log" 2>&1
  echo "warm-up bench exit $? after ${SECONDS}s"
}
e2e_finish() {
  echo "done after ${SECONDS}s"
  mv "$OUT/tests" "$OUT/logs/" 2>/dev/null
  tar czf "$OUT/logs.tgz" -C "$OUT" logs && rm -rf "$OUT/logs"
  python3 - "$OUT" <<'PY'
import json, pathlib, sys
for p in sorted(pathlib.Path(sys.argv[1]).glob("e2e-*.json")):
    d = json.loads(p.read_text())
    print(p.name, d["meta"].get("ratios"), d.get("errors"))
    for r in d["rows"]:
        print(" ", r["policy"], r["context"], r["batch"], r.get("rate"), "lag", r.get("lag"), "mib", r.get("moved_mib_mean"), "mean", r["mean_ms"], "p90", r["p90_ms"],
              "tok/s", r.get("tokens_per_s"), "shadow_steps", r.get("shadow_steps_mean"), "sync", r.get("sync_ms_mean"), "gpu", r.get("graph_gpu_ms_mean"),
              "host", r.get("host_ms_mean"), "wait", r.get("wait_ms_mean"), "late", r.get("late_steps"),
              "answer", r.get("answer_ms_median"), r.get("answer_ms_p90"))
PY
}
e2e_pack_boundaries() {  # per run and (context, batch), printed, then every e2e JSON and plot packed into logs.tgz (logs/json/):
  # the 11.7% step over the 0% one, the captured step's GPU ms at both, late steps, tokens/s, answers p50, host probe
  mkdir -p "$OUT/logs/json" && mv "$OUT"/e2e-*.json "$OUT"/e2e-*.png "$OUT/logs/json/" 2>/dev/null
  for f in "$OUT"/logs/json/*.json; do python3 - "$f" <<'PY'
import json, sys
d = json.load(open(sys.argv[1]))
rows = {(r["context"], r["batch"], r.get("rate")): r for r in d["rows"] if r["policy"] == "louiskv"}
for (c, b, rate), r in sorted(rows.items(), key=lambda item: (item[0][0], item[0][1], item[0][2] or 0)):
    if rate == 0.117 and (c, b, 0.0) in rows:
        a = rows[(c, b, 0.0)]
        extra = {k: r[k] for k in ("worker_selections", "worker_choices") if r.get(k) is not None}
        print(sys.argv[1].split("/")[-1], f"{c}x{b}", "boundary", round(r["mean_ms"] / a["mean_ms"], 3), "gpu",
              r.get("graph_gpu_ms_mean"), a.get("graph_gpu_ms_mean"), "late", r.get("late_steps"), "tok/s",
              r["tokens_per_s"], "answer", r.get("answer_ms_median"), "probe", d["meta"].get("host_probe"), *extra.items())
PY
  done
  e2e_finish
}
