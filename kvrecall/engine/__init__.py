"""A batched, graph-captured decode engine for Llama-style models over kvrecall sessions.

* weights.py   the model's weights (from transformers, or random at a real shape)
* decoder.py   the step's arithmetic over B slots and a one-sequence prefill
* sessions.py  attention over B sessions' working sets + the device-side boundary flags
* full.py      the baseline: full KV on the device, torch SDPA's GQA kernel over the live length
* graph.py     CUDA graph capture of a step
* engine.py    Engine: sequences join/leave, steps, the daemon calls after a step
"""

from kvrecall.engine.engine import Engine, Sequence
from kvrecall.engine.weights import LLAMA3_8B, DecoderShape, DecoderWeights

__all__ = ["LLAMA3_8B", "DecoderShape", "DecoderWeights", "Engine", "Sequence"]
