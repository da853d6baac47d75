"""Decoding a transformers model through a kvrecall session (the model-worker side).

`decode` runs prefill + greedy decoding, `teacher_force` replays a given continuation and
returns the logits at every step (for fidelity against full attention).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from tqdm import tqdm

from kvrecall.client.hf import KVRecallCache, prefill, spec_for, use_kvrecall_attention


@dataclass
class DecodeResult:
    tokens: list[int]
    logits: list[torch.Tensor] = field(repr=False)  # per generated step, [vocab] float32
    prefill_seconds: float
    decode_seconds: float
    boundaries: int
    appends: int
    max_resident: int
    host_tokens: int
    similarities: list[float] = field(default_factory=list, repr=False)


def open_model_session(
    client, model, policy: str, config: dict | None, max_tokens: int, tag: str = "", signal: str | None = None,
    chunk_tokens: int | None = None, layer_major: bool = True, prefix=None,
):
    """A session shaped for `model`, and the cache that decodes through it (`signal`: the
    boundary signal's query view; `chunk_tokens`: prefill in chunks, `layer_major`: a fresh
    prompt's chunks layer by layer; see KVRecallCache; `prefix`: the prompt's shareable prefix,
    a PrefixDeclaration: see kvrecall.prefix)."""
    session = client.open_session(spec_for(model, max_tokens), policy, config, tag=tag, prefix=prefix)
    use_kvrecall_attention(model)
    return session, KVRecallCache(
        session, record_similarity=True, signal=signal, chunk_tokens=chunk_tokens, layer_major=layer_major
    )


def decode_step(model, cache, token: int, position: int, device: torch.device) -> torch.Tensor:
    """Feed `token` at `position` through `model` (on `device`) with `cache`; the next-token
    logits [V] float32."""
    out = model(
        input_ids=torch.tensor([[token]], device=device),
        cache=cache,
        use_cache=True,
        position_ids=torch.tensor([[position]], device=device),
        cache_position=torch.tensor([position], device=device),
    )
    return out.logits[0, -1].float()


@torch.no_grad()
def stream_tokens(
    model,
    cache: KVRecallCache,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    eos_token_ids: set[int] | None = None,
    forced: list[int] | None = None,
) -> Iterator[tuple[int, torch.Tensor]]:
    """Prefill `input_ids` [1, T], then yield (token, its logits [V] float32) per step: greedy
    up to `max_new_tokens` or an EOS token (included), or the `forced` tokens (teacher forcing).
    The first item comes right after the prefill."""
    logits = prefill(model, cache, input_ids)  # after what the cache holds, in its chunks
    steps = len(forced) if forced is not None else max_new_tokens
    position = cache.seq_length
    for step in range(steps):
        token = forced[step] if forced is not None else int(logits.argmax())
        yield token, logits
        if step == steps - 1 or (forced is None and eos_token_ids and token in eos_token_ids):
            return
        logits = decode_step(model, cache, token, position, input_ids.device)
        position += 1


def decode(
    model,
    cache: KVRecallCache,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    eos_token_ids: set[int] | None = None,
    forced: list[int] | None = None,
    progress: bool = False,
) -> DecodeResult:
    """Prefill `input_ids` [1, T] (after what the cache holds already; in the cache's chunks),
    then decode greedily (or feed `forced` tokens: teacher forcing)."""
    if progress:
        print(f"prefill: {input_ids.shape[1]} tokens ...", flush=True)
    started = time.perf_counter()
    prefill = 0.0
    logits: list[torch.Tensor] = []
    tokens: list[int] = []
    steps = len(forced) if forced is not None else max_new_tokens
    bar = tqdm(total=steps, desc="decode", unit="tok", disable=not progress, leave=False)
    for token, step_logits in stream_tokens(model, cache, input_ids, max_new_tokens, eos_token_ids, forced):
        if not tokens:  # the first token comes right after the prefill
            prefill = time.perf_counter() - started
            started = time.perf_counter()
        tokens.append(token)
        logits.append(step_logits)
        bar.update(1)
    bar.close()
    cache.session.flush()
    stats = cache.session.stats()
    return DecodeResult(
        tokens=tokens,
        logits=logits,
        prefill_seconds=prefill,
        decode_seconds=time.perf_counter() - started,
        boundaries=cache.stats.boundaries,
        appends=cache.stats.appends,
        max_resident=max(cache.stats.max_resident, stats.max_resident_tokens),
        host_tokens=stats.host_tokens,
        similarities=list(cache.stats.similarities),
    )
