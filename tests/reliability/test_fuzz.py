"""Hypothesis fuzzing of every RPC's request messages against a live daemon.

Random field values, random shapes, random bytes in TensorRef.inline_data (NaN and inf
included), random shared-memory names and offsets, random event sequences on Decode streams.
Every call carries a deadline. Each answer must be a success or one of the statuses a bad
request earns — never INTERNAL, UNKNOWN or a deadline (a hang) — and the daemon stays healthy
with its pools back where they started. Bounded: the whole file runs in well under a minute.
"""

from __future__ import annotations

import collections
import os

import grpc
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvrecall.shm import ShmSegment, shm_name
from kvrecall.transport import inline_ref
from kvrecall.v1 import kvrecall_pb2 as pb
from tests.reliability.conftest import SPEC, Raw, open_request, random_kv

C = grpc.StatusCode
EXPECTED = {C.OK, C.INVALID_ARGUMENT, C.NOT_FOUND, C.FAILED_PRECONDITION, C.RESOURCE_EXHAUSTED, C.PERMISSION_DENIED}
TIMEOUT = 20.0  # generous for a loaded 2-core box; a hang still fails
L, H, HQ, D = SPEC.num_layers, SPEC.num_kv_heads, SPEC.num_query_heads, SPEC.head_dim
PROMPT = 48

# KVRECALL_FUZZ_EXAMPLES=2000 for a long local hunt; CI keeps the default.
FUZZ = settings(
    max_examples=int(os.environ.get("KVRECALL_FUZZ_EXAMPLES", "40")),
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

# ---- strategies -------------------------------------------------------------------------
u32 = st.one_of(st.integers(0, 8), st.integers(0, 600), st.sampled_from([2**31 - 1, 2**31, 2**32 - 1]), st.integers(0, 2**32 - 1))
u64 = st.one_of(st.integers(0, 1024), st.sampled_from([2**63, 2**64 - 1]), st.integers(0, 2**64 - 1))
printable = st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=40)
worker_ids = st.one_of(st.just("fuzz-worker"), st.just("other-worker"), st.just(""), printable)
dtypes = st.one_of(st.sampled_from([pb.DTYPE_FLOAT32, pb.DTYPE_FLOAT16, pb.DTYPE_BFLOAT16, pb.DTYPE_INT32, 0]),
                   st.integers(0, 2**31 - 1))
# shapes near the session layout, plus nonsense
dims = st.one_of(st.sampled_from([0, 1, 2, L, H, HQ, D, PROMPT, PROMPT + 1]), st.integers(0, 64), u64)
shapes = st.lists(dims, max_size=6)


def random_bytes(draw, n: int) -> bytes:
    """n random bytes (NaN, inf, denormals, anything once read as floats)."""
    if n <= 2048:
        return draw(st.binary(min_size=n, max_size=n))
    seed = draw(st.integers(0, 2**31))
    return torch.randint(0, 256, (n,), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed)).numpy().tobytes()


def nbytes_of(shape, dtype: int) -> int:
    n = 1
    for s in shape:
        n *= s
    return n * (2 if dtype in (pb.DTYPE_FLOAT16, pb.DTYPE_BFLOAT16) else 4)


@st.composite
def tensor_refs(draw, segment_names: list[str], exact_shape: tuple[int, ...] | None = None):
    """A TensorRef: half the time the right dtype and shape with random inline bytes (the
    content is what is fuzzed), else random dtype, shape and location."""
    if exact_shape is not None and draw(st.booleans()):
        shape = list(exact_shape)
        dtype = draw(st.sampled_from([pb.DTYPE_FLOAT32] * 9 + [pb.DTYPE_FLOAT16]))
        return pb.TensorRef(dtype=dtype, shape=shape, inline_data=random_bytes(draw, nbytes_of(shape, dtype)))
    shape = draw(shapes)
    dtype = draw(dtypes)
    ref = pb.TensorRef(dtype=dtype, shape=shape)
    where = draw(st.sampled_from(["inline", "inline", "shm", "cuda_ipc", "none"]))
    if where == "inline":
        exact = nbytes_of(shape, dtype)
        ref.inline_data = random_bytes(draw, exact) if exact <= 65536 and draw(st.booleans()) else \
            draw(st.binary(max_size=256))
    elif where == "shm":
        ref.shm.name = draw(st.one_of(st.sampled_from(segment_names), printable))
        ref.shm.offset = draw(st.one_of(st.sampled_from([0, 0, 4]), u64))
    elif where == "cuda_ipc":
        ref.cuda_ipc.handle = draw(st.binary(max_size=80))
        ref.cuda_ipc.offset = draw(u64)
        ref.cuda_ipc.device = draw(st.integers(-(2**31), 2**31 - 1))
    return ref


