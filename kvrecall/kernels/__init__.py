"""kvrecall's compute kernels: one Triton kernel per op beside a PyTorch reference.

Every public function checks its arguments (ValueError naming the argument) and then runs one
implementation, chosen by `impl`:

* "auto" (default): the Triton kernel when the tensors are on CUDA and Triton imports, else
  the reference (`reference.py`): the daemon's CPU path;
* "triton": the kernel, or RuntimeError where none can run (CPU tensors need
  TRITON_INTERPRET=1 set before triton is first imported);
* "reference": the PyTorch reference.

A kernel's launcher still falls back to the reference for sizes its kernel does not cover
(noted per op). Triton is imported lazily, only when a kernel is asked for. Float inputs may
be float32, float16 or bfloat16; math is float32. B is a batch of independent
(layer, kv-head) problems.

One module per op holds its public function(s) (argument checks and the dispatch):
clustering.py (k-means), unit_scores.py, budget.py, row_gather.py, expand.py, placement.py,
cosine.py, windows.py, quest.py, ws_decode.py, unit_append.py, notice.py, attention.py and
host_attention.py (reference only).
Beside each, `<op>_triton.py` holds the Triton kernel and its launcher; reference.py holds
every op in PyTorch. This file only re-exports.

Compiled variants: Triton specialises an integer argument on being 1 or a multiple of 16, so
a kernel compiles again the first time a count (tokens, units, rows, a session's first slot)
falls in the other class. The daemon's kernels name every argument that depends on the
workload rather than on the model layout in `do_not_specialize`: a layout's kernels are then
those the daemon's warm-up compiled, and no session pays a compile (strides of the K/V
layout and the head dim stay specialised, as the loads' vectorisation depends on them).
"""

from kvrecall.kernels.attention import attention_at_positions, masked_attention
from kvrecall.kernels.budget import select_under_budget
from kvrecall.kernels.clustering import kmeans, kmeans_assign, kmeans_update
from kvrecall.kernels.cosine import cosine_similarity
from kvrecall.kernels.expand import expand_grouped, expand_pinned, expand_selection
from kvrecall.kernels.host_attention import attend_blocks, causal_attention_lse, merge_attention
from kvrecall.kernels.notice import spill_evict_many
from kvrecall.kernels.placement import (
    always_staged,
    background_reads,
    place_retrieved,
    place_retrieved_many,
    set_host_reads,
    spill_ring,
    store_tokens,
)
from kvrecall.kernels.quest import quest_page_bounds, quest_page_scores
from kvrecall.kernels.row_gather import gather_rows
from kvrecall.kernels.unit_append import append_units
from kvrecall.kernels.unit_scores import AGGREGATIONS, score_units
from kvrecall.kernels.windows import WINDOW_MODES, window_scores

__all__ = [
    "AGGREGATIONS",
    "WINDOW_MODES",
    "always_staged",
    "append_units",
    "background_reads",
    "attend_blocks",
    "attention_at_positions",
    "causal_attention_lse",
    "cosine_similarity",
    "expand_grouped",
    "expand_pinned",
    "expand_selection",
    "gather_rows",
    "kmeans",
    "kmeans_assign",
    "kmeans_update",
    "masked_attention",
    "merge_attention",
    "place_retrieved",
    "place_retrieved_many",
    "quest_page_bounds",
    "quest_page_scores",
    "score_units",
    "select_under_budget",
    "set_host_reads",
    "spill_evict_many",
    "spill_ring",
    "store_tokens",
    "window_scores",
]
