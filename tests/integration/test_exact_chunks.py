"""A chunk's exact attention over the host tier (BoundaryEvent.attend), through the real daemon.

A question that arrives after a cached document attends over every earlier token: the daemon
answers its queries' attention over the host tier with the log-sum-exp, and the worker merges
it with the chunk's causal attention over itself. So the chunk's logits are full attention's
at any budget; the working set (what the chunk's retrieval placed) serves the decoding after.
"""

from __future__ import annotations

import pytest
import torch

from kvrecall.client import InvalidArgumentError
from kvrecall.client.hf import prefill
from kvrecall.kernels import reference
from kvrecall.worker import decode, open_model_session
from tests.conftest import SMALL, random_kv, random_query
from tests.integration.test_sessions import decode_steps

PROMPT, DECODED = 200, 10


@pytest.mark.parametrize("policy", ["louiskv", "quest"])
def test_attend_answers_exact_attention_over_every_earlier_token(client, policy):
    kv = random_kv(SMALL, PROMPT + DECODED, seed=3)
    g = torch.Generator().manual_seed(4)
    with client.open_session(SMALL, policy, {"budget": 32, "window": 32, "n_sink": 4}) as session:
        assert session.exact_chunks
        session.ingest(kv[:, :, :, :PROMPT].contiguous(), random_query(SMALL, 2, max(1, session.observation)))
        decode_steps(session, kv, PROMPT, DECODED)
        session.flush()
        boundaries = session.stats().boundaries
        for layer in range(SMALL.num_layers):
            queries = torch.randn(SMALL.num_query_heads, 7, SMALL.head_dim, generator=g)
            out, lse = session.attend(layer, queries, 0.3, retrieve=queries[:, -2:])
            want_out, want_lse = reference.attention_with_lse(
                queries, kv[layer, 0, :, : PROMPT + DECODED], kv[layer, 1, :, : PROMPT + DECODED], 0.3
            )
            torch.testing.assert_close(out, want_out, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(lse, want_lse, atol=1e-5, rtol=1e-5)
        # each call also retrieved for its last two queries (the chunk's retrieval)
        assert session.stats().boundaries == boundaries + SMALL.num_layers
        session.attend(0, queries, 0.3)  # attend only: no retrieval
        assert session.stats().boundaries == boundaries + SMALL.num_layers


def test_bad_attend_is_refused_and_the_session_carries_on(client):
    kv = random_kv(SMALL, PROMPT + 2, seed=5)
    queries = torch.randn(SMALL.num_query_heads, 3, SMALL.head_dim)
    with client.open_session(SMALL, "louiskv", {"budget": 32, "window": 32, "n_sink": 4}) as session:
        session.ingest(kv[:, :, :, :PROMPT].contiguous(), random_query(SMALL, 2, max(1, session.observation)))
        session.write_token(PROMPT, kv[:, 0, :, PROMPT], kv[:, 1, :, PROMPT])
        session.core.position += 1  # written, not announced: the host tier lacks it
        with pytest.raises(InvalidArgumentError, match="boundary.position"):
            session.attend(0, queries, 0.25)
        bad = session.core.boundary_request([0], attend=torch.zeros(1, SMALL.num_query_heads, 3, SMALL.head_dim + 1))
        with pytest.raises(InvalidArgumentError, match="boundary.attend"):
            session._stream_call(bad)
        bad = session.core.boundary_request([SMALL.num_layers], attend=queries[None])
        with pytest.raises(InvalidArgumentError, match="boundary.layers"):
            session._stream_call(bad)
        session.flush()
        out, _ = session.attend(1, queries, 0.25)
        want, _ = reference.attention_with_lse(queries, kv[1, 0, :, : PROMPT + 1], kv[1, 1, :, : PROMPT + 1], 0.25)
        torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)


DOCUMENT, QUESTION = 260, 30


@pytest.mark.model
@pytest.mark.parametrize("policy", ["louiskv", "quest"])
def test_an_exact_chunk_gives_full_attentions_logits_at_a_small_budget(smollm, client, policy):
    from kvrecall.eval.tasks import demo_sample
    from tests.integration.test_model_exactness import reference_run

    model, tokenizer = smollm
    sample = demo_sample(600, seed=5, tokenizer=tokenizer)
    prompt = tokenizer(sample.prompt, return_tensors="pt").input_ids[:, : DOCUMENT + QUESTION]
    tokens, logits = reference_run(model, prompt, 1)
    small = {"budget": 32, "window": 32, "n_sink": 4}
    diffs = {}
    for exact in (True, False):
        session, cache = open_model_session(client, model, policy, {**small, "exact_chunks": exact}, 400)
        with session:
            prefill(model, cache, prompt[:, :DOCUMENT])
            result = decode(model, cache, prompt[:, DOCUMENT:], 1, forced=tokens)
        diffs[exact] = float((result.logits[0] - logits[0]).abs().max())
    assert diffs[True] < 1e-4, diffs
    assert diffs[False] > 1e-2, diffs  # over 68 resident tokens of 260 the chunk is not exact
