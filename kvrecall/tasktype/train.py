"""Train the shipped task classifier: `python -m kvrecall.tasktype.train [--train N] [--heldout N]`.

1. Generates labelled prompts (prompts.py): the `train` split (TRAIN templates, documents of
   TRAIN_WORDS words) and the `heldout` split (other templates, shorter and longer documents),
   plus the check sets `harness` (the eval harness's generators) and `handwritten`.
2. Featurises each prompt's text (features.py: hashed n-grams of its head and tail).
3. Picks the L2 strength by cross-validation on the training split with folds by template
   (each fold is scored by a head that never saw its templates), then fits the head on the
   whole training split (L-BFGS logistic regression, float64).
4. Writes the weights (kvrecall/tasktype/text_head.npz) and a JSON report: accuracy and
   confusion counts per evaluation set, per held-out family and document length.
"""

from __future__ import annotations

import argparse
import datetime
import json
import pathlib
import sys
import time
from collections.abc import Sequence
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

L2 = (1e-4, 1e-3, 1e-2, 1e-1)
FOLDS = 3
MAX_ITER = 100  # L-BFGS function evaluations per fit
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


def _logits(rows: Rows, weight: torch.Tensor) -> torch.Tensor:
    """[N] float64: x . w for each row (weight [F])."""
    products = torch.from_numpy(rows.values).double() * weight[torch.from_numpy(rows.indices)]
    return torch.zeros(len(rows.aggregation), dtype=torch.float64).index_add(0, torch.from_numpy(rows.rows), products)


def fit(rows: Rows, l2: float, config: FeatureConfig) -> TaskClassifier:
    """Logistic regression (mean log-loss + l2 * |w|^2) on `rows`, by L-BFGS in float64."""
    w = torch.zeros(config.n_features, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    target = torch.from_numpy(rows.aggregation.astype(np.float64))
    opt = torch.optim.LBFGS([w, b], max_iter=MAX_ITER, line_search_fn="strong_wolfe")

    def loss() -> torch.Tensor:
        opt.zero_grad()
        value = torch.nn.functional.binary_cross_entropy_with_logits(_logits(rows, w) + b, target)
        value = value + l2 * (w * w).sum()
        value.backward()
        return value

    opt.step(loss)
    return TaskClassifier(config, w.detach().numpy().astype(np.float32), float(b.detach()))


def predict(head: TaskClassifier, rows: Rows) -> np.ndarray:
    """bool [N]: True where the head answers AGGREGATION."""
    with torch.no_grad():
        weight = torch.from_numpy(head.weight.astype(np.float64))
        return (_logits(rows, weight) + head.bias > 0).numpy()


def scores(predicted: np.ndarray, truth: np.ndarray) -> dict:
    """{"n", "accuracy", "confusion": {true label: {predicted label: count}}}."""
    confusion = {
        LABELS[t]: {LABELS[p]: int(((truth == t) & (predicted == p)).sum()) for p in (False, True)}
        for t in (False, True)
    }
    n = len(truth)
    return {"n": n, "accuracy": round(float((predicted == truth).mean()), 4) if n else None, "confusion": confusion}


def cross_validate(rows: Rows, templates: np.ndarray, config: FeatureConfig) -> tuple[float, float]:
    """(best l2, its mean accuracy) over FOLDS folds by template index within each family."""
    best = (L2[0], -1.0)
    for l2 in L2:
        accuracies = []
        for k in range(FOLDS):
            held = templates % FOLDS == k
            head = fit(rows.take(~held), l2, config)
            part = rows.take(held)
            accuracies.append(float((predict(head, part) == part.aggregation).mean()))
        if np.mean(accuracies) > best[1]:
            best = (l2, float(np.mean(accuracies)))
    return best


def train(n_train: int, n_heldout: int, seed: int = 0, config: FeatureConfig | None = None) -> tuple[TaskClassifier, dict]:
    """Fit the head on `n_train` generated prompts; evaluate it on `n_heldout` held-out ones and
    the check sets. Returns the head and the report (sizes, l2, accuracies, confusions)."""
    config = config or FeatureConfig()
    started = time.perf_counter()
    sets = {
        "train": generated(n_train, "train", seed),
        "heldout": generated(n_heldout, "heldout", seed),
        "harness": harness(),
        "handwritten": handwritten(),
    }
    rows = {name: Rows.of(prompts, config) for name, prompts in sets.items()}
    templates = np.array([p.template for p in sets["train"]])
    l2, cv = cross_validate(rows["train"], templates, config)
    head = fit(rows["train"], l2, config)
    predicted = {name: predict(head, r) for name, r in rows.items()}

    def by(name: str, key) -> dict:
        groups = dict.fromkeys(key(p) for p in sets[name])
        return {
            g: scores(*(a[np.array([key(p) == g for p in sets[name]])] for a in (predicted[name], rows[name].aggregation)))
            for g in groups
        }

    short = HELD_OUT_WORDS[0]
    report = {
        "classifier": "logistic regression on hashed word 1-2-grams and character n-grams of the prompt's "
        "first and last characters (kvrecall/tasktype/features.py)",
        "features": {k: int(v) for k, v in zip(
            ("n_features", "head_chars", "tail_chars", "char_min", "char_max"), config.as_array(), strict=True)},
        "l2": l2,
        "cv_accuracy_unseen_templates": round(cv, 4),
        "sizes": {name: len(prompts) for name, prompts in sets.items()},
        "sets": {name: scores(predicted[name], rows[name].aggregation) for name in sets},
        "heldout_by_length_words": by(
            "heldout", lambda p: f"{short[0]}-{short[1]}" if p.words <= short[1] else f"{HELD_OUT_WORDS[1][0]}-{HELD_OUT_WORDS[1][1]}"
        ),
        "heldout_by_family": by("heldout", lambda p: p.family),
        "harness_by_task": by("harness", lambda p: p.family.removeprefix("harness:")),
        "seed": seed,
        "seconds": round(time.perf_counter() - started, 1),
    }  # fmt: skip
    return head, report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--train", type=int, default=4400, help="generated training prompts")
    parser.add_argument("--heldout", type=int, default=1100, help="generated held-out prompts")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--weights", type=pathlib.Path, default=WEIGHTS)
    parser.add_argument("--report", type=pathlib.Path, default=None)
    args = parser.parse_args(argv)

    head, report = train(args.train, args.heldout, args.seed)
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
