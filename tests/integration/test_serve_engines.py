"""The serving worker's decode engines against a real daemon, in process (tiny random models,
no HTTP): continuous batching decodes every request as it would alone and, with covering
budgets, as full KV does; the queue is bounded; models the batched engine cannot run are
served one request at a time."""

from __future__ import annotations

import asyncio
import dataclasses

import pytest
import torch

from kvrecall.cli import build_parser
from kvrecall.client import KVRecallClient
from kvrecall.demo import budget_config
from kvrecall.models.pretrained import LoadedModel
from kvrecall.serve.batched import BatchedEngine, unbatchable
from kvrecall.serve.generation import GenerationRequest, GenerationStats
from kvrecall.serve.protocol import RequestError
from kvrecall.serve.serial import SerialEngine

transformers = pytest.importorskip("transformers")

WINDOW = 256
# (policy, budget): budgets past the sequence cover it (the worker caps them at the session).
COVERING = [("full", None), ("louiskv", 512), ("quest", 512), ("windowkv", 512)]
# Budgets far below the prompts: retrieval decides what attention sees.
TIGHT = [("louiskv", 8), ("quest", 8), ("windowkv", 8), ("streaming", 32)]
PROMPTS = (40, 57, 75, 90)


def tiny(kind: str = "llama", **overrides) -> LoadedModel:
    config_class = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config}[kind]
    config = config_class(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, rope_theta=10000.0, **overrides,
    )  # fmt: skip
    torch.manual_seed(0)
    model_class = {"llama": transformers.LlamaForCausalLM, "qwen2": transformers.Qwen2ForCausalLM}[kind]
    model = model_class(config).eval()
    return LoadedModel(model, None, f"tiny-{kind}", WINDOW, frozenset())


@pytest.fixture(scope="module")
def llama() -> LoadedModel:
    return tiny()


@pytest.fixture
def client(daemon):
    with KVRecallClient(daemon.target, "serve-engine-test", timeout=30.0) as c:
        yield c


def requests(picks, max_tokens: int = 12) -> list[GenerationRequest]:
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 128, (n,), generator=g).tolist() for n in PROMPTS]
    return [
        GenerationRequest(prompt, max_tokens, policy, budget_config(policy, budget))
        for (policy, budget), prompt in zip(picks, prompts, strict=False)
    ]


async def generate(engine, request: GenerationRequest) -> tuple[list[int], str, GenerationStats]:
    """(tokens, finish reason, stats) of one request."""
    generation = await engine.start(request)
    tokens = [token async for token in generation]
    return tokens, generation.finish_reason, generation.stats


def together(engine, batch: list[GenerationRequest]):
    async def run():
        return await asyncio.gather(*(generate(engine, r) for r in batch))

    return asyncio.run(run())


def alone(engine, batch: list[GenerationRequest]):
    return [asyncio.run(generate(engine, r)) for r in batch]


def full_kv_tokens(client, llama, batch: list[GenerationRequest]) -> list[list[int]]:
    """Each request's tokens with full KV through the transformers path, one at a time."""
    serial = SerialEngine(llama, client, "cpu", max_queue=len(batch))
    try:
        full = alone(serial, [dataclasses.replace(r, policy="full", policy_config=None) for r in batch])
    finally:
        serial.close()
    return [tokens for tokens, _, _ in full]


@pytest.mark.parametrize("picks", [COVERING, TIGHT], ids=["covering", "tight"])
def test_a_batch_decodes_each_request_as_alone(client, llama, picks):
    """Four requests of four policies in one batch: each gets the tokens it gets alone; with
    covering budgets, the tokens of full KV through the transformers path too."""
    batch = requests(picks)
    engine = BatchedEngine(llama, client, slots=4, max_queue=4, max_model_len=WINDOW)
    try:
        shared = together(engine, batch)
        single = alone(engine, batch)
    finally:
        engine.close()
    for (policy, _), (tokens, reason, stats), (alone_tokens, _, alone_stats) in zip(
        picks, shared, single, strict=True
    ):
        assert (len(tokens), reason) == (12, "length"), policy
        assert tokens == alone_tokens, policy
        assert (stats.max_batch, alone_stats.max_batch) == (4, 1), policy
        assert stats.retrievals == alone_stats.retrievals, policy
    quest = next(stats for (policy, _), (_, _, stats) in zip(picks, shared, strict=True) if policy == "quest")
    assert quest.retrievals >= 11, "quest retrieves after every step"
    if picks is COVERING:
        assert [tokens for tokens, _, _ in shared] == full_kv_tokens(client, llama, batch)
    else:
        assert shared[0][2].retrievals >= 1, "louiskv never retrieved: the tight budgets test nothing"


@pytest.mark.parametrize(("lag", "overlap", "overlapped", "switch"),
                         [(7, True, True, "fixed"), (3, False, False, "fixed"), (0, True, False, "fixed"),
                          (4, True, True, "patient"), (4, True, True, "adaptive")])  # fmt: skip
