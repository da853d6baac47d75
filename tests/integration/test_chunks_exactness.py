"""Tokens after the ingest, many per forward pass, on the real model through the real daemon.

A document is ingested, then a question of 30 tokens arrives in ONE forward pass (a chunk),
then greedy decoding; and a prompt is prefilled in 4 chunks (layer by layer). With a budget that covers the
sequence every policy must give full attention's logits.
"""

from __future__ import annotations

import pytest
import torch

from kvrecall.client.hf import prefill
from kvrecall.worker import decode, open_model_session
from tests.integration.test_model_exactness import reference_run

pytestmark = pytest.mark.model

DOCUMENT, QUESTION, STEPS = 260, 30, 6
MARGIN = 40  # max_tokens past the sequence: room for a streaming window that never evicts
COVERING = [
    ("full", None),
    ("streaming", {"n_sink": 4, "window": 320}),  # keeps >= 320 - spill_every: every token
    ("snapkv", {"budget": 300}),
    ("quest", {"budget": 300}),
    ("louiskv", {"budget": 300}),
    ("louiskv", {"budget": 300, "chunk_span": 8}),  # the chunk's best votes bring their neighbours
    ("windowkv", {"budget": 300}),
]

IDS = [p + ("-span" if c and "chunk_span" in c else "") for p, c in COVERING]


@pytest.fixture(scope="module")
def prompt(smollm):
    from kvrecall.eval.tasks import demo_sample

    _, tokenizer = smollm
    sample = demo_sample(600, seed=5, tokenizer=tokenizer)
    return tokenizer(sample.prompt, return_tensors="pt").input_ids[:, : DOCUMENT + QUESTION]


@pytest.fixture(scope="module")
def reference(smollm, prompt):
    model, _ = smollm
    return reference_run(model, prompt, STEPS)


def max_diff(expected: list[torch.Tensor], got: list[torch.Tensor]) -> float:
    assert len(got) == len(expected)
    return max(float((a - b).abs().max()) for a, b in zip(expected, got, strict=True))


@pytest.mark.parametrize("policy,config", COVERING, ids=IDS)
def test_question_after_a_cached_document_in_one_pass(smollm, client, prompt, reference, policy, config):
    model, _ = smollm
    tokens, logits = reference
    assert prompt.shape[1] == DOCUMENT + QUESTION
    session, cache = open_model_session(client, model, policy, config, prompt.shape[1] + STEPS + MARGIN)
    with session:
        prefill(model, cache, prompt[:, :DOCUMENT])  # the document: the ingest
        assert cache.seq_length == DOCUMENT
        result = decode(model, cache, prompt[:, DOCUMENT:], STEPS, forced=tokens)  # the question: one chunk
        stats = session.stats()
    assert cache.stats.appends >= 1 and stats.prompt_tokens == DOCUMENT
    assert stats.tokens == prompt.shape[1] + STEPS - 1
    diff = max_diff(logits, result.logits)
    assert diff < 1e-4, f"{policy}: max |logit difference| {diff}"
    assert result.tokens == tokens


@pytest.mark.parametrize("policy,config", COVERING, ids=IDS)
def test_prompt_prefilled_in_four_chunks(smollm, client, prompt, reference, policy, config):
    model, _ = smollm
    tokens, logits = reference
    chunk = -(-prompt.shape[1] // 4)
    session, cache = open_model_session(
        client, model, policy, config, prompt.shape[1] + STEPS + MARGIN, chunk_tokens=chunk
    )
    with session:
        result = decode(model, cache, prompt, STEPS, forced=tokens)
        stats = session.stats()
    assert stats.prompt_tokens == prompt.shape[1]  # layer by layer: the whole prompt is the ingest
    diff = max_diff(logits, result.logits)
    assert diff < 1e-4, f"{policy}: max |logit difference| {diff}"
    assert result.tokens == tokens
