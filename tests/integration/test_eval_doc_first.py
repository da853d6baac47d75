"""The eval's document-first path on the real model through the real daemon: the document is
the Runner's prefill (ingested alone), the question ONE chunk after it, then decoding. With a
budget that covers the sequence every policy must give full attention's logits."""

from __future__ import annotations

import pytest
import torch

from kvrecall.eval.tasks import document_first, make_sample
from tests.integration.test_model_exactness import reference_run

pytestmark = pytest.mark.model

STEPS = 6
COVERING = [
    ("full", None),
    ("snapkv", {"budget": 512}),
    ("quest", {"budget": 512}),
    ("louiskv", {"budget": 512}),
    ("windowkv", {"budget": 512}),
]


@pytest.fixture(scope="module")
def doc_first(smollm):
    """(document text, question ids [1, n], full attention's forced tokens and logits)."""
    model, tokenizer = smollm
    sample = document_first(make_sample("niah_single", 320, seed=2, tokenizer=tokenizer))
    document = sample.prompt[: sample.question_at]
    question = tokenizer(sample.prompt[sample.question_at :], add_special_tokens=False, return_tensors="pt").input_ids
    ids = torch.cat((tokenizer(document, return_tensors="pt").input_ids, question), dim=1)
    return document, question, *reference_run(model, ids, STEPS)


@pytest.mark.parametrize("policy,config", COVERING, ids=[f"{p}-{(c or {}).get('variant', '')}" for p, c in COVERING])
def test_doc_first_cell_with_a_covering_budget_is_full_attention(smollm, client, doc_first, policy, config):
    from kvrecall.eval.runner import Runner

    model, tokenizer = smollm
    document, question, tokens, logits = doc_first
    assert question.shape[1] > 20  # the question arrives as one multi-token chunk
    runner = Runner(model, tokenizer, client)
    prefill = runner.prefill(document)
    out = runner.decode_cell(prefill, policy, config, STEPS, forced=tokens, stop=False, question=question)
    assert out.tokens == tokens
    diff = max(float((a - b).abs().max()) for a, b in zip(logits, out.logits, strict=True))
    assert diff < 1e-4, f"{policy}: max |logit difference| {diff}"
