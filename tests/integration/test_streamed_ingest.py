"""Streamed ingest: the prompt travels layer by layer, with one layer of staging at a time,
and gives the daemon the same working set as the whole prompt in one IngestPrompt."""

from __future__ import annotations

import pytest
import torch

from kvrecall.client import ModelSpec
from kvrecall.client.staging import STAGED, staged
from kvrecall.transport import inline_ref
from kvrecall.v1 import kvrecall_pb2 as pb
from tests.conftest import random_kv, random_query

SPEC = ModelSpec(num_layers=4, num_kv_heads=2, num_query_heads=4, head_dim=16, dtype=torch.float32, max_tokens=512)
PROMPT = 300
POLICIES = [
    ("full", None),
    ("streaming", {"n_sink": 4, "window": 64}),
    ("snapkv", {"budget": 64}),
    ("quest", {"budget": 64, "page_size": 8}),
    ("louiskv", {"budget": 64, "cluster_size": 8}),
    ("louiskv", {"budget": 64, "ingest_select": "units"}),
    ("windowkv", {"budget": 64, "group_size": 2}),
    ("windowkv", {"budget": 64, "group_size": 3, "keep_pruned_in_host": True}),
]


def layer_bytes(spec: ModelSpec, tokens: int) -> int:
    return 2 * spec.num_kv_heads * tokens * spec.head_dim * torch.empty((), dtype=spec.dtype).element_size()


def whole_prompt_ingest(client, session, kv: torch.Tensor, queries: torch.Tensor) -> None:
    """The pre-streaming path: every layer in one IngestPrompt (still accepted)."""
    request = session.core.ingest_request(kv.shape[3])
    with staged(kv, session.transport) as ref:
        request.kv.CopyFrom(ref)
        request.queries.CopyFrom(inline_ref(queries))
        response = client.call(client.stub.IngestPrompt, request)
    assert response.layers_done == kv.shape[0]
    session.core.position = session.core.noticed_upto = kv.shape[3]


def test_ingest_stages_one_layer_at_a_time(client):
    kv = random_kv(SPEC, PROMPT, seed=1)
    with client.open_session(SPEC, "louiskv", {"budget": 64}) as session:
        STAGED.reset()
        assert STAGED.now == 0
        response = session.ingest(kv, random_query(SPEC, 2, session.observation))
        assert response.layers_done == SPEC.num_layers and response.host_tokens == PROMPT
        assert STAGED.peak == layer_bytes(SPEC, PROMPT)  # one layer, never the whole prompt
        assert STAGED.now == 0
        assert session.stats().prompt_tokens == PROMPT


@pytest.mark.parametrize("policy,config", POLICIES, ids=[f"{p}-{i}" for i, (p, _) in enumerate(POLICIES)])
def test_streamed_ingest_equals_the_whole_prompt_call(client, policy, config):
    kv = random_kv(SPEC, PROMPT + 40, seed=3)
    with client.open_session(SPEC, policy, config) as streamed, client.open_session(SPEC, policy, config) as whole:
        queries = random_query(SPEC, 4, max(1, streamed.observation))
        streamed.ingest(kv[:, :, :, :PROMPT].contiguous(), queries)
        whole_prompt_ingest(client, whole, kv[:, :, :, :PROMPT].contiguous(), queries)
        for name in ("slot_pos", "keys", "values"):
            assert torch.equal(getattr(streamed, name), getattr(whole, name)), name
        assert streamed.stats().units == whole.stats().units
        for position in range(PROMPT, PROMPT + 40):  # and they decode alike
            for session in (streamed, whole):
                session.write_token(position, kv[:, 0, :, position], kv[:, 1, :, position])
                session.advance()
                if position % 13 == 0:
                    session.query.copy_(random_query(SPEC, position, 1)[:, :, 0])
                    session.boundary()
        for name in ("slot_pos", "keys", "values"):
            assert torch.equal(getattr(streamed, name), getattr(whole, name)), name


