"""The bad-input catalogue: every RPC, every way a request can be wrong.

Each case sends one malformed request (or one Decode stream) over real gRPC to a real daemon
and asserts the exact status code and that the message names the offending field. After the
catalogue: the daemon is healthy, a session opened before it still works with its working
set unchanged, and the pools are back to their baseline.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field

import grpc
import pytest
import torch

from kvrecall.client import KVRecallClient
from kvrecall.local import LocalDaemon
from kvrecall.shm import ShmSegment, shm_name
from kvrecall.transport import inline_ref
from kvrecall.v1 import kvrecall_pb2 as pb
from tests.reliability.conftest import SPEC, Raw, open_request, random_kv

C = grpc.StatusCode
PROMPT = 100          # tokens ingested into the prepared sessions
NEAR_MAX = 64         # max_tokens of the session used for "past max_tokens"
L, H, HQ, D = SPEC.num_layers, SPEC.num_kv_heads, SPEC.num_query_heads, SPEC.head_dim


@dataclass
class Ctx:
    """Sessions and segments the cases point at (prepared once for the module)."""

    raw: Raw
    fresh: str = ""       # shm, full policy, not ingested
    ingested: str = ""    # shm, streaming, PROMPT tokens ingested
    inline: str = ""      # inline, full policy, PROMPT tokens ingested
    inline_fresh: str = ""  # inline, full policy, not ingested
    victim: str = ""      # shm, not ingested: for cases a faulty daemon would accept (keeps `fresh` fresh)
    near_max: str = ""    # shm, full policy, max_tokens=NEAR_MAX, 60 tokens ingested
    other: str = ""       # belongs to "other-worker"
    closed: str = ""      # opened then closed
    staging: ShmSegment | None = None  # holds a valid [L, 2, H, PROMPT, D] prompt
    tiny: ShmSegment | None = None     # 16 bytes
    daemon_segment: str = ""           # the name of one of the daemon's own segments
    symlink: str = ""                  # a /dev/shm name that is a symbolic link to a regular file
    segments: list = field(default_factory=list)

    def open_sessions(self) -> list[tuple[str, str | None]]:
        pairs = [(self.fresh, None), (self.ingested, None), (self.inline, None), (self.inline_fresh, None),
                 (self.victim, None), (self.near_max, None), (self.other, "other-worker")]
        return [(s, w) for s, w in pairs if s]


def kv_ref(tokens: int = PROMPT, dtype: int = pb.DTYPE_FLOAT32, shape: list[int] | None = None) -> pb.TensorRef:
    return pb.TensorRef(dtype=dtype, shape=shape if shape is not None else [L, 2, H, tokens, D])


def inline_kv(tokens: int = PROMPT, seed: int = 0) -> pb.TensorRef:
    return inline_ref(random_kv(SPEC, tokens, seed))


def shm_kv(ctx: Ctx, name: str | None = None, offset: int = 0, tokens: int = PROMPT) -> pb.TensorRef:
    ref = kv_ref(tokens)
    ref.shm.name = ctx.staging.name if name is None else name
    ref.shm.offset = offset
    return ref


def ingest(session_id: str, kv: pb.TensorRef | None = None, num_tokens: int = PROMPT,
           queries: pb.TensorRef | None = None) -> pb.IngestPromptRequest:
    request = pb.IngestPromptRequest(session_id=session_id, num_tokens=num_tokens)
    if kv is not None:
        request.kv.CopyFrom(kv)
    if queries is not None:
        request.queries.CopyFrom(queries)
    return request


def append(session_id: str, upto: int, seq: int = 1, kv: pb.TensorRef | None = None) -> pb.DecodeRequest:
    request = pb.DecodeRequest(seq=seq, session_id=session_id)
    request.append.upto = upto
    if kv is not None:
        request.append.kv.CopyFrom(kv)
    return request


def boundary(session_id: str, position: int, layers=(), query: pb.TensorRef | None = None,
             seq: int = 1) -> pb.DecodeRequest:
    request = pb.DecodeRequest(seq=seq, session_id=session_id)
    request.boundary.position = position
    request.boundary.layers.extend(layers)
    if query is not None:
        request.boundary.query.CopyFrom(query)
    return request


def with_capability(request, capability: str):
    request.capability = capability
    return request


def opening(**changes) -> Callable[[Ctx], pb.OpenSessionRequest]:
    """An OpenSession request with fields of the valid one replaced (layout.* for the layout)."""

    def build(ctx: Ctx) -> pb.OpenSessionRequest:
        request = open_request()
        for key, value in changes.items():
            if key == "clear":
                request.ClearField(value)
            elif key.startswith("layout_"):
                setattr(request.layout, key[len("layout_") :], value)
            elif key == "policy":
                request.policy.CopyFrom(value)
            else:
                setattr(request, key, value)
        return request

    return build


def policy(name: str, **config) -> pb.PolicyConfig:
    message = pb.PolicyConfig(name=name)
    for key, value in config.items():
        if key == "oneof":
            getattr(message, value).SetInParent()
        else:
            setattr(getattr(message, name), key, value)
    return message


@dataclass
class Case:
    id: str
    rpc: str                              # OpenSession | IngestPrompt | Decode | KeepAlive | CloseSession | GetStats
    build: Callable[[Ctx], object]        # the request (a list of DecodeRequests for Decode)
    code: grpc.StatusCode
    needles: tuple[str, ...]              # substrings the status message must contain
    worker: str | None = None             # metadata worker id (None = the default)
    answered: int = 0                     # Decode: answers expected before the error
    xfail: str = ""                       # a known gap (strict: passing means remove the marker)
    fill: bool = True                     # send the session's capability (Raw.fill) unless set


# Bytes that are no valid message: field 1 (a string in every request) claims 5 bytes, has 2.
UNDECODABLE = b"\x0a\x05ab"
# Field 1 as a string of invalid UTF-8 (proto3 strings must be UTF-8).
BAD_UTF8 = b"\x0a\x02\xff\xfe"


CASES = [
    # ---- OpenSession: identity, layout, policy, transport, lease, tags ----------------------
    Case("open-worker-id-missing", "OpenSession", opening(worker_id=""), C.INVALID_ARGUMENT, ("worker_id", "required")),
    Case("open-worker-id-bad-chars", "OpenSession", opening(worker_id="bad worker/../id"), C.INVALID_ARGUMENT, ("worker_id",)),
    Case("open-worker-id-too-long", "OpenSession", opening(worker_id="w" * 200), C.INVALID_ARGUMENT, ("worker_id",)),
    Case("open-layout-missing", "OpenSession", opening(clear="layout"), C.INVALID_ARGUMENT, ("layout", "required")),
    Case("open-layers-zero", "OpenSession", opening(layout_num_layers=0), C.INVALID_ARGUMENT, ("layout.num_layers",)),
    Case("open-layers-uint-overflow", "OpenSession", opening(layout_num_layers=2**32 - 1), C.INVALID_ARGUMENT, ("layout.num_layers",)),
    Case("open-kv-heads-zero", "OpenSession", opening(layout_num_kv_heads=0), C.INVALID_ARGUMENT, ("layout.num_kv_heads",)),
    Case("open-query-heads-not-multiple", "OpenSession", opening(layout_num_query_heads=3), C.INVALID_ARGUMENT, ("layout.num_query_heads", "multiple")),
    Case("open-head-dim-zero", "OpenSession", opening(layout_head_dim=0), C.INVALID_ARGUMENT, ("layout.head_dim",)),
    Case("open-head-dim-huge", "OpenSession", opening(layout_head_dim=4096), C.INVALID_ARGUMENT, ("layout.head_dim",)),
    Case("open-dtype-unspecified", "OpenSession", opening(layout_dtype=pb.DTYPE_UNSPECIFIED), C.INVALID_ARGUMENT, ("layout.dtype",)),
    Case("open-dtype-int32", "OpenSession", opening(layout_dtype=pb.DTYPE_INT32), C.INVALID_ARGUMENT, ("layout.dtype",)),
    Case("open-dtype-unknown-enum", "OpenSession", opening(layout_dtype=99), C.INVALID_ARGUMENT, ("layout.dtype",)),
    Case("open-max-tokens-zero", "OpenSession", opening(layout_max_tokens=0), C.INVALID_ARGUMENT, ("layout.max_tokens",)),
    Case("open-max-tokens-huge", "OpenSession", opening(layout_max_tokens=2**32 - 1), C.INVALID_ARGUMENT, ("layout.max_tokens",)),
    Case("open-pool-too-small", "OpenSession",
         opening(layout_num_layers=8, layout_num_kv_heads=8, layout_num_query_heads=8, layout_head_dim=128,
                 layout_max_tokens=200_000),
         C.RESOURCE_EXHAUSTED, ("pool", "free")),
    Case("open-token-larger-than-page", "OpenSession",
         opening(layout_num_layers=64, layout_num_kv_heads=64, layout_num_query_heads=64, layout_max_tokens=16),
         C.INVALID_ARGUMENT, ("layout", "page")),
    Case("open-policy-missing", "OpenSession", opening(clear="policy"), C.INVALID_ARGUMENT, ("policy", "required")),
    Case("open-policy-name-empty", "OpenSession", opening(policy=pb.PolicyConfig()), C.INVALID_ARGUMENT, ("policy.name", "required")),
    Case("open-policy-unknown", "OpenSession", opening(policy=policy("magic")), C.INVALID_ARGUMENT, ("policy.name", "magic")),
    Case("open-policy-config-mismatch", "OpenSession", opening(policy=policy("louiskv", oneof="streaming")),
         C.INVALID_ARGUMENT, ("policy.streaming",)),
    Case("open-policy-window-too-small", "OpenSession", opening(policy=policy("louiskv", window=8)),
         C.INVALID_ARGUMENT, ("policy.louiskv", "window")),
    Case("open-policy-budget-zero", "OpenSession", opening(policy=policy("quest", budget=0)),
         C.INVALID_ARGUMENT, ("policy.quest", "budget")),
    Case("open-policy-threshold-nan", "OpenSession", opening(policy=policy("louiskv", threshold=float("nan"))),
         C.INVALID_ARGUMENT, ("policy.louiskv", "threshold")),
    Case("open-transport-unspecified", "OpenSession", opening(transport=pb.TRANSPORT_UNSPECIFIED), C.INVALID_ARGUMENT, ("transport",)),
    Case("open-transport-unknown-enum", "OpenSession", opening(transport=42), C.INVALID_ARGUMENT, ("transport",)),
    Case("open-transport-cuda-ipc-on-cpu", "OpenSession", opening(transport=pb.TRANSPORT_CUDA_IPC), C.INVALID_ARGUMENT, ("transport", "CUDA")),
    Case("open-lease-uint-overflow", "OpenSession", opening(lease_seconds=2**32 - 1), C.INVALID_ARGUMENT, ("lease_seconds",)),
    Case("open-tp-rank-past-size", "OpenSession", opening(tp_size=2, tp_rank=2), C.INVALID_ARGUMENT, ("tp_rank",)),
    Case("open-tag-too-long", "OpenSession", opening(tag="x" * 300), C.INVALID_ARGUMENT, ("tag",)),
    Case("open-oversized-message", "OpenSession", opening(tag="x" * (2 << 20)), C.RESOURCE_EXHAUSTED, ("larger than max",)),
    Case("open-undecodable", "OpenSession", lambda c: UNDECODABLE, C.INVALID_ARGUMENT, ("request", "OpenSessionRequest")),
    Case("open-bad-utf8", "OpenSession", lambda c: BAD_UTF8, C.INVALID_ARGUMENT, ("request", "OpenSessionRequest")),
    # ---- OpenSession: policy sizes against the sequence (layout.max_tokens = 512) ----------
    *[Case(f"open-policy-{name}-budget-past-max-tokens", "OpenSession", opening(policy=policy(name, budget=513)),
           C.INVALID_ARGUMENT, (f"policy.{name}.budget", "max_tokens")) for name in ("louiskv", "quest", "snapkv", "windowkv")],
    Case("open-policy-n-sink-past-max-tokens", "OpenSession", opening(policy=policy("streaming", n_sink=600)),
         C.INVALID_ARGUMENT, ("policy.streaming.n_sink", "max_tokens")),
    Case("open-policy-window-past-max-tokens", "OpenSession", opening(policy=policy("louiskv", window=4096)),
         C.INVALID_ARGUMENT, ("policy.louiskv.window", "max_tokens")),
    Case("open-policy-observation-past-max-tokens", "OpenSession",
         opening(layout_max_tokens=8, policy=policy("snapkv", budget=4, window=32, observation=16)),
         C.INVALID_ARGUMENT, ("policy.snapkv", "max_tokens")),

    # ---- IngestPrompt: session ids ---------------------------------------------------------
    Case("ingest-session-id-missing", "IngestPrompt", lambda c: ingest("", inline_kv()), C.INVALID_ARGUMENT, ("session_id", "required")),
    Case("ingest-session-id-unknown", "IngestPrompt", lambda c: ingest("s-0000000000000000", inline_kv()), C.NOT_FOUND, ("session_id",)),
    Case("ingest-session-id-garbage", "IngestPrompt", lambda c: ingest("\u2603" * 40, inline_kv()), C.NOT_FOUND, ("session_id",)),
    Case("ingest-session-closed", "IngestPrompt", lambda c: ingest(c.closed, shm_kv(c)), C.NOT_FOUND, ("session_id",)),
    Case("ingest-other-workers-session", "IngestPrompt", lambda c: ingest(c.other, shm_kv(c)), C.NOT_FOUND, ("session_id",)),
    # ---- IngestPrompt: the session capability -------------------------------------------------
    Case("ingest-capability-missing", "IngestPrompt", lambda c: ingest(c.victim, shm_kv(c)), C.NOT_FOUND,
         ("session_id",), fill=False),
    Case("ingest-capability-wrong", "IngestPrompt", lambda c: with_capability(ingest(c.victim, shm_kv(c)), "guess"),
         C.NOT_FOUND, ("session_id",)),
    Case("ingest-capability-of-another-session", "IngestPrompt",
         lambda c: with_capability(ingest(c.victim, shm_kv(c)), c.raw.capabilities[c.fresh]), C.NOT_FOUND, ("session_id",)),
    Case("ingest-no-worker-id-into-another-workers-session", "IngestPrompt", lambda c: ingest(c.other, shm_kv(c)),
         C.NOT_FOUND, ("session_id",), worker="", fill=False),
    Case("ingest-undecodable", "IngestPrompt", lambda c: UNDECODABLE, C.INVALID_ARGUMENT, ("request", "IngestPromptRequest")),
    # ---- IngestPrompt: sizes -----------------------------------------------------------------
    Case("ingest-num-tokens-zero", "IngestPrompt", lambda c: ingest(c.fresh, shm_kv(c), num_tokens=0), C.INVALID_ARGUMENT, ("num_tokens",)),
    Case("ingest-num-tokens-past-max", "IngestPrompt", lambda c: ingest(c.fresh, kv_ref(600), num_tokens=600),
         C.INVALID_ARGUMENT, ("num_tokens", "max_tokens")),
    Case("ingest-num-tokens-uint-overflow", "IngestPrompt", lambda c: ingest(c.fresh, shm_kv(c), num_tokens=2**32 - 1),
         C.INVALID_ARGUMENT, ("num_tokens",)),
    Case("ingest-num-tokens-mismatch", "IngestPrompt", lambda c: ingest(c.fresh, shm_kv(c), num_tokens=PROMPT - 1),
         C.INVALID_ARGUMENT, ("kv.shape",)),
    # ---- IngestPrompt: the kv TensorRef ------------------------------------------------------
    Case("ingest-kv-missing", "IngestPrompt", lambda c: ingest(c.fresh), C.INVALID_ARGUMENT, ("kv", "required")),
    Case("ingest-kv-dtype-mismatch", "IngestPrompt",
         lambda c: ingest(c.fresh, inline_ref(random_kv(SPEC, PROMPT, 0).half())), C.INVALID_ARGUMENT, ("kv.dtype",)),
    Case("ingest-kv-dtype-unspecified", "IngestPrompt", lambda c: ingest(c.fresh, kv_ref(dtype=0)), C.INVALID_ARGUMENT, ("kv.dtype",)),
    Case("ingest-kv-dtype-unknown-enum", "IngestPrompt", lambda c: ingest(c.fresh, kv_ref(dtype=77)), C.INVALID_ARGUMENT, ("kv.dtype",)),
    Case("ingest-kv-shape-empty", "IngestPrompt", lambda c: ingest(c.fresh, kv_ref(shape=[])), C.INVALID_ARGUMENT, ("kv.shape",)),
    Case("ingest-kv-shape-wrong-rank", "IngestPrompt", lambda c: ingest(c.fresh, kv_ref(shape=[L, 2, H, PROMPT])),
         C.INVALID_ARGUMENT, ("kv.shape",)),
    Case("ingest-kv-shape-wrong-heads", "IngestPrompt", lambda c: ingest(c.fresh, kv_ref(shape=[L, 2, H + 1, PROMPT, D])),
         C.INVALID_ARGUMENT, ("kv.shape",)),
    Case("ingest-kv-shape-huge", "IngestPrompt", lambda c: ingest(c.fresh, kv_ref(shape=[2**63, 2**63, 2, PROMPT, D])),
         C.INVALID_ARGUMENT, ("kv.shape",)),
    Case("ingest-kv-no-location", "IngestPrompt", lambda c: ingest(c.fresh, kv_ref()), C.INVALID_ARGUMENT, ("kv", "location")),
    Case("ingest-kv-inline-too-short", "IngestPrompt",
         lambda c: ingest(c.fresh, pb.TensorRef(dtype=pb.DTYPE_FLOAT32, shape=[L, 2, H, PROMPT, D], inline_data=b"\0" * 100)),
         C.INVALID_ARGUMENT, ("kv.inline_data", "bytes")),
    Case("ingest-kv-inline-too-long", "IngestPrompt",
         lambda c: ingest(c.fresh, pb.TensorRef(dtype=pb.DTYPE_FLOAT32, shape=[L, 2, H, PROMPT, D],
                                               inline_data=b"\0" * (L * 2 * H * PROMPT * D * 4 + 4))),
         C.INVALID_ARGUMENT, ("kv.inline_data", "bytes")),
    Case("ingest-kv-shm-missing-segment", "IngestPrompt", lambda c: ingest(c.fresh, shm_kv(c, "kvrecall-no-such-segment")),
         C.INVALID_ARGUMENT, ("kv.shm.name", "kvrecall-no-such-segment")),
    Case("ingest-kv-shm-name-empty", "IngestPrompt", lambda c: ingest(c.fresh, shm_kv(c, "")), C.INVALID_ARGUMENT, ("kv.shm",)),
    Case("ingest-kv-shm-name-path-traversal", "IngestPrompt", lambda c: ingest(c.fresh, shm_kv(c, "../../etc/passwd")),
         C.INVALID_ARGUMENT, ("kv.shm", "name")),
    Case("ingest-kv-shm-name-nul-byte", "IngestPrompt", lambda c: ingest(c.fresh, shm_kv(c, "abc\0def")), C.INVALID_ARGUMENT, ("kv.shm",)),
    Case("ingest-kv-shm-name-dot-dot", "IngestPrompt", lambda c: ingest(c.fresh, shm_kv(c, "..")), C.INVALID_ARGUMENT, ("kv.shm",)),
    Case("ingest-kv-shm-name-too-long", "IngestPrompt", lambda c: ingest(c.fresh, shm_kv(c, "k" * 5000)), C.INVALID_ARGUMENT, ("kv.shm",)),
    Case("ingest-kv-shm-segment-too-small", "IngestPrompt", lambda c: ingest(c.fresh, shm_kv(c, c.tiny.name)),
         C.INVALID_ARGUMENT, ("kv.shm", "bytes")),
    Case("ingest-kv-shm-offset-past-end", "IngestPrompt", lambda c: ingest(c.fresh, shm_kv(c, offset=2**64 - 1)),
         C.INVALID_ARGUMENT, ("kv.shm",)),
    Case("ingest-kv-shm-offset-misaligned", "IngestPrompt", lambda c: ingest(c.fresh, shm_kv(c, offset=2, tokens=PROMPT - 1), num_tokens=PROMPT - 1),
         C.INVALID_ARGUMENT, ("kv.shm.offset", "aligned")),
    Case("ingest-kv-shm-daemons-own-segment", "IngestPrompt", lambda c: ingest(c.victim, shm_kv(c, c.daemon_segment, tokens=1), num_tokens=1),
         C.INVALID_ARGUMENT, ("kv.shm.name",)),
    Case("ingest-kv-shm-symlink-to-a-file", "IngestPrompt", lambda c: ingest(c.victim, shm_kv(c, c.symlink)),
         C.INVALID_ARGUMENT, ("kv.shm",)),
    Case("ingest-kv-cuda-ipc-on-shm-session", "IngestPrompt",
         lambda c: ingest(c.fresh, pb.TensorRef(dtype=pb.DTYPE_FLOAT32, shape=[L, 2, H, PROMPT, D],
                                               cuda_ipc=pb.CudaIpcRef(handle=b"\x01" * 64))),
         C.INVALID_ARGUMENT, ("kv.cuda_ipc", "transport")),
    Case("ingest-kv-stale-ipc-handle-on-inline-session", "IngestPrompt",
         lambda c: ingest(c.inline, pb.TensorRef(dtype=pb.DTYPE_FLOAT32, shape=[L, 2, H, PROMPT, D],
                                                cuda_ipc=pb.CudaIpcRef(handle=b"\xff" * 7))),
         C.INVALID_ARGUMENT, ("kv.cuda_ipc", "transport")),
    Case("ingest-kv-shm-on-inline-session", "IngestPrompt", lambda c: ingest(c.inline, shm_kv(c)),
         C.INVALID_ARGUMENT, ("kv.shm", "transport")),
    Case("ingest-kv-oversized-message", "IngestPrompt", lambda c: ingest(c.fresh, inline_kv(tokens=2200)), C.RESOURCE_EXHAUSTED,
         ("larger than max",)),
    # ---- IngestPrompt: queries and ordering ---------------------------------------------------
    Case("ingest-queries-shape", "IngestPrompt",
         lambda c: ingest(c.fresh, shm_kv(c), queries=inline_ref(torch.zeros(L, HQ + 1, 1, D))),
         C.INVALID_ARGUMENT, ("queries.shape",)),
    Case("ingest-queries-n-obs-past-prompt", "IngestPrompt",
         lambda c: ingest(c.fresh, shm_kv(c), queries=inline_ref(torch.zeros(L, HQ, PROMPT + 1, D))),
         C.INVALID_ARGUMENT, ("queries.shape", "n_obs")),
    Case("ingest-queries-dtype-int32", "IngestPrompt",
         lambda c: ingest(c.fresh, shm_kv(c), queries=inline_ref(torch.zeros(L, HQ, 1, D, dtype=torch.int32))),
         C.INVALID_ARGUMENT, ("queries.dtype",)),
    Case("ingest-twice", "IngestPrompt", lambda c: ingest(c.ingested, shm_kv(c)), C.FAILED_PRECONDITION, ("already ingested",)),

    # ---- Decode stream -------------------------------------------------------------------
    Case("decode-session-id-missing", "Decode", lambda c: [append("", PROMPT + 1)], C.INVALID_ARGUMENT, ("session_id", "required")),
    Case("decode-session-id-unknown", "Decode", lambda c: [append("s-ffffffffffffffff", 1)], C.NOT_FOUND, ("session_id",)),
    Case("decode-session-closed", "Decode", lambda c: [append(c.closed, PROMPT + 1)], C.NOT_FOUND, ("session_id",)),
    Case("decode-other-workers-session", "Decode", lambda c: [append(c.other, PROMPT + 1)], C.NOT_FOUND, ("session_id",)),
    Case("decode-no-worker-id-other-workers-session", "Decode", lambda c: [boundary(c.ingested, PROMPT)], C.NOT_FOUND,
         ("session_id",), worker="", fill=False),
    Case("decode-capability-wrong", "Decode", lambda c: [with_capability(boundary(c.ingested, PROMPT), "guess")],
         C.NOT_FOUND, ("session_id",)),
    Case("decode-undecodable-first-message", "Decode", lambda c: [UNDECODABLE], C.INVALID_ARGUMENT,
         ("request", "DecodeRequest")),
    Case("decode-undecodable-after-a-good-one", "Decode", lambda c: [boundary(c.ingested, PROMPT), UNDECODABLE],
         C.INVALID_ARGUMENT, ("request", "DecodeRequest"), answered=1),
    Case("decode-boundary-position-past-max-tokens", "Decode", lambda c: [boundary(c.near_max, NEAR_MAX + 1)],
         C.INVALID_ARGUMENT, ("boundary.position", "max_tokens")),
    Case("decode-no-event", "Decode", lambda c: [pb.DecodeRequest(seq=1, session_id=c.ingested)], C.INVALID_ARGUMENT, ("event",)),
    Case("decode-append-before-ingest", "Decode", lambda c: [append(c.fresh, 1)], C.FAILED_PRECONDITION,
         ("append", "IngestPrompt")),
    Case("decode-boundary-before-ingest", "Decode", lambda c: [boundary(c.fresh, 0)], C.FAILED_PRECONDITION,
         ("boundary", "IngestPrompt")),
    Case("decode-inline-append-before-ingest", "Decode",
         lambda c: [append(c.inline_fresh, 16, kv=inline_ref(torch.zeros(L, 2, H, 16, D)))], C.FAILED_PRECONDITION,
         ("append", "IngestPrompt")),
    Case("decode-inline-boundary-before-ingest", "Decode",
         lambda c: [boundary(c.inline_fresh, 0, query=inline_ref(torch.zeros(L, HQ, D)))], C.FAILED_PRECONDITION,
         ("boundary", "IngestPrompt")),
    Case("decode-append-upto-backwards", "Decode", lambda c: [append(c.ingested, PROMPT - 5)], C.INVALID_ARGUMENT,
         ("append.upto", "not past")),
    Case("decode-append-upto-repeated", "Decode", lambda c: [append(c.ingested, PROMPT)], C.INVALID_ARGUMENT,
         ("append.upto", "not past")),
    Case("decode-append-upto-past-spill-every", "Decode", lambda c: [append(c.ingested, PROMPT + 17)], C.INVALID_ARGUMENT,
         ("append.upto", "spill_every")),
    Case("decode-append-upto-uint-overflow", "Decode", lambda c: [append(c.ingested, 2**32 - 1)], C.INVALID_ARGUMENT,
         ("append.upto",)),
    Case("decode-append-past-max-tokens", "Decode", lambda c: [append(c.near_max, NEAR_MAX + 1)], C.INVALID_ARGUMENT,
         ("append.upto", "max_tokens")),
    Case("decode-boundary-position-backwards", "Decode", lambda c: [boundary(c.ingested, PROMPT - 1)], C.INVALID_ARGUMENT,
         ("boundary.position",)),
    Case("decode-boundary-position-ahead", "Decode", lambda c: [boundary(c.ingested, 2**32 - 1)], C.INVALID_ARGUMENT,
         ("boundary.position",)),
    Case("decode-boundary-layer-out-of-range", "Decode", lambda c: [boundary(c.ingested, PROMPT, layers=[0, L])],
         C.INVALID_ARGUMENT, ("boundary.layers",)),
    Case("decode-boundary-query-shape", "Decode",
         lambda c: [boundary(c.ingested, PROMPT, query=inline_ref(torch.zeros(L, HQ, D + 1)))], C.INVALID_ARGUMENT,
         ("boundary.query.shape",)),
    Case("decode-boundary-query-shm-location", "Decode",
         lambda c: [boundary(c.ingested, PROMPT, query=pb.TensorRef(dtype=pb.DTYPE_FLOAT32, shape=[L, HQ, D],
                                                                     shm=pb.ShmRef(name=c.staging.name)))],
         C.INVALID_ARGUMENT, ("boundary.query.shm",)),
    Case("decode-inline-boundary-without-query", "Decode", lambda c: [boundary(c.inline, PROMPT)], C.INVALID_ARGUMENT,
         ("boundary.query", "required")),
    Case("decode-inline-append-without-kv", "Decode", lambda c: [append(c.inline, PROMPT + 1)], C.INVALID_ARGUMENT,
         ("append.kv", "required")),
    Case("decode-inline-append-kv-wrong-length", "Decode",
         lambda c: [append(c.inline, PROMPT + 2, kv=pb.TensorRef(dtype=pb.DTYPE_FLOAT32, shape=[L, 2, H, 2, D],
                                                                 inline_data=b"\0" * 12))],
         C.INVALID_ARGUMENT, ("append.kv.inline_data",)),
    Case("decode-inline-append-kv-shape-mismatch", "Decode",
         lambda c: [append(c.inline, PROMPT + 2, kv=inline_ref(torch.zeros(L, 2, H, 3, D)))], C.INVALID_ARGUMENT,
         ("append.kv.shape",)),
    Case("decode-inline-append-kv-dtype-mismatch", "Decode",
         lambda c: [append(c.inline, PROMPT + 2, kv=inline_ref(torch.zeros(L, 2, H, 2, D, dtype=torch.bfloat16)))],
         C.INVALID_ARGUMENT, ("append.kv.dtype",)),
    Case("decode-inline-append-backwards", "Decode",
         lambda c: [append(c.inline, PROMPT - 1, kv=inline_ref(torch.zeros(L, 2, H, 1, D)))], C.INVALID_ARGUMENT,
         ("append.upto",)),
    Case("decode-oversized-message", "Decode",
         lambda c: [boundary(c.inline, PROMPT, query=inline_ref(torch.zeros(L * 2600, HQ, D)))], C.RESOURCE_EXHAUSTED,
         ("larger than max",)),
    Case("decode-stream-switches-session", "Decode",
         lambda c: [boundary(c.ingested, PROMPT, seq=1), boundary(c.near_max, 60, seq=2)], C.INVALID_ARGUMENT,
         ("session_id", "bound"), answered=1),

    # ---- KeepAlive ---------------------------------------------------------------------------
    Case("keepalive-session-id-missing", "KeepAlive", lambda c: pb.KeepAliveRequest(), C.INVALID_ARGUMENT, ("session_id", "required")),
    Case("keepalive-session-unknown", "KeepAlive", lambda c: pb.KeepAliveRequest(session_id="nope"), C.NOT_FOUND, ("session_id",)),
    Case("keepalive-session-closed", "KeepAlive", lambda c: pb.KeepAliveRequest(session_id=c.closed), C.NOT_FOUND, ("session_id",)),
    Case("keepalive-other-workers-session", "KeepAlive", lambda c: pb.KeepAliveRequest(session_id=c.other), C.NOT_FOUND,
         ("session_id",)),
    Case("keepalive-capability-missing", "KeepAlive", lambda c: pb.KeepAliveRequest(session_id=c.fresh), C.NOT_FOUND,
         ("session_id",), fill=False),
    Case("keepalive-undecodable", "KeepAlive", lambda c: UNDECODABLE, C.INVALID_ARGUMENT, ("request",)),

    # ---- CloseSession ------------------------------------------------------------------------
    Case("close-session-id-missing", "CloseSession", lambda c: pb.CloseSessionRequest(), C.INVALID_ARGUMENT, ("session_id", "required")),
    Case("close-session-unknown", "CloseSession", lambda c: pb.CloseSessionRequest(session_id="s-1234"), C.NOT_FOUND, ("session_id",)),
    Case("close-twice", "CloseSession", lambda c: pb.CloseSessionRequest(session_id=c.closed), C.NOT_FOUND, ("session_id",)),
    Case("close-other-workers-session", "CloseSession", lambda c: pb.CloseSessionRequest(session_id=c.other), C.NOT_FOUND,
         ("session_id",)),
    Case("close-capability-missing", "CloseSession", lambda c: pb.CloseSessionRequest(session_id=c.fresh), C.NOT_FOUND,
         ("session_id",), fill=False),
    Case("close-no-worker-id-capability-wrong", "CloseSession",
         lambda c: pb.CloseSessionRequest(session_id=c.fresh, capability="guess"), C.NOT_FOUND, ("session_id",), worker=""),
    Case("close-undecodable", "CloseSession", lambda c: BAD_UTF8, C.INVALID_ARGUMENT, ("request",)),

    # ---- GetStats ----------------------------------------------------------------------------
    Case("stats-session-unknown", "GetStats", lambda c: pb.StatsRequest(session_id="s-0"), C.NOT_FOUND, ("session_id",)),
    Case("stats-session-closed", "GetStats", lambda c: pb.StatsRequest(session_id=c.closed), C.NOT_FOUND, ("session_id",)),
    Case("stats-other-workers-session", "GetStats", lambda c: pb.StatsRequest(session_id=c.other), C.NOT_FOUND, ("session_id",)),
    Case("stats-session-of-another-caller", "GetStats", lambda c: pb.StatsRequest(session_id=c.ingested), C.NOT_FOUND,
         ("session_id",), worker="someone-else"),
    Case("stats-capability-missing", "GetStats", lambda c: pb.StatsRequest(session_id=c.ingested), C.NOT_FOUND,
         ("session_id",), worker="", fill=False),
    Case("stats-undecodable", "GetStats", lambda c: UNDECODABLE, C.INVALID_ARGUMENT, ("request",)),
]


# ---- the prepared sessions ----------------------------------------------------------------
@pytest.fixture(scope="module")
def witness(rdaemon, raw):
    """A louiskv session opened (through the SDK) before the catalogue, mid-decode."""
    baseline = raw.pools()
    client = KVRecallClient(rdaemon.target, "witness-worker", timeout=30.0)
    kv = random_kv(SPEC, 260, seed=7)
    session = client.open_session(SPEC, "louiskv", {"budget": 48, "n_sink": 4, "window": 32, "cluster_size": 8})
    session.ingest(kv[:, :, :, :200].contiguous(), torch.randn(L, HQ, max(1, session.observation), D))
    for position in range(200, 230):
        session.write_token(position, kv[:, 0, :, position], kv[:, 1, :, position])
        session.advance()
        if position % 10 == 0:
            session.query.copy_(torch.randn(L, HQ, D))
            session.boundary()
    snapshot = {name: getattr(session, name).clone() for name in ("keys", "values", "slot_pos")}
    yield {"baseline": baseline, "client": client, "session": session, "kv": kv, "snapshot": snapshot,
           "stats": session.stats()}
    session.close()
    client.close()


@pytest.fixture(scope="module")
def ctx(raw, witness, rdaemon, tmp_path_factory):
    c = Ctx(raw)
    kv = random_kv(SPEC, PROMPT, seed=3)
    nbytes = kv.numel() * 4
    c.staging = ShmSegment.create(shm_name("stage"), nbytes)
    c.staging.tensor[:nbytes].view(torch.float32).copy_(kv.view(-1))
    c.tiny = ShmSegment.create(shm_name("stage"), 16)
    c.segments = [c.staging, c.tiny]
    target = tmp_path_factory.mktemp("symlink") / "not-shared-memory"
    target.write_bytes(b"secret" * (nbytes // 6 + 1))
    c.symlink = shm_name("stage") + "-link"
    os.symlink(target, os.path.join("/dev/shm", c.symlink))

    def open_(spec=SPEC, name="full", config=None, transport=pb.TRANSPORT_SHM, worker="rel-worker"):
        return raw.ok("OpenSession", open_request(spec, name, config, transport, worker), worker=worker)

    c.fresh = open_().session_id
    c.victim = open_().session_id
    c.ingested = open_(name="streaming", config={"n_sink": 4, "window": 32}).session_id
    raw.ok("IngestPrompt", ingest(c.ingested, shm_kv(c)))
    c.inline = open_(transport=pb.TRANSPORT_INLINE).session_id
    raw.ok("IngestPrompt", ingest(c.inline, inline_kv(seed=4)))
    c.inline_fresh = open_(transport=pb.TRANSPORT_INLINE).session_id
    near = SPEC.__class__(**{**SPEC.__dict__, "max_tokens": NEAR_MAX})
    c.near_max = open_(spec=near).session_id
    raw.ok("IngestPrompt", ingest(c.near_max, inline_ref(random_kv(near, 60, 5)), num_tokens=60))
    other = open_(worker="other-worker")
    c.other = other.session_id
    # another worker's working set: the daemon must not read it on this worker's behalf
    c.daemon_segment = other.working_set.keys.shm.name
    assert c.daemon_segment.startswith(f"kvrecall-{rdaemon.process.pid}-")
    c.closed = open_().session_id
    raw.ok("CloseSession", pb.CloseSessionRequest(session_id=c.closed))
    yield c
    for session_id, worker in c.open_sessions():
        raw.call("CloseSession", pb.CloseSessionRequest(session_id=session_id), worker=worker)
    for segment in c.segments:
        segment.release()
    os.unlink(os.path.join("/dev/shm", c.symlink))


# ---- the catalogue ------------------------------------------------------------------------
def test_catalogue_is_large_and_covers_every_rpc():
    assert len(CASES) >= 30
    assert len({case.id for case in CASES}) == len(CASES)
    assert {case.rpc for case in CASES} == {"OpenSession", "IngestPrompt", "Decode", "KeepAlive", "CloseSession", "GetStats"}


@pytest.mark.parametrize(
    "case",
    [pytest.param(c, marks=pytest.mark.xfail(strict=True, reason=c.xfail)) if c.xfail else c for c in CASES],
    ids=[case.id for case in CASES],
)
def test_bad_input(ctx, case: Case):
    request = case.build(ctx)
    if case.rpc == "Decode":
        responses, answer = ctx.raw.stream(request, worker=case.worker, fill=case.fill)
        assert len(responses) == case.answered, responses
    else:
        answer = ctx.raw.call(case.rpc, request, worker=case.worker, fill=case.fill)
        if answer.code == C.OK and case.rpc == "OpenSession":  # never leave a session behind
            ctx.raw.ok("CloseSession", pb.CloseSessionRequest(session_id=answer.response.session_id))
    assert answer.code == case.code, f"{case.id}: {answer.code.name}: {answer.details}"
    for needle in case.needles:
        assert needle in answer.details, f"{case.id}: {needle!r} not in {answer.details!r}"


# ---- auth: a second daemon with bearer tokens ----------------------------------------------
AUTH_CASES = [
    # (id, rpc, token, metadata worker, request worker_id, code, needles)
    ("auth-no-token", "GetStats", "", "alice", "", C.UNAUTHENTICATED, ("authorization",)),
    ("auth-wrong-token", "GetStats", "not-the-token", "alice", "", C.UNAUTHENTICATED, ("authorization", "bearer")),
    ("auth-wrong-token-open", "OpenSession", "not-the-token", "alice", "alice", C.UNAUTHENTICATED, ("authorization",)),
    ("auth-wrong-token-before-validation", "OpenSession", "not-the-token", "alice", "", C.UNAUTHENTICATED, ("authorization",)),
    ("auth-token-of-another-worker", "OpenSession", "bob-token", "bob", "alice", C.PERMISSION_DENIED, ("worker_id", "alice")),
    ("auth-metadata-worker-mismatch", "GetStats", "alice-token", "bob", "", C.PERMISSION_DENIED, ("kvrecall-worker-id", "bob")),
    ("auth-wrong-token-keepalive", "KeepAlive", "bad", "alice", "", C.UNAUTHENTICATED, ("authorization",)),
    ("auth-wrong-token-decode", "Decode", "bad", "alice", "", C.UNAUTHENTICATED, ("authorization",)),
]


@pytest.fixture(scope="module")
def auth_daemon(tmp_path_factory):
    tokens = tmp_path_factory.mktemp("auth") / "tokens"
    tokens.write_text("alice alice-token\nbob bob-token\ncarol carol-token\n")
    with LocalDaemon(host_pool_gb=0.0625, device_pool_gb=0.0625, extra_args=["--tokens-file", str(tokens)],
                     env={"KVRECALL_OPERATORS": "carol"}, worker_share=None) as d:
        r = Raw(d.target)
        yield r
        r.close()


@pytest.mark.parametrize("case", AUTH_CASES, ids=[c[0] for c in AUTH_CASES])
def test_bad_credentials(auth_daemon, case):
    _, rpc, token, worker, claimed, code, needles = case
    if rpc == "OpenSession":
        answer = auth_daemon.call(rpc, open_request(worker=claimed), worker=worker, token=token)
    elif rpc == "GetStats":
        answer = auth_daemon.call(rpc, pb.StatsRequest(), worker=worker, token=token)
    elif rpc == "KeepAlive":
        answer = auth_daemon.call(rpc, pb.KeepAliveRequest(session_id="s-1"), worker=worker, token=token)
    else:
        _, answer = auth_daemon.stream([append("s-1", 1)], worker=worker, token=token)
    assert answer.code == code, f"{answer.code.name}: {answer.details}"
    for needle in needles:
        assert needle.lower() in answer.details.lower(), (needle, answer.details)


def test_good_token_works_and_stats_show_a_tenant_its_own_sessions(auth_daemon):
    answer = auth_daemon.call("OpenSession", open_request(worker="alice"), worker="alice", token="alice-token")
    assert answer.code == C.OK, answer.details
    alice = answer.response.session_id

    def listed(token: str) -> set[str]:
        return {s.session_id for s in auth_daemon.ok("GetStats", pb.StatsRequest(), worker="", token=token).sessions}

    # bob's valid token neither lists alice's session nor reaches it, capability or not
    assert listed("bob-token") == set()
    assert auth_daemon.call("KeepAlive", pb.KeepAliveRequest(session_id=alice), worker="", token="bob-token").code == C.NOT_FOUND
    assert listed("alice-token") == {alice}
    assert listed("carol-token") == {alice}  # the operator sees every tenant
    closed = auth_daemon.call("CloseSession", pb.CloseSessionRequest(session_id=alice), worker="alice", token="alice-token")
    assert closed.code == C.OK


# ---- after the catalogue ------------------------------------------------------------------
def test_after_catalogue_daemon_is_healthy_and_nothing_leaked(ctx, witness, raw):
    assert raw.health() == "SERVING"
    session, kv = witness["session"], witness["kv"]
    # the session opened before the catalogue is untouched ...
    for name, before in witness["snapshot"].items():
        assert torch.equal(getattr(session, name), before), name
    stats = session.stats()
    old = witness["stats"]
    assert (stats.tokens, stats.steps, stats.boundaries, stats.appends) == (old.tokens, old.steps, old.boundaries, old.appends)
    # ... and still works: decode on, every resident slot holds the right token
    for position in range(230, 260):
        session.write_token(position, kv[:, 0, :, position], kv[:, 1, :, position])
        session.advance()
    session.query.copy_(torch.randn(L, HQ, D))
    session.boundary()
    session.flush()
    assert session.stats().tokens == 260
    for layer in range(L):
        for head in range(H):
            for slot, position in enumerate(session.slot_pos[layer, head].tolist()):
                if position >= 0:
                    assert torch.equal(session.keys[layer, head, slot], kv[layer, 0, head, position])
                    assert torch.equal(session.values[layer, head, slot], kv[layer, 1, head, position])


def test_pools_back_to_baseline(ctx, witness, raw):
    # close what the module opened (the fixtures' teardown would only do it after this test)
    for session_id, worker in ctx.open_sessions():
        raw.ok("CloseSession", pb.CloseSessionRequest(session_id=session_id), worker=worker)
    ctx.fresh = ctx.ingested = ctx.inline = ctx.inline_fresh = ctx.victim = ctx.near_max = ctx.other = ""
    witness["session"].close()
    assert raw.pools() == witness["baseline"]
    assert raw.health() == "SERVING"
