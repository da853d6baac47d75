"""Train the shipped task classifier: `python -m kvrecall.tasktype.train [--train N] [--eval N]`.

1. Generates labelled prompts (prompts.py): the `train` split (TRAIN grammars, documents of
   TRAIN_WORDS words); the `dev` and `heldout` splits (other wordings, documents shorter and
   longer than any in training; `dev` was looked at while the grammars were written,
   `heldout` was not); and the check sets `harness` (the eval harness's own generators) and
   `handwritten`. Only `train` is fitted on.
2. Featurises each prompt's text (features.py: hashed n-grams of its head and tail).
3. Picks the L2 strength by cross-validation on the training split with folds by template
   (each fold is scored by a head that never saw its templates), then fits the head on the
   whole training split (L-BFGS logistic regression, float64).
4. Writes the weights (kvrecall/tasktype/text_head.npz) and a JSON report: accuracy and
   confusion counts per set, per family and per held-out document length.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import pathlib
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from kvrecall.tasktype.classifier import WEIGHTS, TaskClassifier
from kvrecall.tasktype.features import FeatureConfig, featurise
from kvrecall.tasktype.prompts import (
    AGGREGATION,
    HELD_OUT_WORDS,
    LabelledPrompt,
    generated,
    handwritten,
    harness,
)

L2 = (1e-4, 1e-3, 1e-2)
FOLDS = 3
MAX_ITER = 100  # L-BFGS iterations per fit
LABELS = {False: "localization", True: "aggregation"}


@dataclass(frozen=True)
class Rows:
    """N featurised prompts, sparse: entry k is values[k] at column indices[k] of row rows[k]."""

    indices: np.ndarray  # int64 [nnz]
    values: np.ndarray  # float32 [nnz]
    rows: np.ndarray  # int64 [nnz]
    aggregation: np.ndarray  # bool [N]: the label

    @staticmethod
    def of(prompts: Sequence[LabelledPrompt], config: FeatureConfig) -> Rows:
        pairs = [featurise(p.text, config) for p in prompts]
        return Rows(
            np.concatenate([np.zeros(0, np.int64), *(i for i, _ in pairs)]),
            np.concatenate([np.zeros(0, np.float32), *(v for _, v in pairs)]),
            np.repeat(np.arange(len(pairs)), [len(i) for i, _ in pairs]).astype(np.int64),
            np.array([p.label == AGGREGATION for p in prompts], dtype=bool),
        )

    def take(self, mask: np.ndarray) -> Rows:
        """The rows where `mask` [N] is True, renumbered."""
        keep = mask[self.rows]
        renumber = np.cumsum(mask) - 1
        return Rows(self.indices[keep], self.values[keep], renumber[self.rows[keep]], self.aggregation[mask])


def _logits(rows: Rows, weight: np.ndarray, bias: float) -> np.ndarray:
    """[N] float64: x . w + b for each row (weight [F])."""
    products = rows.values.astype(np.float64) * weight[rows.indices]
    return np.bincount(rows.rows, weights=products, minlength=len(rows.aggregation)) + bias


def fit(rows: Rows, l2: float, config: FeatureConfig) -> TaskClassifier:
    """Logistic regression (mean log-loss + l2 * |w|^2) on `rows`, by L-BFGS in float64 (the
    gradient in closed form, with sparse sums)."""
    params = torch.zeros(config.n_features + 1, dtype=torch.float64, requires_grad=True)  # [w, b]
    target = rows.aggregation.astype(np.float64)
    opt = torch.optim.LBFGS([params], max_iter=MAX_ITER, line_search_fn="strong_wolfe")

    def loss() -> torch.Tensor:
        w, b = params.detach().numpy()[:-1], float(params.detach()[-1])
        z = _logits(rows, w, b)
        log_loss = np.mean(np.logaddexp(0.0, z) - target * z)
        residual = (1.0 / (1.0 + np.exp(-z)) - target) / len(target)  # d log_loss / dz
        grad_w = np.bincount(rows.indices, weights=rows.values * residual[rows.rows], minlength=len(w))
        params.grad = torch.from_numpy(np.append(grad_w + 2.0 * l2 * w, residual.sum()))
        return torch.tensor(log_loss + l2 * float(w @ w), dtype=torch.float64)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # L-BFGS's vector ops are small: more threads only wait on each other
    try:
        opt.step(loss)
    finally:
        torch.set_num_threads(threads)
    weights = params.detach().numpy()
    return TaskClassifier(config, weights[:-1].astype(np.float32), float(weights[-1]))


def predict(head: TaskClassifier, rows: Rows) -> np.ndarray:
    """bool [N]: True where the head answers AGGREGATION."""
    return _logits(rows, head.weight.astype(np.float64), head.bias) > 0


def scores(predicted: np.ndarray, truth: np.ndarray) -> dict:
    """{"n", "accuracy", "confusion": {true label: {predicted label: count}}}."""
    confusion = {
        LABELS[t]: {LABELS[p]: int(((truth == t) & (predicted == p)).sum()) for p in (False, True)}
        for t in (False, True)
    }
    n = len(truth)
    return {"n": n, "accuracy": round(float((predicted == truth).mean()), 4) if n else None, "confusion": confusion}


def cross_validate(
    rows: Rows, templates: np.ndarray, config: FeatureConfig, l2s: Sequence[float] = L2
) -> tuple[float, float]:
    """(best l2, its mean accuracy) over FOLDS folds by template index within each family."""
    best = (l2s[0], -1.0)
    for l2 in l2s:
        accuracies = []
        for k in range(FOLDS):
            held = templates % FOLDS == k
            head = fit(rows.take(~held), l2, config)
            part = rows.take(held)
            accuracies.append(float((predict(head, part) == part.aggregation).mean()))
        if np.mean(accuracies) > best[1]:
            best = (l2, float(np.mean(accuracies)))
    return best


def train(
    n_train: int, n_eval: int, seed: int = 0, config: FeatureConfig | None = None, l2s: Sequence[float] = L2
) -> tuple[TaskClassifier, dict]:
    """Fit the head on `n_train` generated prompts; evaluate it on `n_eval` prompts of each of the
    dev and held-out splits and on the check sets. Returns the head and the report."""
    config = config or FeatureConfig()
    started = time.perf_counter()
    sets = {
        "train": generated(n_train, "train", seed),
        "dev": generated(n_eval, "dev", seed),
        "heldout": generated(n_eval, "heldout", seed),
        "harness": harness(),
        "handwritten": handwritten(),
    }
    rows = {name: Rows.of(prompts, config) for name, prompts in sets.items()}
    l2, cv = cross_validate(rows["train"], np.array([p.template for p in sets["train"]]), config, l2s)
    head = fit(rows["train"], l2, config)
    predicted = {name: predict(head, r) for name, r in rows.items()}

    def by(name: str, key: Callable[[LabelledPrompt], str]) -> dict:
        keys = np.array([key(p) for p in sets[name]])
        return {g: scores(predicted[name][keys == g], rows[name].aggregation[keys == g]) for g in dict.fromkeys(keys)}

    def length(p: LabelledPrompt) -> str:
        low, high = next(bucket for bucket in HELD_OUT_WORDS if bucket[0] <= p.words <= bucket[1])
        return f"{low}-{high} words"

    report = {
        "classifier": "logistic regression on hashed word and character n-grams of the prompt's first and last "
        "characters (kvrecall/tasktype/features.py)",
        "features": dataclasses.asdict(config),
        "l2": l2,
        "cv_accuracy_unseen_templates": round(cv, 4),
        "sizes": {name: len(prompts) for name, prompts in sets.items()},
        "sets": {name: scores(predicted[name], rows[name].aggregation) for name in sets},
        "heldout_by_length": by("heldout", length),
        "heldout_by_family": by("heldout", lambda p: p.family),
        "dev_by_family": by("dev", lambda p: p.family),
        "harness_by_task": by("harness", lambda p: p.family.removeprefix("harness:")),
        "seed": seed,
        "seconds": round(time.perf_counter() - started, 1),
    }
    return head, report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--train", type=int, default=4400, help="generated training prompts")
    parser.add_argument("--eval", type=int, default=1100, help="generated prompts of each of dev and heldout")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--weights", type=pathlib.Path, default=WEIGHTS)
    parser.add_argument("--report", type=pathlib.Path, default=None)
    args = parser.parse_args(argv)

    head, report = train(args.train, args.eval, args.seed)
    head.save(args.weights)
    report = {
        "command": " ".join(["python -m kvrecall.tasktype.train", *(sys.argv[1:] if argv is None else argv)]),
        "date": datetime.date.today().isoformat(),
        "weights": args.weights.name,
        "weights_bytes": args.weights.stat().st_size,
        **report,
    }
    path = args.report or pathlib.Path("bench/results") / f"{report['date']}-cpu-tasktype-text.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({name: s["accuracy"] for name, s in report["sets"].items()}))
    print(f"weights: {args.weights} ({report['weights_bytes']} bytes); report: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