def sometimes(draw, valid, wild, p_wild: float = 0.25):
    """`valid` most of the time, a draw from `wild` otherwise."""
    return draw(wild) if draw(st.floats(0, 1)) < p_wild else valid


POLICIES = ["full", "streaming", "louiskv", "quest", "snapkv", "windowkv", "", "nope"]


@st.composite
def policy_configs(draw):
    name = draw(st.sampled_from(POLICIES))
    message = pb.PolicyConfig(name=name)
    which = draw(st.sampled_from([None, "full", "streaming", "louiskv", "quest", "snapkv", "windowkv", name]))
    if which in message.DESCRIPTOR.fields_by_name and which != "name":
        sub = getattr(message, which)
        sub.SetInParent()
        for f in sub.DESCRIPTOR.fields:
            if not draw(st.booleans()):
                continue
            if f.type == f.TYPE_FLOAT:
                setattr(sub, f.name, draw(st.floats(width=32, allow_nan=True, allow_infinity=True)))
            elif f.type == f.TYPE_BOOL:
                setattr(sub, f.name, draw(st.booleans()))
            elif f.type == f.TYPE_ENUM:
                setattr(sub, f.name, draw(st.integers(0, 5)))
            elif f.type == f.TYPE_STRING:
                setattr(sub, f.name, draw(st.one_of(st.sampled_from(["tokens", "units", ""]), st.text(max_size=16))))
            else:
                setattr(sub, f.name, draw(st.one_of(st.integers(0, 600), u32)))
    return message


VALID_CONFIGS = {
    "full": None,
    "streaming": {"n_sink": 2, "window": 32},
    "louiskv": {"budget": 16, "n_sink": 2, "window": 32, "cluster_size": 4},
    "quest": {"budget": 16, "n_sink": 2, "window": 32, "page_size": 4},
    "snapkv": {"budget": 16, "n_sink": 2, "window": 32, "observation": 4},
}


@st.composite
def open_requests(draw):
    """A valid OpenSession request with each field replaced by a random value now and then."""
    name = draw(st.sampled_from(sorted(VALID_CONFIGS)))
    request = open_request(SPEC, name, VALID_CONFIGS[name], pb.TRANSPORT_SHM, "fuzz-worker")
    request.transport = draw(st.sampled_from([pb.TRANSPORT_SHM, pb.TRANSPORT_INLINE]))
    lay = request.layout
    lay.num_layers = sometimes(draw, lay.num_layers, st.one_of(st.integers(0, 3), u32))
    lay.num_kv_heads = sometimes(draw, lay.num_kv_heads, st.one_of(st.integers(0, 3), u32))
    lay.num_query_heads = sometimes(draw, lay.num_query_heads, st.one_of(st.integers(0, 6), u32))
    lay.head_dim = sometimes(draw, lay.head_dim, st.one_of(st.sampled_from([0, 1, 8, 1024, 1025]), u32))
    lay.dtype = sometimes(draw, lay.dtype, dtypes)
    lay.max_tokens = sometimes(draw, lay.max_tokens, st.one_of(st.integers(0, 700), u32))
    request.worker_id = sometimes(draw, request.worker_id, worker_ids, 0.1)
    request.transport = sometimes(draw, request.transport, st.integers(0, 5), 0.1)
    request.lease_seconds = sometimes(draw, 0, st.one_of(st.integers(0, 60), u32), 0.2)
    request.tp_size = sometimes(draw, 0, u32, 0.1)
    request.tp_rank = sometimes(draw, 0, u32, 0.1)
    request.tag = sometimes(draw, "", st.text(max_size=300), 0.2)
    if draw(st.floats(0, 1)) < 0.3:
        request.policy.CopyFrom(draw(policy_configs()))
    if not draw(st.integers(0, 19)):
        request.ClearField("layout")
    if not draw(st.integers(0, 19)):
        request.ClearField("policy")
    return request