def test_the_lag_and_overlap_reach_the_engine_and_a_covering_budget_stays_exact(
    client, llama, lag, overlap, overlapped, switch
):
    """--lag, --overlap and --switch: the batched engine decodes with them (overlap, the default,
    needs a lag of at least 1: at lag 0 it runs without); with covering budgets the tokens are
    full KV's whatever the lag and switch, with or without overlap."""
    batch = requests(COVERING)[:2]
    engine = BatchedEngine(llama, client, slots=2, max_queue=2, max_model_len=WINDOW, lag=lag, overlap=overlap,
                           switch=switch)  # fmt: skip
    try:
        assert (engine.engine.lag, engine.engine.overlap, engine.engine.switch) == (lag, overlapped, switch)
        shared = together(engine, batch)
    finally:
        engine.close()
    assert [tokens for tokens, _, _ in shared] == full_kv_tokens(client, llama, batch)


def test_overlap_is_the_serve_default():
    args = build_parser().parse_args(["worker", "--serve", "--target", "localhost:1"])
    assert (args.overlap, args.lag, args.switch) == ("on", None, "fixed")
    for switch in ("patient", "adaptive"):
        assert build_parser().parse_args(["worker", "--serve", "--target", "localhost:1", "--switch", switch]).switch == switch
    assert build_parser().parse_args(["worker", "--serve", "--target", "localhost:1", "--overlap", "off"]).overlap == "off"


def test_eos_and_max_tokens_end_a_request_and_free_its_slot(client, llama):
    """An EOS token ends its request ("stop", the EOS not handed out) while the others in the
    batch go on; max_tokens=1 is the prefill's token alone."""
    first = requests(COVERING)[0]
    engine = BatchedEngine(llama, client, slots=2, max_queue=4, max_model_len=WINDOW)
    try:
        (reference, _, _), = alone(engine, [first])
        eos = reference[5]
        stopping = BatchedEngine(dataclasses.replace(llama, eos_token_ids=frozenset({eos})), client,
                                 slots=2, max_queue=4, max_model_len=WINDOW)  # fmt: skip
        try:
            (cut, reason, _), (one, one_reason, _) = together(
                stopping, [first, dataclasses.replace(requests(COVERING)[1], max_tokens=1)]
            )
            assert stopping.load() == {"slots": 2, "running": 0, "waiting": 0}
        finally:
            stopping.close()
    finally:
        engine.close()
    assert (cut, reason) == (reference[: reference.index(eos)], "stop")
    assert (len(one), one_reason) == (1, "length")


def test_the_queue_is_bounded_and_a_request_that_leaves_it_is_dropped(client, llama):
    """One slot, a queue of one: a third request is refused with a 503; a waiting request
    whose client leaves leaves the queue; the worker then serves the next one."""
    engine = BatchedEngine(llama, client, slots=1, max_queue=1, max_model_len=WINDOW)
    long, short = requests(COVERING[:2], max_tokens=200)

    async def scenario():
        running = await engine.start(long)
        waiting = asyncio.create_task(engine.start(short))
        await asyncio.sleep(0.1)  # the waiting request is in the queue
        assert engine.load() == {"slots": 1, "running": 1, "waiting": 1}
        with pytest.raises(RequestError) as refused:
            await engine.start(short)
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        assert engine.load()["waiting"] == 0
        running.cancel()
        assert len([t async for t in running]) < 200 and running.finish_reason == "cancelled"
        return refused.value, await generate(engine, dataclasses.replace(short, max_tokens=3))

    try:
        refused, (tokens, reason, _) = asyncio.run(scenario())
    finally:
        engine.close()
    assert (refused.status, refused.code) == (503, "overloaded")
    assert (len(tokens), reason) == (3, "length")


def test_daemon_refusals_reach_the_request(client, llama):
    """An unknown policy fails the request at start; the engine serves the next one."""
    engine = BatchedEngine(llama, client, slots=2, max_queue=2, max_model_len=WINDOW)
    bad, good = requests(COVERING[:2], max_tokens=2)
    try:
        with pytest.raises(Exception, match="policy"):
            asyncio.run(generate(engine, dataclasses.replace(bad, policy="nope")))
        (tokens, _, _), = alone(engine, [good])
    finally:
        engine.close()
    assert len(tokens) == 2


def test_models_the_engine_cannot_run_are_served_one_at_a_time(client):
    """A Qwen2 model (attention biases) is not batchable; SerialEngine decodes it, and two
    concurrent requests each get what they get alone."""
    assert unbatchable(tiny().model) is None
    assert "biases" in unbatchable(tiny(attention_bias=True).model)
    qwen = tiny("qwen2")
    assert "qwen2" in unbatchable(qwen.model)
    batch = requests(COVERING)[:2]
    serial = SerialEngine(qwen, client, "cpu", max_queue=2)
    try:
        shared = together(serial, batch)
        single = alone(serial, batch)
    finally:
        serial.close()
    assert [s[0] for s in shared] == [s[0] for s in single]
    assert all(len(tokens) == 12 for tokens, _, _ in shared)
