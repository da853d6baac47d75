"""Registering the KVRecall service with request parsers that never raise.

gRPC's generated registration parses each request with `FromString`; bytes that do not parse
then fail inside gRPC as INTERNAL with a traceback in the log, once per message. Here a
message that does not parse becomes an `Undecodable` value the servicer answers with
INVALID_ARGUMENT (it is the client's error), logged like any other rejection.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import grpc

from kvrecall.server.errors import InvalidArgument
from kvrecall.v1 import kvrecall_pb2 as pb

SERVICE = pb.DESCRIPTOR.services_by_name["KVRecall"]


@dataclass(frozen=True)
class Undecodable:
    """Request bytes that are not a valid `message` (a proto message name)."""

    message: str
    error: str


def tolerant_parser(message_type) -> Callable[[bytes], object]:
    def parse(raw: bytes) -> object:
        try:
            return message_type.FromString(raw)
        except Exception as exc:  # noqa: BLE001 - any parse failure is the client's bytes
            return Undecodable(message_type.DESCRIPTOR.name, f"{type(exc).__name__}: {exc}"[:200])

    return parse


def require_decoded(request: object) -> None:
    """INVALID_ARGUMENT for a request that did not parse."""
    if isinstance(request, Undecodable):
        raise InvalidArgument("request", f"not a valid {request.message} ({request.error})")


def add_service(servicer: object, server: grpc.aio.Server) -> None:
    """Register every KVRecall RPC of `servicer` on `server` with tolerant request parsers."""
    handlers = {}
    for method in SERVICE.methods:
        request_type = getattr(pb, method.input_type.name)
        response_type = getattr(pb, method.output_type.name)
        make = (
            grpc.stream_stream_rpc_method_handler
            if method.client_streaming and method.server_streaming
            else grpc.unary_unary_rpc_method_handler
        )
        handlers[method.name] = make(
            getattr(servicer, method.name),
            request_deserializer=tolerant_parser(request_type),
            response_serializer=response_type.SerializeToString,
        )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE.full_name, handlers),))