# ---- fixtures ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def fuzz(rdaemon, raw):
    """A baseline, a staging segment, and a few long-lived sessions the fuzzers aim at."""
    baseline = raw.pools()
    kv = random_kv(SPEC, PROMPT, seed=1)
    nbytes = kv.numel() * 4
    staging = ShmSegment.create(shm_name("stage"), nbytes)
    staging.tensor[:nbytes].view(torch.float32).copy_(kv.view(-1))
    tiny = ShmSegment.create(shm_name("stage"), 8)
    r = Raw(rdaemon.target, worker="fuzz-worker")
    sessions = []
    for name, config, transport, worker in (
        ("full", None, pb.TRANSPORT_SHM, "fuzz-worker"),
        ("louiskv", {"budget": 16, "n_sink": 2, "window": 32, "cluster_size": 4}, pb.TRANSPORT_INLINE, "fuzz-worker"),
        ("streaming", {"n_sink": 2, "window": 32}, pb.TRANSPORT_SHM, "other-worker"),
    ):
        request = open_request(SPEC, name, config, transport, worker, lease=3600)  # outlive a long hunt
        response = r.ok("OpenSession", request, worker=worker)
        sessions.append((response.session_id, worker))
    state = {"raw": r, "baseline": baseline, "staging": staging, "kv": kv,
             "segments": [staging.name, tiny.name, "kvrecall-none", "", "..", "a/b"],
             "sessions": sessions, "opened": []}
    yield state
    for session_id, worker in sessions + state["opened"]:
        r.call("CloseSession", pb.CloseSessionRequest(session_id=session_id), worker=worker)
    staging.release()
    tiny.release()
    r.close()


SEEN: collections.Counter = collections.Counter()  # (what, code) -> count, printed at the end
DETAILS: collections.Counter = collections.Counter()


def check(answer, what) -> None:
    SEEN[(what, answer.code.name)] += 1
    if os.environ.get("KVRECALL_FUZZ_VERBOSE"):
        DETAILS[(what, answer.code.name, answer.details.split(":")[0])] += 1
    assert answer.code in EXPECTED, f"{what}: {answer.code.name}: {answer.details}"
    if answer.code not in (C.OK,):
        assert answer.details, f"{what}: {answer.code.name} without a message"


def session_ids(fuzz):
    return st.one_of(st.sampled_from([s for s, _ in fuzz["sessions"]]), st.just(""), printable,
                     st.just("s-0000000000000000"))


# ---- the fuzzers -----------------------------------------------------------------------------
def test_fuzz_open_session(fuzz):
    r = fuzz["raw"]

    @FUZZ
    @given(request=open_requests(), worker=worker_ids)
    def run(request, worker):
        answer = r.call("OpenSession", request, worker=worker, timeout=TIMEOUT)
        check(answer, "OpenSession")
        if answer.code == C.OK:
            closed = r.call("CloseSession", pb.CloseSessionRequest(session_id=answer.response.session_id),
                            worker=request.worker_id, timeout=TIMEOUT)
            assert closed.code == C.OK, closed.details

    run()


def _fresh_session(r, policy: str, transport: int) -> str:
    request = open_request(SPEC, policy, VALID_CONFIGS[policy], transport, "fuzz-worker")
    return r.ok("OpenSession", request, timeout=TIMEOUT).session_id


POLICY_NAMES = sorted(VALID_CONFIGS)
TRANSPORTS = [pb.TRANSPORT_SHM, pb.TRANSPORT_INLINE]


