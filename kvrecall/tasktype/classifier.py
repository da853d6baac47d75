"""windowkv's automatic task type, read from the prompt's text: it needs no model.

A logistic-regression head over hashed word and character n-grams of the prompt's head and
tail (features.py): `sigmoid(w . x + b) > 0.5` means AGGREGATION, else LOCALIZATION. Any
model works: callers pass the prompt's text, or its token ids and the tokenizer that made
them (only the ids of the head and tail are decoded, special tokens skipped).

The weights ship beside this file (`text_head.npz`: plain arrays, loaded with
allow_pickle=False) and are made by `python -m kvrecall.tasktype.train`
(bench/results/2026-11-30-cpu-tasktype-text.json holds their held-out accuracies).

:func:`classify` never raises and never refuses: a prompt it cannot read (empty, chat markup
only, token ids without a tokenizer, a tokenizer that fails) gets :data:`FALLBACK`, and the
reason and the mode are logged once per reason.
"""

from __future__ import annotations

import functools
import logging
import pathlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from kvrecall.tasktype.features import FeatureConfig, featurise
from kvrecall.v1 import kvrecall_pb2 as pb

log = logging.getLogger("kvrecall.tasktype")

WEIGHTS = pathlib.Path(__file__).with_name("text_head.npz")
FALLBACK = pb.TASK_TYPE_LOCALIZATION
"""The task of a prompt the classifier cannot read: windowkv's default (top-half window scores,
a 32-token observation suffix), the better one on retrieval tasks."""

Prompt = str | Sequence[int] | torch.Tensor | np.ndarray
"""A prompt's text, or its token ids ([T] or [1, T]) with the tokenizer that made them."""


class Unreadable(Exception):
    """The prompt has no text the head can read; the message is the reason (a fixed phrase)."""


@dataclass(frozen=True)
class TaskClassifier:
    features: FeatureConfig
    weight: np.ndarray  # [features.n_features] float32
    bias: float

    def __post_init__(self) -> None:
        if self.weight.shape != (self.features.n_features,):
            raise ValueError(f"weight has shape {self.weight.shape}, expected ({self.features.n_features},)")

    def save(self, path: pathlib.Path) -> None:
        np.savez_compressed(
            path,
            features=self.features.as_array(),
            weight=self.weight.astype(np.float32),
            bias=np.array([self.bias], dtype=np.float32),
        )

    @staticmethod
    def load(path: pathlib.Path = WEIGHTS) -> TaskClassifier:
        with np.load(path, allow_pickle=False) as data:
            return TaskClassifier(
                FeatureConfig.from_array(data["features"]), data["weight"].astype(np.float32), float(data["bias"][0])
            )

    def logit(self, indices: np.ndarray, values: np.ndarray) -> float:
        """w . x + b of one featurised prompt (features.featurise)."""
        return float(values.astype(np.float64) @ self.weight[indices].astype(np.float64)) + self.bias

    def probability(self, text: str) -> float:
        """P(AGGREGATION) of `text`; raises Unreadable for text with no content words."""
        indices, values = featurise(text, self.features)
        if not len(indices):
            raise Unreadable("the prompt has no text to read (empty, or chat markup and stop words only)")
        return float(1.0 / (1.0 + np.exp(-self.logit(indices, values))))

    def task(self, text: str) -> int:
        """pb.TaskType of `text`; raises Unreadable for text with no content words."""
        return pb.TASK_TYPE_AGGREGATION if self.probability(text) > 0.5 else pb.TASK_TYPE_LOCALIZATION


@functools.lru_cache(maxsize=1)
def shipped() -> TaskClassifier:
    """The classifier that ships with kvrecall."""
    return TaskClassifier.load(WEIGHTS)


def prompt_text(prompt: Prompt, tokenizer: Any = None, config: FeatureConfig | None = None) -> str:
    """The text the head reads: `prompt` itself, or its token ids' head and tail decoded by
    `tokenizer` (at most 2 * head_chars + 2 * tail_chars ids: a token decodes to at least one
    character unless it is special). Special tokens become spaces, as chat markup does in
    features.normalise. Raises Unreadable."""
    if isinstance(prompt, str):
        return prompt
    try:
        ids = torch.as_tensor(prompt).detach().cpu().reshape(-1).tolist()
    except (TypeError, ValueError, RuntimeError):
        raise Unreadable(f"the prompt is neither text nor token ids ({type(prompt).__name__})") from None
    if not ids:
        raise Unreadable("the prompt has no text to read (empty, or chat markup and stop words only)")
    if tokenizer is None:
        raise Unreadable("the prompt is token ids and no tokenizer was given to decode them")
    config = config or shipped().features
    head, tail = 2 * config.head_chars, 2 * config.tail_chars
    parts = [ids] if len(ids) <= head + tail else [ids[:head], ids[-tail:]]
    try:
        text = "\n".join(tokenizer.decode(part, skip_special_tokens=False) for part in parts)
        for special in getattr(tokenizer, "all_special_tokens", ()):
            text = text.replace(special, " ")
    except Exception as exc:  # noqa: BLE001 - any tokenizer failure means "cannot read", never a refusal
        raise Unreadable(f"the tokenizer could not decode the prompt ({type(exc).__name__})") from None
    return text


@functools.lru_cache(maxsize=64)
def _log_fallback(reason: str) -> None:
    log.warning(
        "task classifier: %s; the session falls back to %s (logged once per reason; pass task "
        "explicitly to choose)", reason, pb.TaskType.Name(FALLBACK),
    )  # fmt: skip


def classify(prompt: Prompt, tokenizer: Any = None) -> int:
    """The task type (pb.TaskType) of a prompt, for any model: its text, or its token ids with
    `tokenizer`. Never raises: a prompt it cannot read gets :data:`FALLBACK`, logged once per
    reason."""
    try:
        head = shipped()
        return head.task(prompt_text(prompt, tokenizer, head.features))
    except Unreadable as exc:
        _log_fallback(str(exc))
    except Exception as exc:  # noqa: BLE001 - a classifier failure must not refuse a session
        _log_fallback(f"the classifier failed ({type(exc).__name__}: {exc})")
    return FALLBACK


def with_task(policy: str, config: dict | None, prompt: Prompt, tokenizer: Any = None) -> dict | None:
    """`config` with windowkv's `task` filled by :func:`classify` when the caller left it unset
    (other policies, and explicit hints, pass through unchanged and nothing is decoded)."""
    if policy != "windowkv" or (config or {}).get("task", pb.TASK_TYPE_UNSPECIFIED) not in (
        pb.TASK_TYPE_UNSPECIFIED,
        "TASK_TYPE_UNSPECIFIED",
    ):
        return config
    return {**(config or {}), "task": classify(prompt, tokenizer)}
