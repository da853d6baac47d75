"""Typed exceptions for gRPC status codes, so callers catch what they can handle."""

from __future__ import annotations

import grpc


class KVRecallClientError(Exception):
    """A call to the daemon failed; `code` is the gRPC status, `details` the daemon's message."""

    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN

    def __init__(self, details: str, code: grpc.StatusCode | None = None) -> None:
        super().__init__(details)
        self.details = details
        if code is not None:
            self.code = code

    def __str__(self) -> str:
        return f"{self.code.name}: {self.details}"


class InvalidArgumentError(KVRecallClientError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFoundError(KVRecallClientError):
    code = grpc.StatusCode.NOT_FOUND


class ResourceExhaustedError(KVRecallClientError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class FailedPreconditionError(KVRecallClientError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class PermissionDeniedError(KVRecallClientError):
    code = grpc.StatusCode.PERMISSION_DENIED


class UnauthenticatedError(KVRecallClientError):
    code = grpc.StatusCode.UNAUTHENTICATED


class UnavailableError(KVRecallClientError):
    """The daemon cannot be reached (down or restarting); sessions on it are gone after a restart."""

    code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceededError(KVRecallClientError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


_BY_CODE = {
    cls.code: cls
    for cls in (
        InvalidArgumentError,
        NotFoundError,
        ResourceExhaustedError,
        FailedPreconditionError,
        PermissionDeniedError,
        UnauthenticatedError,
        UnavailableError,
        DeadlineExceededError,
    )
}


def from_rpc_error(error: grpc.RpcError) -> KVRecallClientError:
    code = error.code() if hasattr(error, "code") else grpc.StatusCode.UNKNOWN
    details = (error.details() if hasattr(error, "details") else None) or str(error)
    cls = _BY_CODE.get(code, KVRecallClientError)
    return cls(details, code)
