"""SerialEngine: decodes one request at a time through the transformers model, for models the
batched engine (serve/batched.py) cannot run (architectures other than Llama-style ones, or
attention with biases, e.g. Qwen2).

Every request gets its own session (opened with the request's policy, closed when it ends,
whatever the reason) and a KVRecallCache over it; the prompt is prefilled in the cache's
chunks. One thread decodes: the model, its attention hook and the caches are not
thread-safe. Requests that arrive meanwhile wait in arrival order, at most `max_queue`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading

import torch

from kvrecall.client import KVRecallClient
from kvrecall.models.pretrained import LoadedModel
from kvrecall.serve.generation import Generation, GenerationRequest, log_finished, queue_full, session_plan
from kvrecall.worker import open_model_session, stream_tokens

log = logging.getLogger("kvrecall.serve")


class SerialEngine:
    """Decodes requests one at a time on a single thread (see the module docstring)."""

    slots = 1

    def __init__(self, loaded: LoadedModel, client: KVRecallClient, device: str, max_queue: int) -> None:
        self.loaded = loaded
        self.client = client
        self.device = torch.device(device)
        self.max_queue = max_queue
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="decode")
        self._lock = threading.Lock()
        self._queued = 0  # submitted, not yet finished: the running one and those waiting

    def load(self) -> dict[str, int]:
        with self._lock:
            queued = self._queued
        return {"slots": self.slots, "running": min(queued, 1), "waiting": max(queued - 1, 0)}

    async def start(self, request: GenerationRequest) -> Generation:
        with self._lock:
            if self._queued >= self.slots + self.max_queue:
                raise queue_full(self.slots, self.max_queue)
            self._queued += 1
        generation = Generation()
        future = asyncio.get_running_loop().run_in_executor(self._executor, self._run, request, generation)
        future.add_done_callback(self._done)
        await generation.wait_opened()
        return generation

    def close(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)

    def _done(self, _: asyncio.Future) -> None:
        with self._lock:
            self._queued -= 1

    def _run(self, request: GenerationRequest, generation: Generation) -> None:
        if generation.left_in_queue(request):
            return
        model = self.loaded.model
        try:
            capacity, config = session_plan(request, self.loaded.tokenizer)
            session, cache = open_model_session(
                self.client, model, request.policy, config, capacity, tag=self.client.worker_id
            )
        except Exception as exc:  # noqa: BLE001 - handed to the request's handler
            generation.opened(exc)
            return
        generation.opened()
        stats = generation.stats
        stats.session_id, stats.policy_config = session.session_id, session.policy_config
        stats.max_batch = 1
        tokens = 0
        input_ids = torch.tensor([request.prompt_ids], device=self.device)
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
            log_finished(request, generation, tokens)
        except Exception as exc:  # noqa: BLE001 - the stream ends with it
            log.exception("session %s: decoding failed", stats.session_id)
            generation.put(exc)
        finally:
            generation.end()