@pytest.fixture(scope="module")
def tiny_llama():
    """A randomly initialised 3-layer llama (no download): the worker-side path on CPU."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=1024,
    )
    return LlamaForCausalLM(config).eval()


def full_attention_logits(model, ids: torch.Tensor, steps: int) -> tuple[list[int], list[torch.Tensor]]:
    model.set_attn_implementation("sdpa")
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=steps, min_new_tokens=steps, do_sample=False, output_logits=True,
                             return_dict_in_generate=True)
    return out.sequences[0, ids.shape[1]:].tolist(), [step[0].float() for step in out.logits]


@pytest.mark.parametrize("policy,config,chunk,layer_major", [
    ("louiskv", {"budget": 256, "cluster_size": 8}, None, True),
    ("louiskv", {"budget": 256, "cluster_size": 8}, 70, True),  # layer by layer, in chunks of 70
    ("quest", {"budget": 256}, 10, True),
    ("windowkv", {"budget": 256}, 10, True),
    ("louiskv", {"budget": 256, "cluster_size": 8}, 70, False),  # an ingest, then chunks over the working set
    ("quest", {"budget": 256}, 70, False),
    ("snapkv", {"budget": 256}, 90, False),
    ("louiskv", {"budget": 256, "cluster_size": 8}, 10, False),  # a first chunk shorter than the 16 sinks
    ("quest", {"budget": 256}, 10, False),
    ("windowkv", {"budget": 256}, 10, False),
])
def test_model_prefill_streams_layers_and_stays_exact(client, tiny_llama, policy, config, chunk, layer_major):
    from kvrecall.worker import decode, open_model_session

    ids = torch.randint(0, 128, (1, 200), generator=torch.Generator().manual_seed(7))
    tokens, logits = full_attention_logits(tiny_llama, ids, 5)
    session, cache = open_model_session(
        client, tiny_llama, policy, config, 256, chunk_tokens=chunk, layer_major=layer_major
    )
    assert session.transport == pb.TRANSPORT_SHM  # spec_for recorded the model's device: cpu
    with session:
        STAGED.reset()
        result = decode(tiny_llama, cache, ids, 5, forced=tokens)
        spec = session.spec
        if layer_major or chunk is None:  # one layer of the whole prompt at a time, nothing more
            assert STAGED.peak == layer_bytes(spec, ids.shape[1])
            assert session.stats().prompt_tokens == ids.shape[1]
        else:  # the first chunk's layers, then each chunk's every layer
            assert STAGED.peak == max(layer_bytes(spec, chunk), spec.num_layers * layer_bytes(spec, chunk))
            assert session.stats().prompt_tokens == chunk
        assert STAGED.now == 0
    diff = max(float((a - b).abs().max()) for a, b in zip(logits, result.logits, strict=True))
    assert diff < 1e-4, diff
    assert result.tokens == tokens


@pytest.mark.parametrize("policy,config", [("louiskv", {"budget": 24, "cluster_size": 8}), ("quest", {"budget": 32})])
def test_layer_major_prefill_is_exact_whatever_the_budget(client, tiny_llama, policy, config):
    """Chunks of a fresh prompt attend over the layer's whole K/V so far: the prefill's logits
    are full attention's even when the budget covers a fraction of the prompt."""
    from kvrecall.client.hf import prefill
    from kvrecall.worker import open_model_session

    ids = torch.randint(0, 128, (1, 200), generator=torch.Generator().manual_seed(11))
    _, logits = full_attention_logits(tiny_llama, ids, 1)
    session, cache = open_model_session(client, tiny_llama, policy, config, 256, chunk_tokens=48)
    with session:
        got = prefill(tiny_llama, cache, ids)
        assert cache.ingested and cache.seq_length == ids.shape[1]
        assert session.stats().prompt_tokens == ids.shape[1]
    assert float((got - logits[0]).abs().max()) < 1e-4
