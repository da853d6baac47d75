"""Bad input to the streamed ingest and to chunks: each request is wrong in one way, gets a
status naming the field, and the session and the daemon carry on (a valid ingest / chunk
then works and every byte comes back on close). Real daemon, real gRPC, no mocks."""

from __future__ import annotations

import grpc
import pytest
import torch

from kvrecall.transport import inline_ref
from kvrecall.v1 import kvrecall_pb2 as pb
from tests.reliability.conftest import SPEC, open_request, random_kv

C = grpc.StatusCode
L, H, HQ, D = SPEC.num_layers, SPEC.num_kv_heads, SPEC.num_query_heads, SPEC.head_dim
PROMPT = 40
NEAR_MAX = 64  # max_tokens of the near_max session
CAPABILITIES: dict[str, str] = {}  # session id -> its capability (every call presents it)


def ingest(session_id: str, first_layer: int, layers: int, tokens: int = PROMPT, seed: int = 0) -> pb.IngestPromptRequest:
    """Layers [first_layer, first_layer + layers) of a random prompt (layer data: layer 0's
    onward, whatever first_layer says)."""
    kv = random_kv(SPEC, tokens, seed)[:layers]
    request = pb.IngestPromptRequest(
        session_id=session_id, capability=CAPABILITIES[session_id], num_tokens=tokens, first_layer=first_layer
    )
    request.kv.CopyFrom(inline_ref(kv.contiguous()))
    return request


def chunk(session_id: str, start: int, kv: torch.Tensor | None, seq: int = 1) -> pb.DecodeRequest:
    request = pb.DecodeRequest(seq=seq, session_id=session_id, capability=CAPABILITIES[session_id])
    request.chunk.start = start
    if kv is not None:
        request.chunk.kv.CopyFrom(inline_ref(kv))
    return request


def boundary_queries(session_id: str, position: int, layers: list[int], queries: torch.Tensor) -> pb.DecodeRequest:
    request = pb.DecodeRequest(seq=1, session_id=session_id, capability=CAPABILITIES[session_id])
    request.boundary.position = position
    request.boundary.layers.extend(layers)
    request.boundary.queries.CopyFrom(inline_ref(queries))
    return request


def opened_id(raw, request) -> str:
    answer = raw.ok("OpenSession", request)
    CAPABILITIES[answer.session_id] = answer.capability
    return answer.session_id


@pytest.fixture(scope="module")
def sessions(raw):
    baseline = raw.pools()
    near = SPEC.__class__(**{**SPEC.__dict__, "max_tokens": NEAR_MAX})
    opened = {
        "fresh": opened_id(raw, open_request(transport=pb.TRANSPORT_INLINE)),
        "half": opened_id(raw, open_request(transport=pb.TRANSPORT_INLINE)),
        "ingested": opened_id(raw, open_request(policy="louiskv", config={"budget": 32, "n_sink": 4, "window": 32},
                                                       transport=pb.TRANSPORT_INLINE)),
        "near_max": opened_id(raw, open_request(spec=near, transport=pb.TRANSPORT_INLINE)),
    }
    raw.ok("IngestPrompt", ingest(opened["half"], 0, 1))  # layer 0 of 2 only
    raw.ok("IngestPrompt", ingest(opened["ingested"], 0, L))
    raw.ok("IngestPrompt", ingest(opened["near_max"], 0, L, tokens=60))
    yield opened, baseline
    for session_id in opened.values():
        raw.call("CloseSession", pb.CloseSessionRequest(session_id=session_id, capability=CAPABILITIES[session_id]))


INGEST_CASES = [
    ("first-layer-out-of-range", lambda s: ingest(s["fresh"], L, 1), C.INVALID_ARGUMENT, ("first_layer", "num_layers")),
    ("layers-past-num-layers", lambda s: ingest(s["fresh"], 1, L), C.INVALID_ARGUMENT, ("kv.shape", "num_layers")),
    ("first-layer-skips", lambda s: ingest(s["fresh"], 1, 1), C.INVALID_ARGUMENT, ("first_layer", "skips")),
    ("layer-duplicated", lambda s: ingest(s["half"], 0, 1), C.INVALID_ARGUMENT, ("first_layer", "already")),
    ("num-tokens-changes", lambda s: ingest(s["half"], 1, 1, tokens=PROMPT + 1), C.INVALID_ARGUMENT, ("num_tokens",)),
    ("ingest-after-complete", lambda s: ingest(s["ingested"], 0, 1), C.FAILED_PRECONDITION, ("already ingested",)),
]

