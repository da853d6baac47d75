"""BatchedEngine: continuous batching, so concurrent requests share batched decode steps.

One scheduler thread owns a `kvrecall.engine.Engine` (its slots, its sessions, its model
step; none of it is thread-safe). Each turn it

1. admits waiting requests into free slots, in arrival order: opens the request's session
   with its policy, then `Engine.add` prefills the prompt in one pass and ingests its KV
   (the lean path: no transformers cache); the first token comes from the prefill;
2. runs one decode step for every running request and hands each its token (with `overlap`,
   the default, the step after it is already launched: its host work runs while the GPU
   decodes, and a request that ends drops the token that step made for it);
3. frees the slot of a request that is done: an EOS token ("stop"), max_tokens ("length"),
   or cancelled (its client left, a stop string matched); its session is closed.

Requests that find every slot busy wait in a FIFO queue of at most `max_queue`; past that,
`start` refuses with a 503. Admission runs on the scheduler thread, so a long prompt's
prefill pauses the running requests for its duration (the engine has no chunked prefill).

Every request keeps its own policy and budget: the engine runs louiskv and windowkv
(boundary flags computed on the device), quest (a retrieval after every step, for the
next), full, streaming and snapkv side by side. Each slot's arithmetic does not depend on
the others' (the step always covers all slots), so a request decodes the same tokens
alone or in a full batch; with a budget covering the sequence, every policy decodes what
full KV does. If a step fails (the daemon went away), the running requests end with the
error and the engine is rebuilt for the next ones.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import threading

import torch

from kvrecall.client import KVRecallClient
from kvrecall.client.hf import spec_for
from kvrecall.engine import DecoderWeights, Engine
from kvrecall.engine.engine import DEFAULT_LAG, SWITCH_INTERVAL_S
from kvrecall.models.pretrained import LoadedModel
from kvrecall.serve.generation import (
    SESSION_MARGIN,
    Generation,
    GenerationRequest,
    log_finished,
    queue_full,
    session_plan,
)
from kvrecall.serve.protocol import RequestError

log = logging.getLogger("kvrecall.serve")

# Working-set slots beyond a session's tokens: the sinks and the window ring policies add to a
# budget (louiskv's defaults: 16 + 64, and deferred eviction's spare spill_every ring slots).
CAPACITY_SLACK = 256


def unbatchable(model: torch.nn.Module) -> str | None:
    """Why the batched engine cannot run `model` (a transformers model), or None: it runs
    Llama-architecture decoders without biases (engine/decoder.py's arithmetic)."""
    config = model.config
    if config.model_type != "llama":
        return f"model_type {config.model_type!r} is not a Llama architecture"
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        return "its attention or MLP projections have biases"
    return None


@dataclasses.dataclass(eq=False)
class _Entry:
    """A request in the queue or in a slot."""

    request: GenerationRequest
    generation: Generation
    session: object | None = None  # kvrecall.client.WorkerSession, once admitted
    slot: int = -1
    tokens: int = 0  # tokens handed to the generation


class BatchedEngine:
    """Decodes up to `slots` requests in shared steps (see the module docstring), for a model
    `unbatchable` accepts."""

    def __init__(
        self, loaded: LoadedModel, client: KVRecallClient, slots: int, max_queue: int, max_model_len: int,
        lag: int | None = None, overlap: bool = True, switch: str = "fixed", switch_interval: float = SWITCH_INTERVAL_S,
    ) -> None:  # fmt: skip
        self.loaded = loaded
        self.switch_interval = switch_interval  # the interpreter's (Engine's switch_interval)
        self.lag = DEFAULT_LAG if lag is None else lag
        self.switch = switch  # when a crossed request leaves its shadow (Engine's `switch`)
        # Each step launched before the host work of the one before (Engine overlap; its sessions
        # are deferred-eviction ones): needs a lag of at least 1, so lag 0 runs without it.
        self.overlap = overlap and self.lag >= 1
        self.client = client
        self.slots = slots
        self.max_queue = max_queue
        self.weights = DecoderWeights.from_hf(loaded.model)
        self.max_capacity = max_model_len + SESSION_MARGIN + CAPACITY_SLACK
        self.engine = self._new_engine()
        # Guards the three stages a request goes through; notified when _waiting grows, and on close.
        self._lock = threading.Condition()
        self._waiting: collections.deque[_Entry] = collections.deque()
        self._admitting: list[_Entry] = []  # taken from the queue for free slots, not yet in one
        self._running: dict[int, _Entry] = {}  # slot -> entry
        self._closing = False
        self._thread = threading.Thread(target=self._schedule, name="kvrecall-batch", daemon=True)
        self._thread.start()

    def _new_engine(self) -> Engine:
        return Engine(self.weights, batch=self.slots, max_capacity=self.max_capacity, lag=self.lag,
                      overlap=self.overlap, switch=self.switch, switch_interval=self.switch_interval)

    def load(self) -> dict[str, int]:
        with self._lock:
            waiting = len(self._waiting) + len(self._admitting)
            return {"slots": self.slots, "running": len(self._running), "waiting": waiting}

    async def start(self, request: GenerationRequest) -> Generation:
        entry = _Entry(request, Generation())
        with self._lock:
            if len(self._waiting) + len(self._admitting) + len(self._running) >= self.slots + self.max_queue:
                raise queue_full(self.slots, self.max_queue)
            self._waiting.append(entry)
            self._lock.notify()
        try:
            await entry.generation.wait_opened()
        except asyncio.CancelledError:  # the client left: out of the queue if still in it
            with self._lock:
                if entry in self._waiting:
                    self._waiting.remove(entry)
                    log.info("a request left the queue before it started (%d prompt tokens)", len(request.prompt_ids))
            raise
        return entry.generation

    def close(self) -> None:
        """Stop the scheduler: running requests end as cancelled, waiting ones are refused."""
        with self._lock:
            self._closing = True
            self._lock.notify()
        self._thread.join()

    # ---- the scheduler thread -----------------------------------------------------------------
    def _schedule(self) -> None:
        while True:
            with self._lock:
                while not (self._closing or self._waiting or self._running):
                    self._lock.wait()
                if self._closing:
                    break
                while self._waiting and len(self._running) + len(self._admitting) < self.slots:
                    self._admitting.append(self._waiting.popleft())
                admitting = list(self._admitting)
            try:
                for entry in admitting:
                    try:
                        self._admit(entry)
                    finally:
                        with self._lock:
                            if entry in self._admitting:
                                self._admitting.remove(entry)
                if self._running:
                    self._step()
            except Exception as exc:  # noqa: BLE001 - the running requests end with it
                self._fail_running(exc)
        self._shut_down()

    def _admit(self, entry: _Entry) -> None:
        request, generation = entry.request, entry.generation
        if generation.left_in_queue(request):
            return
        model = self.loaded.model
        try:
            capacity, config = session_plan(request, self.loaded.tokenizer)
            session = self.client.open_session(  # deferred eviction: no step waits for an AppendNotice
                spec_for(model, capacity), request.policy, config, tag=self.client.worker_id, deferred_eviction=True
            )
        except Exception as exc:  # noqa: BLE001 - handed to the request's handler
            generation.opened(exc)
            return
        try:
            if session.capacity > self.max_capacity:
                raise RequestError(
                    f"kvrecall.budget: the policy's working set of {session.capacity} tokens exceeds this "
                    f"worker's {self.max_capacity}", "kvrecall.budget",
                )  # fmt: skip
            prompt = torch.tensor(request.prompt_ids, device=self.weights.device)
            entry.slot = self.engine.add(session, prompt)
        except Exception as exc:  # noqa: BLE001 - handed to the request's handler
            _close_quietly(session)
            generation.opened(exc)
            return
        entry.session = session
        stats = generation.stats
        stats.session_id, stats.policy_config, stats.max_batch = session.session_id, session.policy_config, 1
        with self._lock:
            self._running[entry.slot] = entry
            self._admitting.remove(entry)
        generation.opened()
        self._deliver(entry, self.engine.sequences[entry.slot].tokens[0])

    def _step(self) -> None:
        tokens = self.engine.step()
        for slot, token in tokens.items():
            entry = self._running[slot]
            entry.generation.stats.max_batch = max(entry.generation.stats.max_batch, len(tokens))
            self._deliver(entry, token)

    def _fail_running(self, exc: Exception) -> None:
        """A step (or a slot's removal) failed, e.g. the daemon went away: the running requests
        end with the error and a fresh engine takes the next ones."""
        log.exception("decode step failed: %d running requests end with it; the engine is rebuilt",
                      len(self._running))  # fmt: skip
        for entry in list(self._running.values()):
            _close_quietly(entry.session)
            entry.generation.put(exc)
            entry.generation.end()
        with self._lock:
            self._running.clear()
        broken, self.engine = self.engine, self._new_engine()
        broken.close()

    def _deliver(self, entry: _Entry, token: int) -> None:
        """Hand `token` to its request, or end the request (the checks of SerialEngine, in its order)."""
        generation = entry.generation
        if generation.cancelled:
            self._finish(entry, "cancelled")
        elif token in self.loaded.eos_token_ids:
            self._finish(entry, "stop")
        else:
            generation.put(token)
            entry.tokens += 1
            if entry.tokens >= entry.request.max_tokens:
                self._finish(entry, "length")

    def _finish(self, entry: _Entry, reason: str) -> None:
        sequence = self.engine.remove(entry.slot)
        with self._lock:
            del self._running[entry.slot]
        stats = entry.generation.stats
        stats.retrievals, stats.appends = sequence.boundaries, sequence.appends
        entry.generation.finish_reason = reason
        _close_quietly(entry.session)
        log_finished(entry.request, entry.generation, entry.tokens)
        entry.generation.end()

    def _shut_down(self) -> None:
        for entry in list(self._running.values()):
            self._finish(entry, "cancelled")
        with self._lock:
            waiting, self._waiting = list(self._waiting), collections.deque()
        for entry in waiting:
            entry.generation.opened(RequestError("the worker is shutting down", None, status=503))
        self.engine.close()


def _close_quietly(session) -> None:
    try:
        session.close()
    except Exception as exc:  # noqa: BLE001 - the daemon reclaims it when its lease lapses
        log.warning("session %s: close failed (%s); its lease will lapse", session.session_id, exc)
