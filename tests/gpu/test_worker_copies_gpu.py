"""Worker copies on a GPU (the daemon's worker_copy_share, placement_staged.py): background
retrievals leave their new rows in each session's staging area and the worker copies them into
their slots; at share 1 the staging area takes every row and the engine's crossings read a light
shadow (slot positions and query copied, keys and values in place). An engine decoding louiskv
sessions with forced boundaries at lag 2 produces the same tokens and logits with the daemon
copying (share 0), the worker copying what fits (0.5) and the worker copying everything (1),
with overlap off and on, and with the worker copying its answers did stage rows."""

from __future__ import annotations

import pytest
import torch

from kvrecall.client import KVRecallClient
from kvrecall.client.hf import spec_for
from kvrecall.engine import DecoderWeights, Engine
from kvrecall.local import LocalDaemon
from kvrecall.v1 import kvrecall_pb2 as pb
from tests.gpu import NO_WARMUP
from tests.gpu.test_engine_gpu import tiny_llama  # noqa: F401 (the fixture: 3 layers, 1,024 positions)

pytestmark = pytest.mark.gpu
STEPS = 48
SHARES = (0.0, 0.5, 1.0)


def decode(client, model, overlap: bool) -> dict:
    weights = DecoderWeights.from_hf(model)
    # Every slot crosses every 7th step (a lag of 2 reads the shadow meanwhile).
    engine = Engine(weights, batch=3, max_capacity=2048, lag=2, keep_logits=True, overlap=overlap,
                    force_boundary=lambda step, slot: step % 7 == slot)  # fmt: skip
    spec = spec_for(model, max_tokens=1024)
    g = torch.Generator().manual_seed(5)
    sessions, slots, logits = [], [], []
    for length in (700, 513, 901):
        session = client.open_session(spec, "louiskv", {"budget": 64, "window": 32, "ingest_select": "units"},
                                      device="cuda", deferred_eviction=True)  # fmt: skip
        assert session.transport == pb.TRANSPORT_CUDA_IPC
        sessions.append(session)
        slots.append(engine.add(session, torch.randint(0, 128, (length,), generator=g).cuda()))
    for _ in range(STEPS):
        engine.step()
        logits.append(engine.logits.clone())
    seqs = [engine.remove(slot) for slot in slots]
    out = {
        "tokens": [seq.tokens for seq in seqs], "logits": torch.stack(logits, dim=1),
        "staged": sum(engine.times.staged_rows), "area": [s.core.staging is not None for s in sessions],
        "light": [s.core.stages_every_row for s in sessions],
    }  # fmt: skip
    engine.close()
    for session in sessions:
        session.close()
    return out


@pytest.fixture(scope="module")
def runs(tiny_llama):  # noqa: F811
    """{(share, overlap): decode's result}, one daemon per share."""
    results = {}
    for share in SHARES:
        env = {"KVRECALL_WORKER_COPY_SHARE": str(share), "KVRECALL_HOST_READS": "copy"}
        with LocalDaemon(host_pool_gb=1.0, device_pool_gb=1.0, device="cuda:0", extra_args=NO_WARMUP, env=env) as d:
            with KVRecallClient(d.target, "worker-copies") as client:
                for overlap in (False, True):
                    results[share, overlap] = decode(client, tiny_llama, overlap)
    return results


@pytest.mark.parametrize("overlap", [False, True])
@pytest.mark.parametrize("share", SHARES[1:])
def test_worker_copies_decode_as_the_daemons_copies(runs, share, overlap):
    plain, copied = runs[0.0, overlap], runs[share, overlap]
    assert not any(plain["area"]) and not plain["staged"], "share 0: no staging area, nothing staged"
    assert all(copied["area"]), "every session maps a staging area"
    assert copied["light"] == [share == 1.0] * 3, "a light shadow exactly where every row is staged"
    if share == 1.0:  # (at 0.5 a retrieval's rows may or may not fit: either way the tokens agree)
        assert copied["staged"] > 0, "the worker copied no row: the test tells nothing"
    assert copied["tokens"] == plain["tokens"]
    assert (copied["logits"] - plain["logits"]).abs().max().item() < 1e-5