def test_fuzz_ingest_prompt(fuzz):
    r = fuzz["raw"]
    segments = fuzz["segments"]
    staging = fuzz["staging"].name
    kv_shape = (L, 2, H, PROMPT, D)

    @FUZZ
    @given(data=st.data(), policy=st.sampled_from(POLICY_NAMES), transport=st.sampled_from(TRANSPORTS))
    def run(data, policy, transport):
        session_id = _fresh_session(r, policy, transport)
        try:
            request = pb.IngestPromptRequest(
                session_id=sometimes(data.draw, session_id, session_ids(fuzz), 0.1),
                num_tokens=sometimes(data.draw, PROMPT, st.one_of(st.integers(0, PROMPT + 2), u32), 0.15),
            )
            if transport == pb.TRANSPORT_SHM and data.draw(st.integers(0, 3)) == 0:
                ref = pb.TensorRef(dtype=pb.DTYPE_FLOAT32, shape=kv_shape, shm=pb.ShmRef(name=staging))
            else:
                ref = data.draw(tensor_refs(segments, kv_shape))
            if data.draw(st.integers(0, 19)):
                request.kv.CopyFrom(ref)
            if data.draw(st.booleans()):
                request.queries.CopyFrom(data.draw(tensor_refs(segments, (L, HQ, data.draw(st.integers(0, 4)), D))))
            check(r.call("IngestPrompt", request, timeout=TIMEOUT), "IngestPrompt")
            # whatever happened, the session answers a valid append (or says why not) and a boundary
            requests = [_append(session_id, PROMPT + 1, transport), _boundary(session_id, PROMPT + 1, transport)]
            _, answer = r.stream(requests, timeout=TIMEOUT)
            check(answer, "Decode after fuzzed ingest")
        finally:
            closed = r.call("CloseSession", pb.CloseSessionRequest(session_id=session_id), timeout=TIMEOUT)
            assert closed.code == C.OK, closed.details

    run()


def _append(session_id: str, upto: int, transport: int, n: int = 1, seq: int = 1) -> pb.DecodeRequest:
    request = pb.DecodeRequest(seq=seq, session_id=session_id)
    request.append.upto = upto
    if transport == pb.TRANSPORT_INLINE:
        request.append.kv.CopyFrom(inline_ref(torch.randn(L, 2, H, n, D)))
    return request


def _boundary(session_id: str, position: int, transport: int, seq: int = 2) -> pb.DecodeRequest:
    request = pb.DecodeRequest(seq=seq, session_id=session_id)
    request.boundary.position = position
    if transport == pb.TRANSPORT_INLINE:
        request.boundary.query.CopyFrom(inline_ref(torch.randn(L, HQ, D)))
    return request


def test_fuzz_decode_stream(fuzz):
    """Mostly valid event sequences (appends of 1..16 tokens, boundaries at the right position)
    with random bytes as K/V and queries, and a random field now and then."""
    r = fuzz["raw"]
    segments = fuzz["segments"]
    kv = fuzz["kv"]

    @st.composite
    def streams(draw, session_id: str, transport: int):
        requests = []
        position = PROMPT
        for seq in range(1, draw(st.integers(1, 8)) + 1):
            request = pb.DecodeRequest(seq=sometimes(draw, seq, u64, 0.1),
                                       session_id=sometimes(draw, session_id, session_ids(fuzz), 0.1))
            kind = draw(st.sampled_from(["append"] * 4 + ["boundary"] * 4 + ["none"]))
            if kind == "append":
                n = draw(st.integers(1, 16))
                request.append.upto = sometimes(draw, position + n, st.one_of(st.integers(0, PROMPT + 40), u32), 0.15)
                if transport == pb.TRANSPORT_INLINE or draw(st.integers(0, 9)) == 0:
                    request.append.kv.CopyFrom(draw(tensor_refs(segments, (L, 2, H, n, D))))
                position += n
            elif kind == "boundary":
                request.boundary.position = sometimes(draw, position, st.one_of(st.integers(0, PROMPT + 40), u32), 0.15)
                request.boundary.layers.extend(
                    sometimes(draw, [], st.lists(st.one_of(st.integers(0, L), u32), max_size=4), 0.4))
                if transport == pb.TRANSPORT_INLINE or draw(st.integers(0, 9)) == 0:
                    request.boundary.query.CopyFrom(draw(tensor_refs(segments, (L, HQ, D))))
            requests.append(request)
        return requests

    @FUZZ
    @given(data=st.data(), policy=st.sampled_from(POLICY_NAMES), transport=st.sampled_from(TRANSPORTS),
           worker=st.sampled_from(["fuzz-worker"] * 5 + ["other-worker"]))
    def run(data, policy, transport, worker):
        session_id = _fresh_session(r, policy, transport)
        try:
            ingest = pb.IngestPromptRequest(session_id=session_id, num_tokens=PROMPT)
            ingest.kv.CopyFrom(inline_ref(kv))
            ingest.queries.CopyFrom(inline_ref(torch.randn(L, HQ, 4, D)))
            if data.draw(st.integers(0, 9)):
                r.ok("IngestPrompt", ingest, timeout=TIMEOUT)
            requests = data.draw(streams(session_id, transport))
            responses, answer = r.stream(requests, worker=worker, timeout=TIMEOUT)
            check(answer, "Decode")
            assert len(responses) <= len(requests)
            for request, response in zip(requests, responses, strict=False):
                assert response.seq == request.seq
            # the stream's end (or error) did not kill the session: it answers a keep-alive
            alive = r.call("KeepAlive", pb.KeepAliveRequest(session_id=session_id), timeout=TIMEOUT)
            assert alive.code == C.OK, alive.details
        finally:
            closed = r.call("CloseSession", pb.CloseSessionRequest(session_id=session_id), timeout=TIMEOUT)
            assert closed.code == C.OK, closed.details

    run()


