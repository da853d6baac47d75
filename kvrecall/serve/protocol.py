"""The OpenAI-compatible wire format a serving worker speaks: request bodies (validated once,
here), response and stream-chunk bodies, and the error body.

Decoding is greedy: sampling fields (temperature, top_p, seed, ...) are accepted and ignored,
like every other OpenAI field this server does not implement. The extra body field
``kvrecall`` picks the KV policy per request::

    {"model": "...", "prompt": "...", "kvrecall": {"policy": "louiskv", "budget": 1024}}
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class KVRecallOptions(BaseModel):
    """Per-request KV policy; unset fields take the worker's defaults (`kvrecall worker --policy
    --budget`). `budget`: retrieved tokens per (layer, KV head), the window for `streaming`."""

    model_config = ConfigDict(extra="forbid")

    policy: str | None = Field(default=None, min_length=1)
    budget: int | None = Field(default=None, ge=1)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")

    include_usage: bool = False  # a last chunk with `usage` and no choices


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = Field(default=None)
    n: int = Field(default=1, ge=1, le=1)
    kvrecall: KVRecallOptions = Field(default_factory=KVRecallOptions)

    def stop_strings(self) -> list[str]:
        if self.stop is None:
            return []
        return [s for s in ([self.stop] if isinstance(self.stop, str) else self.stop) if s]


class CompletionRequest(_Request):
    """POST /v1/completions. `prompt`: text, or token ids. OpenAI's default max_tokens is 16."""

    prompt: str | list[int] = Field(min_length=1)
    max_tokens: int | None = Field(default=16, ge=1)


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str


class ChatCompletionRequest(_Request):
    """POST /v1/chat/completions. `max_completion_tokens` is the newer name of `max_tokens`."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)

    def token_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class RequestError(Exception):
    """A request the worker refuses: answered with `status` and an OpenAI-style error body."""

    def __init__(self, message: str, param: str | None, status: int = 400, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.status = status
        self.code = code


def error_body(message: str, param: str | None, code: str | None = None, kind: str = "invalid_request_error"):
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def completion_body(
    request_id: str, model: str, text: str, finish_reason: str | None, extra: dict[str, Any], chat: bool
) -> dict[str, Any]:
    """A whole (non-streamed) completion; `extra` holds `usage` and `kvrecall`."""
    if chat:
        choice = {
            "index": 0,
            "message": {"role": "assistant", "content": text},
            "finish_reason": finish_reason,
        }
    else:
        choice = {"index": 0, "text": text, "finish_reason": finish_reason, "logprobs": None}
    kind = "chat.completion" if chat else "text_completion"
    return {"id": request_id, "object": kind, "created": int(time.time()), "model": model,
            "choices": [choice], **extra}  # fmt: skip


def chunk_body(
    request_id: str,
    model: str,
    text: str | None,
    finish_reason: str | None,
    chat: bool,
    extra: dict | None = None,
) -> dict[str, Any]:
    """One server-sent event of a streamed completion. Chat: the first chunk carries the role
    (text None), the last one the finish reason; `extra` (usage, kvrecall) rides on the last."""
    if chat:
        delta: dict[str, str] = {"role": "assistant"} if text is None else ({"content": text} if text else {})
        choice = {"index": 0, "delta": delta, "finish_reason": finish_reason}
    else:
        choice = {"index": 0, "text": text or "", "finish_reason": finish_reason, "logprobs": None}
    kind = "chat.completion.chunk" if chat else "text_completion"
    return {"id": request_id, "object": kind, "created": int(time.time()), "model": model,
            "choices": [choice], **(extra or {})}  # fmt: skip
