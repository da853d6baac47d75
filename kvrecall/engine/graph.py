"""CUDA graph capture of a static-shaped step, with an eager fallback."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch


class GraphStep:
    """Runs `fn` as a CUDA graph replay where it can be captured, else eagerly.

    `graphed` says which; `error` holds why capture failed. `fn` is warmed up twice on a side
    stream first (compilation, cuBLAS handles and workspaces stay out of the graph), as
    PyTorch recommends. The graph's memory pool is freed with this object.
    """

    def __init__(self, fn: Callable[[], Any], device: torch.device, use_graph: bool = True) -> None:
        self.fn = fn
        self.graph: torch.cuda.CUDAGraph | None = None
        self.error: str | None = None
        if device.type != "cuda" or not use_graph:
            return
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            fn()
            fn()
        torch.cuda.current_stream(device).wait_stream(side)
        torch.cuda.synchronize(device)
        try:
            graph = torch.cuda.CUDAGraph()
            # thread_local: a daemon embedded in this process (server.embedded) launches and syncs
            # on its own threads meanwhile; only this thread's calls may not break the capture
            with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                fn()
            self.graph = graph
        except Exception as exc:  # capture failed: run eagerly and say so
            self.error = f"{type(exc).__name__}: {exc}"[:300]
            torch.cuda.synchronize(device)

    @property
    def graphed(self) -> bool:
        return self.graph is not None

    def __call__(self) -> None:
        if self.graph is not None:
            self.graph.replay()
        else:
            self.fn()
