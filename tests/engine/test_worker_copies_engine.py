"""The engine with worker copies against real CPU daemons (the daemon's worker_copy_share; the
PyTorch reference stages the rows on a CPU): louiskv sessions crossing boundaries at lag 2 decode
the same tokens and logits whether the daemon copies a retrieval's rows (share 0), the worker
copies those that fit (0.75) or every one while its crossings read a light shadow (share 1: slot
positions and query copied, keys and values read and written in place), overlap off and on."""

from __future__ import annotations

import pytest
import torch

from kvrecall.client import KVRecallClient
from kvrecall.client.hf import spec_for
from kvrecall.engine import DecoderWeights, Engine
from kvrecall.local import LocalDaemon
from tests.engine.test_engine import tiny_llama  # noqa: F401 (the fixture)

STEPS = 30
SHARES = (0.0, 0.75, 1.0)


def decode(client, model, overlap: bool, device: str = "cpu", config: dict | None = None, deferred: bool = True,
           **engine_args) -> dict:  # fmt: skip
    """Three louiskv sessions decoded STEPS steps by one engine, crossing in turn every 6th step at
    lag 2: their tokens, the logits of every step, the rows the worker copied, whether each
    crossing read a light shadow and whether each session mapped a staging area."""
    weights = DecoderWeights.from_hf(model)
    engine = Engine(weights, batch=3, max_capacity=1024, lag=2, overlap=overlap, keep_logits=True,
                    force_boundary=lambda step, slot: step % 6 == 2 * slot, **engine_args)  # fmt: skip
    lights = []
    to_shadow = engine._to_shadow

    def watched(seq):  # which kind of shadow each crossing read
        to_shadow(seq)
        lights.append(seq.light)

    engine._to_shadow = watched
    spec = spec_for(model, max_tokens=512)
    g = torch.Generator().manual_seed(4)
    sessions, slots, logits = [], [], []
    for length in (300, 211, 257):
        session = client.open_session(spec, "louiskv", config or {"budget": 32, "window": 32, "ingest_select": "units"},
                                      deferred_eviction=deferred, device=device)  # fmt: skip
        assert session.keys.device.type == device
        sessions.append(session)
        slots.append(engine.add(session, torch.randint(0, 128, (length,), generator=g).to(device)))
    for _ in range(STEPS):
        engine.step()
        logits.append(engine.logits.clone())
    seqs = [engine.remove(slot) for slot in slots]
    out = {"tokens": [seq.tokens for seq in seqs], "logits": torch.stack(logits, dim=1),
           "staged": sum(engine.times.staged_rows), "lights": lights,
           "areas": [session.core.staging is not None for session in sessions],
           "tables": [session.core.table is not None for session in sessions],
           "units": [session.stats().units for session in sessions]}  # fmt: skip
    engine.close()
    for session in sessions:
        session.close()
    return out


def decode_shares(model, shares, device: str = "cpu", env: dict | None = None, **daemon_args) -> dict:
    """{(share, overlap): decode's result}, one daemon per worker_copy_share on `device` (the first
    GPU for "cuda"; LocalDaemon's other arguments: daemon_args; its environment: env and the share)."""
    results = {}
    daemon_device = "cuda:0" if device == "cuda" else device
    for share in shares:
        env_share = {**(env or {}), "KVRECALL_WORKER_COPY_SHARE": str(share)}
        with LocalDaemon(device=daemon_device, env=env_share, **daemon_args) as d:
            with KVRecallClient(d.target, "worker-copies") as client:
                for overlap in (False, True):
                    results[share, overlap] = decode(client, model, overlap, device)
    return results


@pytest.fixture(scope="module")
def runs(tiny_llama):  # noqa: F811
    return decode_shares(tiny_llama, SHARES, host_pool_gb=0.5, device_pool_gb=0.25)


@pytest.mark.parametrize("overlap", [False, True])
@pytest.mark.parametrize("share", SHARES[1:])
def test_worker_copies_decode_as_the_daemons_copies(runs, share, overlap):
    plain, copied = runs[0.0, overlap], runs[share, overlap]
    assert plain["lights"] and not any(plain["lights"]) and not plain["staged"] and not any(plain["areas"])
    assert all(copied["areas"]), "every session maps a staging area"
    assert all(copied["lights"]) == (share == 1.0) and any(copied["lights"]) == (share == 1.0)
    assert copied["staged"] > 0, "the worker copied no row: the test tells nothing"
    assert copied["tokens"] == plain["tokens"]
    assert (copied["logits"] - plain["logits"]).abs().max().item() < 1e-6
