"""Request validation at the edge: every check names the field it rejects."""

from __future__ import annotations

import re

import torch

from kvrecall.dtypes import KV_DTYPES, TORCH_OF_WIRE
from kvrecall.server.errors import InvalidArgument
from kvrecall.server.layout import ModelLayout
from kvrecall.transport import TensorRefError, ref_dtype_shape
from kvrecall.v1 import kvrecall_pb2 as pb

WORKER_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")
MAX_LAYERS = 1024
MAX_HEADS = 4096
MAX_HEAD_DIM = 1024
MAX_TOKENS = 1 << 24


def require(condition: bool, field: str, problem: str) -> None:
    if not condition:
        raise InvalidArgument(field, problem)


def worker_id(value: str, field: str = "worker_id") -> str:
    require(bool(value), field, "required")
    require(bool(WORKER_ID.match(value)), field, f"{value[:64]!r} must match {WORKER_ID.pattern}")
    return value


def layout(message: pb.ModelLayout, present: bool) -> ModelLayout:
    require(present, "layout", "required")
    require(1 <= message.num_layers <= MAX_LAYERS, "layout.num_layers", f"must be in [1, {MAX_LAYERS}]")
    require(1 <= message.num_kv_heads <= MAX_HEADS, "layout.num_kv_heads", f"must be in [1, {MAX_HEADS}]")
    require(
        1 <= message.num_query_heads <= MAX_HEADS and message.num_query_heads % message.num_kv_heads == 0,
        "layout.num_query_heads",
        f"must be a multiple of num_kv_heads={message.num_kv_heads} in [1, {MAX_HEADS}]",
    )
    require(1 <= message.head_dim <= MAX_HEAD_DIM, "layout.head_dim", f"must be in [1, {MAX_HEAD_DIM}]")
    require(message.dtype in KV_DTYPES, "layout.dtype", "must be DTYPE_FLOAT32, DTYPE_FLOAT16 or DTYPE_BFLOAT16")
    require(1 <= message.max_tokens <= MAX_TOKENS, "layout.max_tokens", f"must be in [1, {MAX_TOKENS}]")
    return ModelLayout(
        num_layers=message.num_layers,
        num_kv_heads=message.num_kv_heads,
        num_query_heads=message.num_query_heads,
        head_dim=message.head_dim,
        dtype=TORCH_OF_WIRE[message.dtype],
        max_tokens=message.max_tokens,
    )


def tensor_ref(
    ref: pb.TensorRef,
    field: str,
    dtypes: tuple[torch.dtype, ...],
    shape: tuple[int | None, ...],
    locations: tuple[str, ...],
) -> tuple[int, ...]:
    """Check a ref's dtype, shape (None = any size) and location; returns its shape."""
    try:
        dtype, actual, _ = ref_dtype_shape(ref, field)
    except TensorRefError as exc:
        raise InvalidArgument(exc.field, exc.problem) from None
    require(dtype in dtypes, f"{field}.dtype", f"{dtype} does not match the session layout ({dtypes[0]})")
    expected = "[" + ", ".join("*" if s is None else str(s) for s in shape) + "]"
    require(
        len(actual) == len(shape) and all(e is None or e == a for e, a in zip(shape, actual, strict=True)),
        f"{field}.shape",
        f"{list(actual)} does not match {expected}",
    )
    where = ref.WhichOneof("location")
    require(where is not None, f"{field}", "no location set (shm, cuda_ipc or inline_data)")
    require(where in locations, f"{field}.{where}", f"not allowed for this session's transport (use {', '.join(locations)})")
    return actual
