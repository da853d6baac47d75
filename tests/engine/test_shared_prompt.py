"""Sequences over one shared document (a prefix the daemon holds): the engine takes a session
whose daemon held its whole prompt at open without ingesting it again, and a batch of them
decodes token for token like the same sequences each ingesting the prompt; a session that
holds only part of its prompt is refused."""

from __future__ import annotations

import pytest
import torch

from kvrecall.client import KVRecallClient
from kvrecall.client.hf import spec_for
from kvrecall.engine import DecoderWeights, Engine
from kvrecall.prefix import declare
from tests.engine.test_engine import tiny_llama  # noqa: F401 (the fixture)

transformers = pytest.importorskip("transformers")

CONFIG = {"budget": 16, "n_sink": 4, "window": 32, "threshold": 0.9}  # tight: retrieval matters
PROMPT, STEPS, FIRST = 90, 24, (5, 17, 99)


def run(client, model, weights, shared: bool, device: str = "cpu"):
    """Three sequences over one prompt (each its own first token), decoded STEPS steps ->
    per sequence (tokens, boundaries, logits [STEPS, V]) and what each session's daemon held.
    (tests/gpu/test_shared_prompt_gpu.py runs it on CUDA: captured steps, CUDA IPC.)"""
    tokens = torch.randint(0, 128, (PROMPT,), generator=torch.Generator().manual_seed(3))
    spec = spec_for(model, max_tokens=256)
    engine = Engine(weights, batch=len(FIRST), max_capacity=256, lag=2, overlap=True, keep_logits=True)
    kv, queries, _ = engine.decoder.prefill(tokens.to(device), n_obs=16)
    prefix = declare(tokens.tolist(), "tiny-llama-test") if shared else None
    sessions, held, logits = [], [], {}
    for first in FIRST:
        session = client.open_session(spec, "louiskv", CONFIG, device=device, deferred_eviction=True, prefix=prefix)
        held.append(session.prefix_held)
        sessions.append(session)
        logits[engine.add(session, kv=kv, queries=queries, first_token=first)] = []
    for _ in range(STEPS):
        engine.step()
        for slot in logits:
            logits[slot].append(engine.logits[slot].clone())
    out = []
    for slot in list(logits):
        seq = engine.remove(slot)
        out.append((seq.tokens, seq.boundaries, torch.stack(logits[slot])))
    for session in sessions:
        session.close()
    engine.close()
    return out, held


def test_a_batch_over_a_shared_document_decodes_like_each_sequence_ingesting_it(daemon, tiny_llama):  # noqa: F811
    weights = DecoderWeights.from_hf(tiny_llama)
    with KVRecallClient(daemon.target, "engine-shared") as client:
        shared, held = run(client, tiny_llama, weights, shared=True)
        alone, held_alone = run(client, tiny_llama, weights, shared=False)
    assert held == [0, PROMPT, PROMPT] and held_alone == [0, 0, 0]  # the first registered it, the others held it
    assert sum(boundaries for _, boundaries, _ in shared) >= 1, "no boundary: the test exercises no retrieval"
    assert len({tuple(tokens) for tokens, _, _ in shared}) == len(FIRST)  # three different sequences
    for (tokens_s, boundaries_s, logits_s), (tokens_a, boundaries_a, logits_a) in zip(shared, alone, strict=True):
        assert tokens_s == tokens_a and boundaries_s == boundaries_a
        assert (logits_s - logits_a).abs().max().item() < 1e-4


def test_a_session_holding_part_of_its_prompt_is_refused(daemon, tiny_llama):  # noqa: F811
    weights = DecoderWeights.from_hf(tiny_llama)
    tokens = torch.randint(0, 128, (PROMPT,), generator=torch.Generator().manual_seed(4))
    spec = spec_for(tiny_llama, max_tokens=256)
    engine = Engine(weights, batch=2, max_capacity=256, lag=2, overlap=True)
    kv, queries, _ = engine.decoder.prefill(tokens, n_obs=16)
    part = declare(tokens[:60].tolist(), "tiny-llama-test")
    with KVRecallClient(daemon.target, "engine-shared-part") as client:
        first = client.open_session(spec, "louiskv", CONFIG, deferred_eviction=True, prefix=part)
        first.ingest(kv[:, :, :, :60], queries)  # registers the 60-token prefix
        second = client.open_session(spec, "louiskv", CONFIG, deferred_eviction=True, prefix=part)
        assert second.prefix_held == 60
        with pytest.raises(ValueError, match="holds 60 of its 90 prompt tokens"):
            engine.add(second, kv=kv, queries=queries, first_token=1)
        second.close()
        first.close()
    engine.close()
