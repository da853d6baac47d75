"""Tensor-parallel model workers: one daemon per GPU, one session per rank (docs/MULTIGPU.md).

group = TPGroup.from_env()                      # torchrun variables; gloo or NCCL
model = TPLlama.from_hf(hf_model, group, device)  # this rank's shard
client = KVRecallClient(daemon_of_my_gpu, worker_id)
session, cache = open_tp_session(client, model, "louiskv", {"budget": 1024}, max_tokens)
result = tp_decode(model, cache, input_ids, steps)
"""

from kvrecall.tp.boundary import AgreedBoundaryDetector
from kvrecall.tp.decode import TPDecodeResult, open_tp_session, tp_decode
from kvrecall.tp.group import TPGroup
from kvrecall.tp.model import TPLlama, TPShape

__all__ = [
    "AgreedBoundaryDetector",
    "TPDecodeResult",
    "TPGroup",
    "TPLlama",
    "TPShape",
    "open_tp_session",
    "tp_decode",
]
