"""What a serving worker's decode engines share: a request to generate (`GenerationRequest`),
its tokens as they come (`Generation`), what it reports (`GenerationStats`), the session it
gets (`session_plan`), and the interface the HTTP layer drives (`DecodeEngine`).

Two engines implement it: `BatchedEngine` (serve/batched.py: concurrent requests share batched
decode steps) and `SerialEngine` (serve/serial.py: one request at a time through transformers,
for models the batched engine cannot run).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import threading
from typing import Any, Protocol

from kvrecall.client import KVRecallClient
from kvrecall.client.core import fit_to_sequence
from kvrecall.models.pretrained import LoadedModel
from kvrecall.serve.protocol import RequestError
from kvrecall.tasktype import with_task

log = logging.getLogger("kvrecall.serve")

SESSION_MARGIN = 16  # tokens of session capacity beyond prompt + max_tokens


@dataclasses.dataclass(frozen=True)
class GenerationRequest:
    prompt_ids: list[int]
    max_tokens: int
    policy: str
    policy_config: dict[str, Any] | None  # validated by the daemon when the session opens


@dataclasses.dataclass
class GenerationStats:
    """What a finished generation reports (the response's `kvrecall` field). `max_batch`: the
    most sequences that shared one decode step with this one, itself included."""

    session_id: str = ""
    policy_config: dict[str, Any] = dataclasses.field(default_factory=dict)
    retrievals: int = 0
    appends: int = 0
    max_batch: int = 0


_END = object()


class Generation:
    """One request's tokens as they are decoded. Async-iterate for token ids; `finish_reason`
    ("stop": an EOS token, "length": max_tokens, "cancelled") is set when the iteration ends.
    `cancel()` (a client gone, a stop string) ends decoding after the current step.

    Built on the event loop; the decoding thread calls `opened`, `put` and `end`."""

    def __init__(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue = asyncio.Queue()
        self._opened: asyncio.Future = self._loop.create_future()
        self._cancelled = threading.Event()
        self.finish_reason = "length"
        self.stats = GenerationStats()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def cancel(self) -> None:
        self._cancelled.set()

    async def wait_opened(self) -> None:
        """Until the decoding thread opened the session (or refused the request: raises why)."""
        try:
            await self._opened
        except BaseException:
            self.cancel()
            raise

    def opened(self, error: BaseException | None = None) -> None:
        """From the decoding thread: the session is open and decoding starts, or `error`."""

        def settle() -> None:
            if self._opened.done():
                return
            if error is None:
                self._opened.set_result(None)
            else:
                self._opened.set_exception(error)

        self._call(settle)

    def left_in_queue(self, request: GenerationRequest) -> bool:
        """From the decoding thread, before opening a session: whether the client left while
        the request waited (then it is settled as cancelled and logged)."""
        if not self.cancelled:
            return False
        log.info("a request left the queue before it started (%d prompt tokens)", len(request.prompt_ids))
        self.opened(asyncio.CancelledError())
        return True

    def put(self, item: object) -> None:
        """From the decoding thread: a token id, an exception, or the end."""
        self._call(self._queue.put_nowait, item)

    def end(self) -> None:
        self.put(_END)

    def _call(self, fn, *args) -> None:
        try:
            self._loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # the loop is closed: the server stopped and nobody reads
            pass

    def __aiter__(self) -> Generation:
        return self

    async def __anext__(self) -> int:
        item = await self._queue.get()
        if item is _END:
            raise StopAsyncIteration
        if isinstance(item, BaseException):
            raise item
        return item


class DecodeEngine(Protocol):
    """What the HTTP layer (serve/app.py) needs from an engine."""

    loaded: LoadedModel
    client: KVRecallClient

    async def start(self, request: GenerationRequest) -> Generation:
        """Queue `request`; returns once its session is open, so a request the daemon refuses
        (unknown policy, bad config, no memory) raises here, before any response is sent, and
        a request that finds the queue full raises RequestError (503)."""
        ...

    def load(self) -> dict[str, int]:
        """{"slots", "running", "waiting"}: what /health reports."""
        ...

    def close(self) -> None: ...


def session_plan(request: GenerationRequest, tokenizer: Any) -> tuple[int, dict[str, Any] | None]:
    """The session a request gets: its capacity in tokens and its policy config (windowkv's
    task classified from the prompt's text, decoded by the model's `tokenizer`, when unset;
    token counts capped at the capacity, since a budget past the sequence covers it and the
    daemon refuses larger ones)."""
    capacity = len(request.prompt_ids) + request.max_tokens + SESSION_MARGIN
    config = with_task(request.policy, request.policy_config, request.prompt_ids, tokenizer)
    return capacity, fit_to_sequence(config, capacity)


def log_finished(request: GenerationRequest, generation: Generation, tokens: int) -> None:
    """The operator's line for a finished request (one per request)."""
    stats = generation.stats
    log.info(
        "session %s: %s %s, %d prompt + %d tokens, %d retrievals, batch <= %d (%s)", stats.session_id,
        request.policy, stats.policy_config.get("budget", ""), len(request.prompt_ids), tokens,
        stats.retrievals, stats.max_batch, generation.finish_reason,
    )  # fmt: skip


def queue_full(slots: int, max_queue: int) -> RequestError:
    """The answer to a request that finds every decode slot busy and the queue full."""
    return RequestError(
        f"this worker is at capacity: {slots} requests decoding and {max_queue} waiting; retry later",
        None, status=503, code="overloaded",
    )  # fmt: skip
