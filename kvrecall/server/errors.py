"""Errors the daemon raises inside; the service maps each to one gRPC status code.

Every error names the request field (or resource) at fault, so an operator reading the
status message knows what to fix.
"""

from __future__ import annotations

import grpc


class KVRecallError(Exception):
    """Base class: carries the gRPC status code the service answers with."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidArgument(KVRecallError):
    code = grpc.StatusCode.INVALID_ARGUMENT

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")
        self.field = field


class NotFound(KVRecallError):
    code = grpc.StatusCode.NOT_FOUND


class ResourceExhausted(KVRecallError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class FailedPrecondition(KVRecallError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class PermissionDenied(KVRecallError):
    code = grpc.StatusCode.PERMISSION_DENIED


class Unauthenticated(KVRecallError):
    code = grpc.StatusCode.UNAUTHENTICATED
