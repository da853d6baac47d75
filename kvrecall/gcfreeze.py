"""Keep the interpreter's full collections short: freeze what setup built.

CPython's cyclic collector holds the interpreter lock while it runs, so every Python thread of
the process stops (the worker's step launches, the daemon's answers), and a full (generation 2)
collection walks every tracked object: after `import torch`, the gRPC stack and a model, ~250K
of them. In `kvrecall bench e2e --daemon embedded` on a 2-core host the full collections during
decoding took 112-122 ms each, two in a 112-step run; with setup's objects frozen, 0.6 ms
(bench/results/README.md, "twenty-ninth session"). `gc.freeze()` moves every object alive now
into a permanent generation the collector skips; reference counting still frees them, only a
cycle among them is never collected (setup leaves few). The daemon freezes once it serves
(`gc_freeze`, on by default), the worker once its engine is ready, the bench around each timed
configuration.

`unfreeze` runs at exit, so the collector sees every object again at shutdown (an extension's
leak check then finds its objects freed: Triton's bindings print "leaked function" otherwise).
"""

from __future__ import annotations

import atexit
import contextlib
import gc
from collections.abc import Iterator

_at_exit = False


def freeze() -> int:
    """Collect, then freeze every object alive: -> objects frozen in all."""
    global _at_exit
    gc.collect()
    gc.freeze()
    if not _at_exit:
        atexit.register(gc.unfreeze)
        _at_exit = True
    return gc.get_freeze_count()


@contextlib.contextmanager
def frozen(enabled: bool = True) -> Iterator[None]:
    """freeze() for a block (e.g. a timed run), unfrozen after it so its objects can go."""
    if not enabled:
        yield
        return
    freeze()
    try:
        yield
    finally:
        gc.unfreeze()
