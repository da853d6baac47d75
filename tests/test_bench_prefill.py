"""Smoke test of the prefill-memory benchmark on a CPU (tiny model): it runs the real path
(transformers model, local daemon, chunked kvrecall prefill, full-KV baseline) and writes
every key the GPU run reports. No timing assertions."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_cpu_run_writes_every_key(tmp_path: Path) -> None:
    out = tmp_path / "prefill.json"
    proc = subprocess.run(
        [sys.executable, "-m", "kvrecall.bench.prefill", "--device", "cpu", "--layers", "2", "--contexts", "512",
         "--chunk", "128", "--steps", "4", "--device-pool-gb", "0.25", "--out", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "== prefill" in proc.stdout
    results = json.loads(out.read_text())
    assert results["config"]["layers"] == 2 and results["config"]["chunk"] == 128
    assert {"device", "torch", "date_utc", "command"} <= set(results["meta"])
    run = results["contexts"]["512"]
    for name in ("full", "kvrecall", "kvrecall_first"):
        assert run[name]["prefill_s"] > 0 and "peak_worker_bytes" in run[name] and "decode_ms_per_step" in run[name]
    for key in ("daemon_device_bytes", "daemon_metadata_bytes", "peak_staging_bytes", "boundaries"):
        assert key in run["kvrecall"]
    assert run["kvrecall"]["daemon_device_bytes"] > run["kvrecall"]["daemon_metadata_bytes"] > 0
    assert run["kvrecall"]["peak_staging_bytes"] > 0  # the prompt was staged (layer by layer, then chunks)
    assert set(run["ratios"]) == {"worker_peak_vs_full", "daemon_device_vs_full_kv", "prefill_warm_vs_full",
                                  "prefill_first_vs_full"}
