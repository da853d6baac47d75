"""Sequences over one shared document on a GPU (a CUDA daemon, CUDA IPC working sets, captured
steps): a batch over the held prefix decodes token for token like the same sequences each
ingesting the prompt (tests/engine/test_shared_prompt.py's scenario)."""

from __future__ import annotations

import pytest

from kvrecall.client import KVRecallClient
from kvrecall.engine import DecoderWeights
from kvrecall.local import LocalDaemon
from tests.engine.test_engine import tiny_llama_model
from tests.engine.test_shared_prompt import FIRST, PROMPT, run
from tests.gpu import NO_WARMUP

pytestmark = pytest.mark.gpu
pytest.importorskip("transformers")


def test_a_batch_over_a_shared_document_decodes_like_each_ingesting_it_on_a_gpu():
    model = tiny_llama_model().cuda()
    weights = DecoderWeights.from_hf(model)
    with LocalDaemon(host_pool_gb=0.5, device_pool_gb=0.5, device="cuda:0", extra_args=NO_WARMUP) as daemon:
        with KVRecallClient(daemon.target, "engine-shared-gpu") as client:
            shared, held = run(client, model, weights, shared=True, device="cuda")
            alone, _ = run(client, model, weights, shared=False, device="cuda")
    assert held == [0, PROMPT, PROMPT]
    assert sum(boundaries for _, boundaries, _ in shared) >= 1
    assert len({tuple(tokens) for tokens, _, _ in shared}) == len(FIRST)
    for (tokens_s, boundaries_s, logits_s), (tokens_a, boundaries_a, logits_a) in zip(shared, alone, strict=True):
        assert tokens_s == tokens_a and boundaries_s == boundaries_a
        assert (logits_s - logits_a).abs().max().item() < 1e-3
