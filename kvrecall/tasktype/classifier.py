"""windowkv's automatic task type: a logistic-regression head on the served model's own states.

Features: the prompt's first HEAD and last TAIL tokens (where instructions and questions sit)
go through the model once; the hidden state after layer `layer`, mean-pooled over those
tokens and at the last token, concatenated ([2 * hidden]), standardised, then
`sigmoid(w . x + b) > 0.5` means AGGREGATION, else LOCALIZATION.

The weights ship beside this file (`smollm2_135m.npz`, plain arrays, loaded with
allow_pickle=False) and are made by `python -m kvrecall.tasktype.train`; they fit only the
model they were trained on (hidden size and layer count are checked). For any other model
:func:`classify` falls back to LOCALIZATION (windowkv's default task) and logs it once per
model shape: it never refuses a prompt.
Cost: one forward pass over at most HEAD + TAIL tokens before the session opens.
"""

from __future__ import annotations

import functools
import logging
import pathlib
from dataclasses import dataclass

import numpy as np
import torch

from kvrecall.v1 import kvrecall_pb2 as pb

log = logging.getLogger("kvrecall.tasktype")

WEIGHTS = pathlib.Path(__file__).with_name("smollm2_135m.npz")
FALLBACK = pb.TASK_TYPE_LOCALIZATION
"""The task of a prompt no shipped head fits: windowkv's default (top-half window scores, a
32-token observation suffix), the better one on retrieval tasks."""
HEAD, TAIL = 64, 192


def prompt_view(input_ids: torch.Tensor, head: int = HEAD, tail: int = TAIL) -> torch.Tensor:
    """[1, T] -> [1, <= head + tail]: the first `head` and last `tail` tokens."""
    if input_ids.shape[1] <= head + tail:
        return input_ids
    return torch.cat((input_ids[:, :head], input_ids[:, -tail:]), dim=1)


@torch.no_grad()
def features(model, input_ids: torch.Tensor, layer: int) -> torch.Tensor:
    """[2 * hidden] float32: mean-pooled and last-token hidden state after `layer` of the view."""
    view = prompt_view(input_ids).to(next(model.parameters()).device)
    out = model.get_decoder()(input_ids=view, output_hidden_states=True, use_cache=False)
    states = out.hidden_states[layer][0].float()  # [n, hidden]
    return torch.cat((states.mean(dim=0), states[-1])).cpu()


@dataclass(frozen=True)
class TaskClassifier:
    layer: int
    hidden_size: int
    num_layers: int
    mean: np.ndarray  # [F] feature standardisation
    scale: np.ndarray  # [F]
    weight: np.ndarray  # [F]
    bias: float

    def save(self, path: pathlib.Path) -> None:
        np.savez(
            path,
            meta=np.array([self.layer, self.hidden_size, self.num_layers], dtype=np.int64),
            mean=self.mean.astype(np.float32),
            scale=self.scale.astype(np.float32),
            weight=self.weight.astype(np.float32),
            bias=np.array([self.bias], dtype=np.float32),
        )

    @staticmethod
    def load(path: pathlib.Path = WEIGHTS) -> TaskClassifier:
        with np.load(path, allow_pickle=False) as data:
            layer, hidden, layers = (int(v) for v in data["meta"])
            return TaskClassifier(
                layer, hidden, layers, data["mean"], data["scale"], data["weight"], float(data["bias"][0])
            )

    def fits(self, model) -> bool:
        config = model.config
        return config.hidden_size == self.hidden_size and config.num_hidden_layers == self.num_layers

    def probability(self, x: torch.Tensor) -> torch.Tensor:
        """P(AGGREGATION) for features x [F] or [N, F]."""
        z = (x.double().numpy() - self.mean) / self.scale
        return torch.as_tensor(1.0 / (1.0 + np.exp(-(z @ self.weight + self.bias))))

    def classify(self, model, input_ids: torch.Tensor) -> int:
        """pb.TaskType of the prompt `input_ids` [1, T]."""
        if not self.fits(model):
            raise ValueError(
                f"the task classifier was trained for hidden_size={self.hidden_size}, "
                f"num_hidden_layers={self.num_layers}; retrain it for this model (kvrecall.tasktype.train)"
            )
        p = float(self.probability(features(model, input_ids, self.layer)))
        return pb.TASK_TYPE_AGGREGATION if p > 0.5 else pb.TASK_TYPE_LOCALIZATION


@functools.lru_cache(maxsize=1)
def shipped() -> TaskClassifier:
    """The classifier that ships with kvrecall (SmolLM2-135M-Instruct)."""
    return TaskClassifier.load(WEIGHTS)


@functools.lru_cache(maxsize=16)
def _log_fallback(hidden_size: int, num_layers: int) -> None:
    head = shipped()
    log.warning(
        "task classifier: the shipped head fits hidden_size=%d, num_hidden_layers=%d, not this model "
        "(hidden_size=%d, num_hidden_layers=%d): windowkv sessions without a task fall back to %s; "
        "pass task explicitly or train a head (python -m kvrecall.tasktype.train)",
        head.hidden_size, head.num_layers, hidden_size, num_layers, pb.TaskType.Name(FALLBACK),
    )  # fmt: skip


def classify(model, input_ids: torch.Tensor) -> int:
    """The task type of a prompt for `model` (pb.TaskType): the shipped head's answer, or
    :data:`FALLBACK` (logged once per model shape) for a model it was not trained for."""
    head = shipped()
    if not head.fits(model):
        _log_fallback(model.config.hidden_size, model.config.num_hidden_layers)
        return FALLBACK
    return head.classify(model, input_ids)


def with_task(model, policy: str, config: dict | None, input_ids: torch.Tensor) -> dict | None:
    """`config` with windowkv's `task` filled by the shipped classifier when the caller left it
    unset (other policies, and explicit hints, pass through unchanged)."""
    if policy != "windowkv" or (config or {}).get("task", pb.TASK_TYPE_UNSPECIFIED) not in (
        pb.TASK_TYPE_UNSPECIFIED,
        "TASK_TYPE_UNSPECIFIED",
    ):
        return config
    return {**(config or {}), "task": classify(model, input_ids)}
