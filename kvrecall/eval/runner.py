"""The model side of ``kvrecall eval``: one process's model, tokenizer and daemon client, and the
work units the harness schedules.

Units and their results are plain JSON objects, so a unit runs the same in-process or in a
worker subprocess (:mod:`kvrecall.eval.pool`):

* ``accuracy``: one long-input sample (task, length, depth, seed, family), decoded greedily
  under every (policy, budget) cell; returns one record per cell. Family ``doc_first``: the
  document is the prefill (the ingest) and the question one chunk after it
  (:func:`kvrecall.client.hf.prefill`), then greedy decoding.
* ``reference``: full KV's greedy continuation (``tokens`` tokens, EOS not stopping it) of a
  fidelity prompt, with the model's own cache.
* ``fidelity``: one (policy, budget) cell replaying a reference teacher-forced through the
  daemon; returns top-1 agreement and KL(full || policy) sums against the reference's logits
  (one batched forward pass of prompt + reference: exact full attention).

A unit carrying ``abandon_at`` (a ``time.time()`` value: the run's hard deadline) gives up
between decode steps once it has passed and returns ``{"kind": "abandoned"}``.

The prompt's prefill is computed once per prompt and handed to every cell's session: the
prompt KV and the last prompt queries are the same for every policy, only what the daemon
keeps of them differs (:class:`PrefilledCache`). On CUDA the session uses the CUDA IPC
transport (the working set is GPU memory the daemon shares), on CPU shared memory.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch
from torch.nn.functional import log_softmax

from kvrecall.client.core import fit_to_sequence
from kvrecall.client.hf import KVRecallCache, spec_for, use_kvrecall_attention
from kvrecall.client.hf import prefill as feed
from kvrecall.eval.cells import policy_config
from kvrecall.v1 import kvrecall_pb2 as pb
from kvrecall.worker import decode_step

CAPTURED_QUERIES = 64
"""Last prompt queries kept per layer from a prefill; a policy that observes more (snapkv's
``observation`` can reach 1024) gets a fresh prefill instead."""


CACHED = 2
"""Prefills and reference log-probabilities kept per process (short and long replays interleave)."""


def _keep_last(cache: dict, key: str, value: Any) -> None:
    """Insert ``key`` and drop the oldest entries beyond :data:`CACHED`."""
    cache.pop(key, None)
    cache[key] = value
    while len(cache) > CACHED:
        cache.pop(next(iter(cache)))


@dataclass
class Prefill:
    """One prompt's prefill, as KVRecallCache would ingest it.

    ``ids`` [1, T]; ``kv`` [L, 2, H, T, D] (keys after RoPE); ``queries`` [L, Hq, n, D] (the
    last ``n = min(T, CAPTURED_QUERIES)`` prompt queries); ``logits`` [V] float32 at the last
    prompt position; ``modules`` the attention modules KVRecallCache saw (or None)."""

    ids: torch.Tensor
    kv: torch.Tensor
    queries: torch.Tensor
    logits: torch.Tensor
    modules: list | None
    seconds: float
    windowkv_task: int | None = None  # the task classifier's hint for this prompt, once asked

    @property
    def num_tokens(self) -> int:
        return int(self.ids.shape[1])


class _PrefillSink:
    """Takes a session's place during one prefill: KVRecallCache streams it the prompt KV and
    the last queries layer by layer, which PrefilledCache then gives to each real session."""

    boundary_mode = pb.BOUNDARY_MODE_NEVER
    boundary_threshold = 0.0
    boundary_target_rate = 0.0
    boundary_min_gap = 0
    exact_chunks = False
    observation = CAPTURED_QUERIES
    prefix_tokens = prefix_held = 0  # no shared prefix: the whole prompt is prefilled

    def __init__(self, spec: Any) -> None:
        self.spec = spec
        self.layers: list[torch.Tensor] = []
        self.layer_queries: list[torch.Tensor] = []
        self.kv: torch.Tensor | None = None
        self.queries: torch.Tensor | None = None

    def prompt_stream(self, num_tokens: int) -> _PrefillSink:
        return self

    def send(self, layer: int, keys: torch.Tensor, values: torch.Tensor, queries: torch.Tensor) -> None:
        self.layers.append(torch.stack((keys, values)))
        self.layer_queries.append(queries)

    def finish(self) -> None:
        self.kv, self.queries = torch.stack(self.layers), torch.stack(self.layer_queries)

    def resident_tokens(self) -> int:
        return 0


class Abandoned(RuntimeError):
    """The unit passed its ``abandon_at`` time (the run's hard deadline) and was given up."""


class TooFewQueries(ValueError):
    """The session's policy observes more prompt queries than a Prefill captured."""


class PrefilledCache(KVRecallCache):
    """A KVRecallCache that starts from a Prefill computed once for every session of a prompt.

    :meth:`ingest_prefill` leaves the cache exactly as KVRecallCache's own prefill would: the
    session ingests the prompt K/V and last queries, and the cache takes the attention modules
    and last queries its forward pass would have seen (tests/test_eval_smoke.py checks the
    logits match a fresh prefill)."""

    def ingest_prefill(self, prefill: Prefill) -> None:
        n_obs = max(1, self.session.observation)
        if n_obs > prefill.queries.shape[2] and prefill.queries.shape[2] < prefill.num_tokens:
            raise TooFewQueries(
                f"policy observes {n_obs} queries, the prefill kept {prefill.queries.shape[2]}"
            )
        self.session.ingest(prefill.kv, prefill.queries[:, :, -n_obs:])
        self._last_queries = list(prefill.queries[:, :, -1].unbind(0))
        if prefill.modules is not None:
            self._attention_modules = list(prefill.modules)
        self._after_prompt(prefill.num_tokens)


@dataclass
class CellResult:
    tokens: list[int]
    logits: list[torch.Tensor]  # per generated step, [V] float32
    boundaries: int
    max_resident: int
    seconds: float


class Runner:
    """The model, tokenizer and daemon client one process decodes with."""

    def __init__(self, model: Any, tokenizer: Any, client: Any) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.client = client
        self.device = next(model.parameters()).device
        self.eos = {tokenizer.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")} - {None}
        self._prefills: dict[str, Prefill] = {}
        self._references: dict[str, torch.Tensor] = {}
        self.abandon_at: float | None = None  # time.time() after which the running unit gives up
        use_kvrecall_attention(model)

    # ---- building blocks ----------------------------------------------------------------
    def ids(self, prompt: str) -> torch.Tensor:
        return self.tokenizer(prompt, return_tensors="pt").input_ids.to(self.device)

    @torch.no_grad()
    def prefill(self, prompt: str) -> Prefill:
        """The prompt's prefill (the last CACHED ones are kept: a prompt's units run close together)."""
        if prompt in self._prefills:
            return self._prefills[prompt]
        started = time.perf_counter()
        ids = self.ids(prompt)
        sink = _PrefillSink(spec_for(self.model, ids.shape[1] + 1))
        cache = KVRecallCache(sink)
        out = self.model(input_ids=ids, cache=cache, use_cache=True, logits_to_keep=1)
        prefill = Prefill(
            ids,
            sink.kv,
            sink.queries,
            out.logits[0, -1].float(),
            getattr(cache, "_attention_modules", None),
            time.perf_counter() - started,
        )
        _keep_last(self._prefills, prompt, prefill)
        return prefill

    @torch.no_grad()
    def decode_cell(
        self,
        prefill: Prefill,
        policy: str,
        config: dict | None,
        new_tokens: int,
        forced: list[int] | None = None,
        stop: bool = True,
        question: torch.Tensor | None = None,
    ) -> CellResult:
        """One session of ``policy``: ingest the prefill, feed ``question`` [1, n] (if any) as
        one chunk after it, then decode greedily (stopping at EOS when ``stop``) or
        teacher-forced on ``forced``."""
        started = time.perf_counter()
        steps = len(forced) if forced is not None else new_tokens
        asked = 0 if question is None else int(question.shape[1])
        spec = spec_for(self.model, prefill.num_tokens + asked + steps + 16)
        config = fit_to_sequence(config, spec.max_tokens)  # a budget past a short sequence covers it
        with self.client.open_session(spec, policy, config, tag="eval", device=self.device) as session:
            cache = PrefilledCache(session)
            try:
                cache.ingest_prefill(prefill)
                logits = [prefill.logits]
            except TooFewQueries:
                out = self.model(
                    input_ids=prefill.ids, cache=cache, use_cache=True, logits_to_keep=1
                )
                logits = [out.logits[0, -1].float()]
            if question is not None:
                logits = [feed(self.model, cache, question, chunk_tokens=asked)]
            tokens: list[int] = []
            position = prefill.num_tokens + asked
            for step in range(steps):
                if self.abandon_at is not None and time.time() > self.abandon_at:
                    raise Abandoned(f"{policy}: stopped at step {step} of {steps}")
                token = forced[step] if forced is not None else int(logits[-1].argmax())
                tokens.append(token)
                if step == steps - 1 or (forced is None and stop and token in self.eos):
                    break
                logits.append(decode_step(self.model, cache, token, position, self.device))
                position += 1
            session.flush()
            resident = max(cache.stats.max_resident, session.stats().max_resident_tokens)
        return CellResult(
            tokens, logits[: len(tokens)], cache.stats.boundaries, resident, time.perf_counter() - started
        )

    @torch.no_grad()
    def greedy_full(self, prompt: str, new_tokens: int) -> list[int]:
        """Full KV's greedy continuation with the model's own cache (EOS does not stop it)."""
        from transformers import DynamicCache

        cache = DynamicCache()
        out = self.model(input_ids=self.ids(prompt), cache=cache, use_cache=True, logits_to_keep=1)
        tokens: list[int] = []
        for step in range(new_tokens):
            tokens.append(int(out.logits[0, -1].argmax()))
            if step == new_tokens - 1:
                break
            ids = torch.tensor([[tokens[-1]]], device=self.device)
            out = self.model(input_ids=ids, cache=cache, use_cache=True, logits_to_keep=1)
        return tokens

    @torch.no_grad()
    def reference_logp(self, prompt: str, tokens: list[int]) -> torch.Tensor:
        """Full attention's log-probabilities [n, V] float64 at each of the n forced steps: one
        forward pass over prompt + tokens[:-1] (the last CACHED are kept for their next cells)."""
        key = f"{prompt}\x00{len(tokens)}"
        if key not in self._references:
            forced = torch.tensor([tokens[:-1]], device=self.device, dtype=torch.long)
            ids = torch.cat([self.ids(prompt), forced], dim=1)
            logits = self.model(input_ids=ids, use_cache=False, logits_to_keep=len(tokens)).logits[0]
            _keep_last(self._references, key, log_softmax(logits.double(), -1))
        return self._references[key]

    def cell_config(
        self, prefill: Prefill, policy: str, label: str, context: int
    ) -> tuple[dict | None, int | None]:
        """:func:`policy_config`, with windowkv's task hint filled by the shipped classifier from
        the prompt's text like ``kvrecall demo`` / ``worker`` do (once per prompt; an explicit
        ``task`` is kept)."""
        config, budget = policy_config(policy, label, context)
        if policy == "windowkv" and "task" not in (config or {}):
            if prefill.windowkv_task is None:
                from kvrecall.tasktype import classify

                prefill.windowkv_task = int(classify(prefill.ids, self.tokenizer))
            config = {**(config or {}), "task": prefill.windowkv_task}
        return config, budget

    # ---- units ----------------------------------------------------------------------------
    def execute(self, unit: dict) -> dict:
        """Run one work unit (see the module docstring) and return its JSON-able result."""
        started = time.perf_counter()
        kind = unit["kind"]
        self.abandon_at = unit.get("abandon_at")
        try:
            result = self._run(kind, unit)
        except Abandoned as exc:
            return {"kind": "abandoned", "id": unit["id"], "error": str(exc)}
        return {"kind": kind, "id": unit["id"], "seconds": round(time.perf_counter() - started, 3), **result}

    def _run(self, kind: str, unit: dict) -> dict:
        if kind == "accuracy":
            result = {"records": self._accuracy(unit)}
        elif kind == "reference":
            result = {"tokens": self.greedy_full(unit["prompt"], unit["tokens"])}
        elif kind == "fidelity":
            result = self._fidelity(unit)
        else:
            raise ValueError(f"unknown unit kind {kind!r}")
        return result

    def _accuracy(self, unit: dict) -> list[dict]:
        from kvrecall.eval.tasks import document_first, make_sample, score

        sample = make_sample(
            unit["task"], unit["length"], seed=unit["seed"], depth=unit["depth"], tokenizer=self.tokenizer
        )
        family = unit.get("family", "in_prompt")
        question = None
        if family == "doc_first":
            sample = document_first(sample)
            prefill = self.prefill(sample.prompt[: sample.question_at])
            question = self.tokenizer(
                sample.prompt[sample.question_at :], add_special_tokens=False, return_tensors="pt"
            ).input_ids.to(self.device)
        else:
            prefill = self.prefill(sample.prompt)
        context = prefill.num_tokens + (0 if question is None else int(question.shape[1]))
        records = []
        for policy, label in unit["cells"]:
            # a "P%" budget is of the document: what the ingest holds when the question arrives
            config, budget = self.cell_config(prefill, policy, label, prefill.num_tokens)
            out = self.decode_cell(prefill, policy, config, sample.max_new_tokens, question=question)
            text = self.tokenizer.decode(out.tokens, skip_special_tokens=True)
            records.append(
                {
                    "task": sample.task,
                    "family": family,
                    "length": unit["length"],
                    "seed": sample.seed,
                    "depth": round(sample.depth, 3),
                    "prompt_tokens": context,
                    "policy": policy,
                    "budget": label,
                    "budget_tokens": budget,
                    "score": score(sample, text),
                    "answer": text.strip(),
                    "expected": sample.answer,
                    "boundaries": out.boundaries,
                    "steps": len(out.tokens),
                    "max_resident": out.max_resident,
                    "seconds": round(out.seconds, 3),
                }
            )
        return records

    def _fidelity(self, unit: dict) -> dict:
        tokens = unit["tokens"]
        ref = self.reference_logp(unit["prompt"], tokens)
        prefill = self.prefill(unit["prompt"])
        context = prefill.num_tokens + len(tokens)
        config, budget = self.cell_config(prefill, unit["policy"], unit["budget"], context)
        if unit["policy"] == "windowkv" and unit["budget"].endswith("%"):
            budget = round(float(unit["budget"][:-1]) / 100 * prefill.num_tokens)
        out = self.decode_cell(prefill, unit["policy"], config, len(tokens), forced=tokens, stop=False)
        logp = log_softmax(torch.stack(out.logits).double(), -1)
        kl = (ref.exp() * (ref - logp)).sum(-1).clamp_min(0)
        return {
            "group": unit["group"],
            "length": unit["length"],
            "policy": unit["policy"],
            "budget": unit["budget"],
            "budget_tokens": budget,
            "agree": int((logp.argmax(-1) == ref.argmax(-1)).sum()),
            "kl_sum": float(kl.sum()),
            "kl_max": float(kl.max()),
            "boundaries": out.boundaries,
            "n": len(tokens),
            "context_tokens": context,
            "max_resident": out.max_resident,
        }
