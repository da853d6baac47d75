"""The decode engine of a serving worker: turns a request into tokens, decoded through the daemon.

Every request gets its own session (opened with the request's policy, closed when it ends,
whatever the reason) and a KVRecallCache over it. `SerialEngine` decodes one request at a time
on one thread: the model, its attention hook and the caches are not thread-safe, and on one
device concurrent requests would only share the same compute. Requests that arrive meanwhile
wait in the executor's queue in arrival order.

The seam for continuous batching: an engine that advances all running requests by one shared
batched decode step implements the same `start(request) -> Generation`; the HTTP layer does
not change.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import logging
import threading
from typing import Any

import torch

from kvrecall.client import KVRecallClient
from kvrecall.client.core import fit_to_sequence
from kvrecall.models.pretrained import LoadedModel
from kvrecall.tasktype import with_task
from kvrecall.worker import open_model_session, stream_tokens

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
    """What a finished generation reports (the response's `kvrecall` field)."""

    session_id: str = ""
    policy_config: dict[str, Any] = dataclasses.field(default_factory=dict)
    retrievals: int = 0
    appends: int = 0


_END = object()


class Generation:
    """One request's tokens as they are decoded. Async-iterate for token ids; `finish_reason`
    ("stop": an EOS token, "length": max_tokens, "cancelled") is set when the iteration ends. `cancel()`
    (a client gone, a stop string) ends decoding after the current step."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._queue: asyncio.Queue = asyncio.Queue()
        self._cancelled = threading.Event()
        self.finish_reason = "length"
        self.stats = GenerationStats()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def cancel(self) -> None:
        self._cancelled.set()

    def put(self, item: object) -> None:
        """From the decoding thread: a token id, an exception, or the end."""
        self._loop.call_soon_threadsafe(self._queue.put_nowait, item)

    def end(self) -> None:
        self.put(_END)

    def __aiter__(self) -> Generation:
        return self

    async def __anext__(self) -> int:
        item = await self._queue.get()
        if item is _END:
            raise StopAsyncIteration
        if isinstance(item, BaseException):
            raise item
        return item


class SerialEngine:
    """Decodes requests one at a time on a single thread (see the module docstring)."""

    def __init__(self, loaded: LoadedModel, client: KVRecallClient, device: str) -> None:
        self.loaded = loaded
        self.client = client
        self.device = torch.device(device)
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="decode")

    async def start(self, request: GenerationRequest) -> Generation:
        """Queue `request`; returns once its session is open, so a request the daemon refuses
        (unknown policy, bad config, no memory) raises here, before any response is sent."""
        loop = asyncio.get_running_loop()
        generation = Generation(loop)
        opened: asyncio.Future = loop.create_future()
        loop.run_in_executor(self._executor, self._run, request, generation, opened)
        try:
            await opened
        except BaseException:
            generation.cancel()
            raise
        return generation

    def close(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)

    def _settle(self, opened: asyncio.Future, error: BaseException | None) -> None:
        def settle() -> None:
            if opened.done():
                return
            if error is None:
                opened.set_result(None)
            else:
                opened.set_exception(error)

        opened.get_loop().call_soon_threadsafe(settle)

    def _run(self, request: GenerationRequest, generation: Generation, opened: asyncio.Future) -> None:
        if generation.cancelled:  # the client left while the request waited
            log.info("a request left the queue before it started (%d prompt tokens)", len(request.prompt_ids))
            self._settle(opened, asyncio.CancelledError())
            return
        model = self.loaded.model
        input_ids = torch.tensor([request.prompt_ids], device=self.device)
        try:
            capacity = len(request.prompt_ids) + request.max_tokens + SESSION_MARGIN
            # A budget past the sequence covers it: cap it (the daemon refuses larger ones).
            config = fit_to_sequence(with_task(model, request.policy, request.policy_config, input_ids), capacity)
            session, cache = open_model_session(
                self.client, model, request.policy, config, capacity, tag=self.client.worker_id
            )
        except Exception as exc:  # noqa: BLE001 - handed to the request's handler
            self._settle(opened, exc)
            return
        self._settle(opened, None)
        stats = generation.stats
        stats.session_id, stats.policy_config = session.session_id, session.policy_config
        tokens = 0
        try:
            with session:
                eos = self.loaded.eos_token_ids
                for token, _ in stream_tokens(model, cache, input_ids, request.max_tokens, eos):
                    if generation.cancelled:
                        generation.finish_reason = "cancelled"
                        break
                    if token in eos:
                        generation.finish_reason = "stop"
                        break
                    generation.put(token)
                    tokens += 1
            stats.retrievals, stats.appends = cache.stats.boundaries, cache.stats.appends
            log.info(
                "session %s: %s %s, %d prompt + %d tokens, %d retrievals (%s)", stats.session_id,
                request.policy, stats.policy_config.get("budget", ""), len(request.prompt_ids), tokens,
                stats.retrievals, generation.finish_reason,
            )  # fmt: skip
        except Exception as exc:  # noqa: BLE001 - the stream ends with it
            log.exception("session %s: decoding failed", stats.session_id)
            generation.put(exc)
        finally:
            generation.end()