def test_fuzz_unary_session_calls(fuzz):
    r = fuzz["raw"]

    @FUZZ
    @given(data=st.data(), method=st.sampled_from(["KeepAlive", "GetStats", "CloseSession"]), worker=worker_ids)
    def run(data, method, worker):
        session_id = data.draw(session_ids(fuzz))
        if method == "CloseSession" and session_id in {s for s, _ in fuzz["sessions"]}:
            session_id += "-not"  # keep the long-lived sessions open
        request = {"KeepAlive": pb.KeepAliveRequest, "GetStats": pb.StatsRequest,
                   "CloseSession": pb.CloseSessionRequest}[method](session_id=session_id)
        check(r.call(method, request, worker=worker, timeout=TIMEOUT), method)

    run()


def test_fuzz_raw_bytes_on_every_rpc(fuzz):
    """Bytes that may not parse at all, on every RPC (Decode: a stream of one to three):
    INVALID_ARGUMENT for what does not parse, never INTERNAL. A long run over mutations of
    valid messages: scripts/reliability_fuzz.py."""
    r = fuzz["raw"]

    @FUZZ
    @given(method=st.sampled_from(["OpenSession", "IngestPrompt", "Decode", "KeepAlive", "CloseSession", "GetStats"]),
           payloads=st.lists(st.binary(max_size=64), min_size=1, max_size=3))
    def run(method, payloads):
        if method == "Decode":
            _, answer = r.stream(payloads, timeout=TIMEOUT)
        else:
            answer = r.call(method, payloads[0], timeout=TIMEOUT)
            if answer.code == C.OK and method == "OpenSession":  # bytes that parse to a valid request
                opened = pb.OpenSessionResponse.FromString(answer.response)
                r.ok("CloseSession", pb.CloseSessionRequest(session_id=opened.session_id, capability=opened.capability))
        check(answer, f"{method} (raw bytes)")

    run()


def test_daemon_healthy_after_fuzzing(fuzz, rdaemon):
    r = fuzz["raw"]
    assert r.health() == "SERVING"
    log = rdaemon.log()
    assert "internal error" not in log and "Traceback" not in log, log[-4000:]
    for session_id, worker in fuzz["sessions"]:
        assert r.call("KeepAlive", pb.KeepAliveRequest(session_id=session_id), worker=worker).code == C.OK
        assert r.call("CloseSession", pb.CloseSessionRequest(session_id=session_id), worker=worker).code == C.OK
    fuzz["sessions"].clear()
    assert r.pools() == fuzz["baseline"]
    print("fuzz answers:", dict(sorted(SEEN.items())))
    for key, count in sorted(DETAILS.items()):
        print(count, key)
