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


def test_a_chat_turn_over_a_held_document_registers_itself_for_the_next(smollm, client, prompts):
    """Turn 2 declares the document and its own question; the daemon holds only the document, so
    prefill cuts a pass at the declared end (the daemon registers the longer prefix there).
    Turn 3 starts after it."""
    model, _ = smollm
    document, questions = prompts
    fingerprint = model_fingerprint(model)
    turn = torch.cat((document, questions[0]), dim=1)
    follow = torch.cat((turn, questions[1]), dim=1)
    session, cache = open_model_session(client, model, "louiskv", {"budget": 64}, MAX_TOKENS,
                                        prefix=declare(document[0].tolist(), fingerprint))  # fmt: skip
    with session:
        prefill(model, cache, torch.cat((document, questions[0][:, :2]), dim=1))  # registers the document
        session, cache = open_model_session(client, model, "louiskv", {"budget": 64}, MAX_TOKENS,
                                            prefix=declare(turn[0].tolist(), fingerprint))  # fmt: skip
        with session:
            assert session.prefix_held == DOCUMENT
            second = decode(model, cache, follow, STEPS)
            held = {p.tokens: p.refs for p in client.stats().prefixes}
            assert held.get(turn.shape[1]) == 1, held  # registered at the declared end, in use
            session, cache = open_model_session(client, model, "louiskv", {"budget": 64}, MAX_TOKENS,
                                                prefix=declare(follow[0].tolist(), fingerprint))  # fmt: skip
            with session:
                assert session.prefix_held == turn.shape[1]  # turn 3 starts after turn 2's prefix
                third = decode(model, cache, torch.cat((follow, questions[0][:, :2]), dim=1), STEPS)
    assert len(second.tokens) == len(third.tokens) == STEPS


def test_the_questions_demo_reports_the_shared_document(tmp_path):
    """`kvrecall demo --questions N --json`: N sessions over one document; its last stdout line
    is one JSON object with every question and what the first and the other sessions cost."""
    import json
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-m", "kvrecall.cli", "demo", "--questions", "2", "--context-tokens", "600", "--json"],
        capture_output=True, text=True, timeout=600, check=True,
    )  # fmt: skip
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert [set(q) for q in report["questions"]] == [{"answer", "expected", "correct"}] * 2
    assert report["rest_held_the_document"] is True
    assert 0 < report["host_bytes_rest_mean"] < report["host_bytes_first"]
    assert 0 < report["rest_ingest_seconds_mean"] and 0 < report["first_ingest_seconds"]