DECODE_CASES = [
    ("chunk-before-ingest", lambda s: chunk(s["fresh"], 0, torch.zeros(L, 2, H, 4, D)), C.FAILED_PRECONDITION,
     ("chunk", "IngestPrompt")),
    ("chunk-during-streamed-ingest", lambda s: chunk(s["half"], PROMPT, torch.zeros(L, 2, H, 4, D)),
     C.FAILED_PRECONDITION, ("chunk", "IngestPrompt")),
    ("chunk-kv-missing", lambda s: chunk(s["ingested"], PROMPT, None), C.INVALID_ARGUMENT, ("chunk.kv", "required")),
    ("chunk-kv-wrong-heads", lambda s: chunk(s["ingested"], PROMPT, torch.zeros(L, 2, H + 1, 4, D)),
     C.INVALID_ARGUMENT, ("chunk.kv.shape",)),
    ("chunk-kv-wrong-layers", lambda s: chunk(s["ingested"], PROMPT, torch.zeros(L + 1, 2, H, 4, D)),
     C.INVALID_ARGUMENT, ("chunk.kv.shape",)),
    ("chunk-kv-dtype", lambda s: chunk(s["ingested"], PROMPT, torch.zeros(L, 2, H, 4, D, dtype=torch.float16)),
     C.INVALID_ARGUMENT, ("chunk.kv.dtype",)),
    ("chunk-overruns-max-tokens", lambda s: chunk(s["near_max"], 60, torch.zeros(L, 2, H, 8, D)),
     C.INVALID_ARGUMENT, ("chunk.kv.shape", "max_tokens")),
    ("chunk-start-ahead", lambda s: chunk(s["ingested"], PROMPT + 3, torch.zeros(L, 2, H, 4, D)),
     C.INVALID_ARGUMENT, ("chunk.start",)),
    ("chunk-start-uint-overflow", lambda s: chunk(s["ingested"], 2**32 - 1, torch.zeros(L, 2, H, 4, D)),
     C.INVALID_ARGUMENT, ("chunk",)),
    ("boundary-queries-rows", lambda s: boundary_queries(s["ingested"], PROMPT, [0], torch.zeros(L, HQ, 3, D)),
     C.INVALID_ARGUMENT, ("boundary.queries.shape",)),
    ("boundary-queries-heads", lambda s: boundary_queries(s["ingested"], PROMPT, [], torch.zeros(L, HQ + 1, 3, D)),
     C.INVALID_ARGUMENT, ("boundary.queries.shape",)),
]


@pytest.mark.parametrize("case", INGEST_CASES, ids=[c[0] for c in INGEST_CASES])
def test_bad_streamed_ingest(raw, sessions, case):
    _, build, code, needles = case
    answer = raw.call("IngestPrompt", build(sessions[0]))
    assert answer.code == code, f"{answer.code.name}: {answer.details}"
    for needle in needles:
        assert needle in answer.details, (needle, answer.details)


@pytest.mark.parametrize("case", DECODE_CASES, ids=[c[0] for c in DECODE_CASES])
def test_bad_chunk(raw, sessions, case):
    _, build, code, needles = case
    responses, answer = raw.stream([build(sessions[0])])
    assert not responses
    assert answer.code == code, f"{answer.code.name}: {answer.details}"
    for needle in needles:
        assert needle in answer.details, (needle, answer.details)


def test_sessions_carry_on_and_return_every_byte(raw, sessions):
    opened, baseline = sessions
    # the half-ingested session takes its missing layer, then a chunk
    done = raw.ok("IngestPrompt", ingest(opened["half"], 1, 1))
    assert done.layers_done == L and done.host_tokens == PROMPT
    for name in ("half", "ingested"):
        kv = random_kv(SPEC, 6, seed=9)
        queries = boundary_queries(opened[name], PROMPT, [0], torch.randn(1, HQ, 3, D))
        responses, answer = raw.stream([queries, chunk(opened[name], PROMPT, kv, seq=2)])
        assert answer.code == C.OK, answer.details
        assert responses[-1].append.spilled_upto == PROMPT + 6
        stats = raw.ok("GetStats", pb.StatsRequest(session_id=opened[name], capability=CAPABILITIES[opened[name]])).sessions[0]
        assert stats.tokens == PROMPT + 6
    assert raw.health() == "SERVING"
    for session_id in opened.values():
        raw.ok("CloseSession", pb.CloseSessionRequest(session_id=session_id, capability=CAPABILITIES[session_id]))
    opened.clear()
    assert raw.pools() == baseline
