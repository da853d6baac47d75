"""The engine on a GPU: sessions of a CUDA daemon mapped by CUDA IPC, the step captured as a
CUDA graph. The captured step equals the eager one and transformers' full attention (covering
budget, fp32), with the slot tables, tokens and flags moved by kernels inside the step (the
captured engine here) or by the copy engine (the eager one, the default); and with overlap
(each captured step launched before the host work of the one before, its tables staged)."""

from __future__ import annotations

import pytest
import torch

from kvrecall.client import KVRecallClient
from kvrecall.client.hf import spec_for
from kvrecall.engine import DecoderWeights, Engine
from kvrecall.local import LocalDaemon
from kvrecall.v1 import kvrecall_pb2 as pb
from tests.gpu import NO_WARMUP

pytestmark = pytest.mark.gpu
transformers = pytest.importorskip("transformers")
STEPS = 40  # over two AppendNotices (spill_every 16): one taken while decoding


@pytest.fixture(scope="module")
def gpu_daemon():
    with LocalDaemon(host_pool_gb=1.0, device_pool_gb=1.0, device="cuda:0", extra_args=NO_WARMUP) as d:
        yield d


@pytest.fixture(scope="module")
def tiny_llama():
    config = transformers.LlamaConfig(
        vocab_size=128, hidden_size=128, intermediate_size=256, num_hidden_layers=3, num_attention_heads=8,
        num_key_value_heads=2, max_position_embeddings=1024, rope_theta=10000.0,
    )  # fmt: skip
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).eval().cuda()


def run(client, model, use_graph: bool, picks, deferred: bool = False, host_copies: str = "copy", overlap=False):
    weights = DecoderWeights.from_hf(model)
    engine = Engine(weights, batch=len(picks), max_capacity=2048, use_graph=use_graph, host_copies=host_copies,
                    overlap=overlap, keep_logits=True)  # fmt: skip
    assert engine.backend.tables.step_uploads == (host_copies == "kernel")
    assert engine.graph.graphed == use_graph, engine.graph.error
    spec = spec_for(model, max_tokens=1024)
    sessions, slots, logits = [], [], []
    for policy, config, prompt in picks:
        session = client.open_session(spec, policy, config, device="cuda", deferred_eviction=deferred)
        assert session.transport == pb.TRANSPORT_CUDA_IPC and session.keys.is_cuda
        assert session.core.deferred == deferred
        sessions.append(session)
        slots.append(engine.add(session, prompt))
    for _ in range(STEPS):
        engine.step()
        logits.append(engine.logits.clone())
    seqs = [engine.remove(slot) for slot in slots]
    engine.close()
    for session in sessions:
        session.close()
    return seqs, torch.stack(logits, dim=1)


@pytest.mark.parametrize(("deferred", "overlap"), [(False, False), (True, False), (True, True)])
def test_captured_step_equals_eager_and_full_attention(gpu_daemon, tiny_llama, deferred, overlap):
    """With deferred eviction too: the daemon works on the working sets while steps run (the
    mask keeps what the step reads fixed), and the result is still exact; with overlap the host
    writes the slot tables while the step launched ahead may not have read its own."""
    g = torch.Generator().manual_seed(3)
    picks = [
        ("louiskv", {"budget": 512, "threshold": 0.9}, torch.randint(0, 128, (300,), generator=g).cuda()),
        ("quest", {"budget": 512, "page_size": 16}, torch.randint(0, 128, (211,), generator=g).cuda()),
        ("full", None, torch.randint(0, 128, (97,), generator=g).cuda()),
    ]
    with KVRecallClient(gpu_daemon.target, "engine-gpu") as client:
        eager, eager_logits = run(client, tiny_llama, False, picks, deferred, host_copies="copy")
        graphed, graph_logits = run(client, tiny_llama, True, picks, deferred,
                                    host_copies="copy" if overlap else "kernel", overlap=overlap)  # fmt: skip
    assert [s.tokens for s in eager] == [s.tokens for s in graphed]
    assert (eager_logits - graph_logits).abs().max().item() < 1e-5
    assert graphed[0].boundaries >= 1 and all(seq.appends >= 2 for seq in graphed)
    for (_, _, prompt), seq, logits in zip(picks, graphed, graph_logits, strict=True):
        tokens = torch.cat([prompt, torch.tensor(seq.tokens[:-1], device="cuda")])
        with torch.no_grad():
            expected = tiny_llama(tokens[None]).logits[0, len(prompt) :]
        assert (expected - logits).abs().max().item() < 1e-4
