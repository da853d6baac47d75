"""The kvrecall SDK: sync and asyncio clients, the worker session, and model integrations.

The remote part (inline transport) needs only grpcio, protobuf, numpy and torch.
"""

from kvrecall.client.errors import (
    DeadlineExceededError,
    FailedPreconditionError,
    InvalidArgumentError,
    KVRecallClientError,
    NotFoundError,
    PermissionDeniedError,
    ResourceExhaustedError,
    UnauthenticatedError,
    UnavailableError,
)
from kvrecall.client.session import KVRecallClient, ModelSpec, StepCall, WorkerSession

__all__ = [
    "DeadlineExceededError",
    "FailedPreconditionError",
    "InvalidArgumentError",
    "KVRecallClient",
    "KVRecallClientError",
    "ModelSpec",
    "NotFoundError",
    "PermissionDeniedError",
    "ResourceExhaustedError",
    "StepCall",
    "UnauthenticatedError",
    "UnavailableError",
    "WorkerSession",
]
