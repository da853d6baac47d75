"""Shared documents on the real model: sessions that start from a held document answer token
for token like sessions that ingested the document themselves (same policy and budget)."""

from __future__ import annotations

import pytest
import torch

from kvrecall.client.hf import model_fingerprint, prefill
from kvrecall.prefix import declare
from kvrecall.worker import decode, open_model_session

pytestmark = pytest.mark.model

DOCUMENT, STEPS, MAX_TOKENS = 300, 6, 420
POLICIES = [("louiskv", {"budget": 64}), ("quest", {"budget": 64})]


@pytest.fixture(scope="module")
def prompts(smollm):
    from kvrecall.eval.tasks import demo_sample

    _, tokenizer = smollm
    sample = demo_sample(600, seed=3, tokenizer=tokenizer)
    ids = tokenizer(sample.prompt, return_tensors="pt").input_ids
    document = ids[:, :DOCUMENT]
    questions = [tokenizer(q, return_tensors="pt").input_ids for q in (" What is the code? Answer:", " Repeat the first line:")]
    return document, questions


@pytest.mark.parametrize("policy,config", POLICIES, ids=[p for p, _ in POLICIES])
def test_sessions_on_a_held_document_answer_like_sessions_that_ingested_it(smollm, client, prompts, policy, config):
    model, _ = smollm
    document, questions = prompts
    expected = []
    for question in questions:
        session, cache = open_model_session(client, model, policy, config, MAX_TOKENS)
        with session:
            prefill(model, cache, document)  # the document: its own ingest
            expected.append(decode(model, cache, question, STEPS))
    declaration = declare(document[0].tolist(), model_fingerprint(model))
    results = []
    for question in questions:  # the first registers the document, the second starts from it
        session, cache = open_model_session(client, model, policy, config, MAX_TOKENS, prefix=declaration)
        with session:
            results.append((session.prefix_held, decode(model, cache, torch.cat((document, question), dim=1), STEPS)))
    assert [held for held, _ in results] == [0, DOCUMENT]
    for (_, got), want in zip(results, expected, strict=True):
        assert got.tokens == want.tokens
        assert all(torch.equal(a, b) for a, b in zip(got.logits, want.logits, strict=True))
