"""Tensor parallelism 2 on two GPUs with NCCL: a daemon per GPU (daemon r on cuda:r), the same
check as the CPU test (scripts/gpu_tp.sh runs it too, with timings)."""

from __future__ import annotations

import json

import pytest
import torch

from kvrecall.tp.bench import NO_MULTICAST
from kvrecall.tp.launch import rank_daemons, run_ranks

pytestmark = pytest.mark.gpu


def test_two_gpus_agree_and_reproduce_full_attention(tmp_path):
    if torch.cuda.device_count() < 2:
        pytest.skip(f"needs 2 GPUs, {torch.cuda.device_count()} visible")
    with rank_daemons(2, "cuda", tmp_path, host_pool_gb=1.0, device_pool_gb=0.5) as daemons:
        targets = ",".join(d.target for d in daemons)
        argv = ["--targets", targets, "--device", "cuda", "--out", str(tmp_path), "--single"]
        run_ranks("kvrecall.tp.check", argv, 2, tmp_path, timeout=300, env=NO_MULTICAST)
    ranks = [json.loads((tmp_path / f"check-rank{r}.json").read_text()) for r in range(2)]
    for rank, r in enumerate(ranks):
        assert r["device"] == f"cuda:{rank}"
        assert r["exact"]["max_logit_diff_vs_full"] < 1e-4, r["exact"]
        assert r["small"]["daemon"]["boundaries"] == len(r["small"]["boundary_steps"])
        assert (r["small"]["daemon"]["tp_rank"], r["small"]["daemon"]["tp_size"]) == (rank, 2)
    assert ranks[0]["small"]["boundary_steps"] == ranks[1]["small"]["boundary_steps"]
    assert ranks[0]["single"]["boundary_steps"] == ranks[0]["small"]["boundary_steps"]
    assert ranks[0]["single"]["max_logit_diff_vs_tp"] < 1e-4
