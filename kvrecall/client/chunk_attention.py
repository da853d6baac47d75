"""A chunk's causal attention over a layer's K/V so far, aligned to the end (the layer-major
prefill: chunk [a, a + n) of the prompt attends over keys [0, a + n)).

One SDPA call with an end-aligned causal mask is exact, but a mask keeps it off the flash
kernel (on a GPU it runs the slower memory-efficient kernel, GQA expanded). So on a GPU the
chunk is split where the mask is trivial:

* over the earlier tokens [0, a): no mask at all, so the query heads of one KV head are
  stacked as one longer query (GQA without expanding the keys) and flash runs unmasked;
* over itself [a, a + n): a square causal block, flash with is_causal (the chunk's K/V
  expanded to the query heads: one chunk's worth, not the layer's);

and the two halves merge by their log-sum-exps (softmax over the union of the keys). Every
query sees exactly the keys the mask gives it, so the result is full attention's.

The kernel that returns a log-sum-exp is picked once per (device, dtype, head dim): cuDNN's
fused attention (what SDPA itself runs for a one-pass causal prefill on Hopper) when it
agrees with the f32 reference on a small problem of the same layout, else PyTorch's flash.
On one H200 a 32K prefill's attention took 784 ms over 32 layers on flash against 492 ms on
cuDNN inside the one-pass prefill (bench.prefill --kernels).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right

FLASH_DTYPES = (torch.float16, torch.bfloat16)
LseKernel = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, float, bool], tuple[torch.Tensor, torch.Tensor]]

log = logging.getLogger("kvrecall.attention")


def _flash(query, keys, values, scale: float, causal: bool) -> tuple[torch.Tensor, torch.Tensor]:
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention(query, keys, values, 0.0, causal, False, scale=scale)[:2]
    return out, lse.reshape(out.shape[:-1])


def _cudnn(query, keys, values, scale: float, causal: bool) -> tuple[torch.Tensor, torch.Tensor]:
    out, lse = torch.ops.aten._scaled_dot_product_cudnn_attention(
        query, keys, values, None, True, 0.0, causal, False, scale=scale
    )[:2]
    return out, lse.reshape(out.shape[:-1])


def reference_lse(query, keys, values, scale: float, causal: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """attention_lse in f32 from the scores (any device, any dtype)."""
    scores = (query.float() @ keys.float().transpose(-1, -2)) * scale
    if causal:
        m = scores.shape[-1]
        scores = scores.masked_fill(torch.ones(m, m, dtype=torch.bool, device=scores.device).triu(1), float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    out = torch.exp(scores - lse[..., None]) @ values.float()
    return out.to(query.dtype), lse


def choose_kernel(candidates: list[tuple[str, LseKernel]], device, dtype: torch.dtype, dim: int) -> tuple[str, LseKernel]:
    """The first candidate whose output and log-sum-exp match reference_lse on a small problem
    laid out as the chunk attention's (stacked queries over a slice of a longer key buffer,
    and a causal square); the last candidate when none does."""
    generator = torch.Generator(device=device).manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=generator, device=device).to(dtype)

    buffer_k, buffer_v, query = randn(1, 2, 160, dim), randn(1, 2, 160, dim), randn(1, 2, 96, dim)
    cases = [(query, buffer_k[:, :, :72], buffer_v[:, :, :72], False),
             (query[:, :, :48], buffer_k[:, :, 72:120], buffer_v[:, :, 72:120], True)]  # fmt: skip
    for name, kernel in candidates:
        try:
            ok = True
            for q, k, v, causal in cases:
                out, lse = kernel(q, k, v, dim**-0.5, causal)
                want_out, want_lse = reference_lse(q, k, v, dim**-0.5, causal)
                ok &= out.shape == want_out.shape and lse.shape == want_lse.shape
                ok &= bool((out.float() - want_out.float()).abs().max() < 3e-2)
                ok &= bool((lse.float() - want_lse).abs().max() < 1e-2)
        except RuntimeError as exc:
            log.info("attention kernel %s unavailable on %s for %s, head dim %d: %s", name, device, dtype, dim, exc)
            continue
        if ok:
            return name, kernel
        log.warning("attention kernel %s disagrees with the reference on %s (%s, head dim %d): not used",
                    name, device, dtype, dim)  # fmt: skip
    return candidates[-1]


_CHOSEN: dict[tuple, tuple[str, LseKernel]] = {}


def lse_kernel(device: torch.device, dtype: torch.dtype, dim: int) -> tuple[str, LseKernel]:
    key = (device, dtype, dim)
    if key not in _CHOSEN:
        _CHOSEN[key] = choose_kernel([("cudnn", _cudnn), ("flash", _flash)], device, dtype, dim)
        log.info("chunk attention on %s (%s, head dim %d): %s", device, dtype, dim, _CHOSEN[key][0])
    return _CHOSEN[key]


def attention_lse(
    query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scale: float, causal: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """query [1, H, m, D] over keys / values [1, H, S, D] (as many heads; causal: m == S) ->
    (out [1, H, m, D] in query's dtype, log-sum-exp of the scaled scores [1, H, m] f32).
    On a GPU with 16-bit inputs the kernel lse_kernel picked (cuDNN or flash), else scores in
    f32 (the reference)."""
    if query.is_cuda and query.dtype in FLASH_DTYPES:
        name, kernel = lse_kernel(query.device, query.dtype, query.shape[-1])
        try:
            return kernel(query, keys, values, scale, causal)
        except RuntimeError:
            if name == "flash":
                raise
            log.warning("cuDNN attention refused a chunk of %s; flash from here on", tuple(query.shape))
            _CHOSEN[(query.device, query.dtype, query.shape[-1])] = ("flash", _flash)
            return _flash(query, keys, values, scale, causal)
    return reference_lse(query, keys, values, scale, causal)


def merge(first: tuple[torch.Tensor, torch.Tensor], second: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Attention outputs over two disjoint key sets, with their log-sum-exps -> attention over
    the union: the first's share of the softmax mass is sigmoid(lse_1 - lse_2)."""
    (out_1, lse_1), (out_2, lse_2) = first, second
    share = torch.sigmoid(lse_1 - lse_2).unsqueeze(-1)
    return torch.lerp(out_2.float(), out_1.float(), share).to(out_1.dtype)


def split_causal_attention(
    query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scale: float, group: int
) -> torch.Tensor:
    """causal_attention (n < S) as the unmasked earlier part and the causal square, merged."""
    _, Hq, n, D = query.shape
    H, earlier = keys.shape[1], keys.shape[2] - n
    stacked = query.reshape(1, H, group * n, D)  # query head h * group + g uses KV head h
    out, lse = attention_lse(stacked, keys[:, :, :earlier], values[:, :, :earlier], scale, causal=False)
    before = (out.reshape(1, Hq, n, D), lse.reshape(1, Hq, n))
    own_k, own_v = keys[:, :, earlier:], values[:, :, earlier:]
    if group > 1:
        own_k, own_v = own_k.repeat_interleave(group, dim=1), own_v.repeat_interleave(group, dim=1)
    own = attention_lse(query, own_k, own_v, scale, causal=True)
    return merge(before, own)


def causal_attention(
    query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scale: float, group: int,
    split: bool | None = None,
) -> torch.Tensor:  # fmt: skip
    """query [1, Hq, n, D], the last n of keys / values [1, H, S, D]: query i attends over keys
    [0, S - n + i] (causal, aligned to the end). split (default: on a GPU with 16-bit inputs)
    takes the flash path above; otherwise one SDPA call with the end-aligned mask, GQA unexpanded."""
    n, S = query.shape[2], keys.shape[2]
    if n == S:
        return F.scaled_dot_product_attention(query, keys, values, is_causal=True, scale=scale, enable_gqa=group > 1)
    if split is None:
        split = query.is_cuda and query.dtype in FLASH_DTYPES
    if split:
        return split_causal_attention(query, keys, values, scale, group)
    return F.scaled_dot_product_attention(
        query, keys, values, attn_mask=causal_lower_right(n, S), scale=scale, enable_gqa=group > 1
    )
