"""Streamed ingest: a prompt goes to the daemon layer by layer, while the model computes.

    stream = PromptStream(session, num_tokens)
    for layer in ...:                      # right after that layer's attention used its K/V
        stream.send(layer, keys, values, queries)
    response = stream.finish()

Each layer is copied into one reusable staging buffer ([1, 2, H, T, D], the session's
transport) and sent by a background thread (IngestPrompt with first_layer); before the next
layer is copied the previous call must have returned, so at most one layer is in flight
beside the one computing and the worker never holds the whole prompt's KV. The daemon
writes each layer to its host tier and does that layer's policy work as it arrives.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor

import torch

from kvrecall.client.staging import StagingBuffer
from kvrecall.transport import inline_ref
from kvrecall.v1 import kvrecall_pb2 as pb


class PromptStream:
    """One prompt of `num_tokens` tokens on its way to `session` (a WorkerSession)."""

    def __init__(self, session, num_tokens: int) -> None:
        self.session = session
        self.num_tokens = num_tokens
        self.buffer: StagingBuffer | None = None
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="kvrecall-ingest")
        self._pending: Future | None = None
        self.responses: list[pb.IngestPromptResponse] = []

    def send(self, layer: int, keys: torch.Tensor, values: torch.Tensor, queries: torch.Tensor | None = None) -> None:
        """Layer `layer`'s prompt keys / values [H, T, D] and its last queries [Hq, n_obs, D]
        (or None). Waits for the previous layer's call first (its staging buffer is reused)."""
        self._wait()
        core = self.session.core
        if self.buffer is None:
            shape = (1, 2, *keys.shape)
            self.buffer = StagingBuffer(shape, core.spec.dtype, core.transport, keys.device)
        self.buffer.tensor[0, 0].copy_(keys)
        self.buffer.tensor[0, 1].copy_(values)
        if queries is not None:
            queries = queries.to(core.spec.dtype, copy=True)  # the model may reuse its memory
        ready = None
        if keys.is_cuda:  # the call waits for the copies, the worker's stream does not
            ready = torch.cuda.Event()
            ready.record(torch.cuda.current_stream(keys.device))
        self._pending = self._executor.submit(self._call, layer, ready, queries)

    def _call(self, layer: int, ready: torch.cuda.Event | None, queries: torch.Tensor | None) -> pb.IngestPromptResponse:
        if ready is not None:
            ready.synchronize()
        client, core = self.session.client, self.session.core
        request = core.ingest_request(self.num_tokens, first_layer=layer)
        request.kv.CopyFrom(self.buffer.ref())
        if queries is not None:
            request.queries.CopyFrom(inline_ref(queries.unsqueeze(0)))
        return client.call(client.stub.IngestPrompt, request, timeout=max(client.timeout, 300))

    def _wait(self) -> None:
        if self._pending is not None:
            pending, self._pending = self._pending, None
            self.responses.append(pending.result())

    def finish(self) -> pb.IngestPromptResponse:
        """Wait for the last layer's answer (the ingest is complete) and free the staging."""
        try:
            self._wait()
        finally:
            self.close()
        core = self.session.core
        for response in self.responses:  # inline transport: each layer's sinks / window
            core.apply_delta(response.delta)
        core.start_at(self.num_tokens)
        return self.responses[-1]

    def close(self) -> None:
        """Free the staging buffer and the thread (also after a failure; idempotent)."""
        if self._pending is not None:
            self._pending.exception()  # let a call in flight end before its buffer goes
            self._pending = None
        self._executor.shutdown(wait=True)
        if self.buffer is not None:
            self.buffer.release()
            self.buffer = None
