"""Train the shipped task classifier: `python -m kvrecall.tasktype.train [--per-category N]`.

1. Generate the labelled prompt set (prompts.py): phrasing 0 of every own category is kept
   out as the `unseen` test; of the rest, one prompt in four is the `test` split.
2. One forward pass of the bundled model per prompt (its first/last tokens, classifier.py)
   gives the hidden states of every candidate layer.
3. On the training split, 4-fold cross-validation picks the layer and the L2 strength; the
   head is then fitted on the whole training split (L-BFGS logistic regression, float64).
4. Writes the weights (kvrecall/tasktype/smollm2_135m.npz) and a JSON report with the held-out
   accuracies (bench/results/tasktype-<date>.json). About 25 CPU-minutes (the forward passes).
"""

from __future__ import annotations

import argparse
import datetime
import json
import pathlib
import time

import numpy as np
import torch

from kvrecall.tasktype.classifier import HEAD, TAIL, WEIGHTS, TaskClassifier, prompt_view
from kvrecall.tasktype.prompts import AGGREGATION, labelled_prompts

LAYERS = (8, 12, 16, 20, 24, 30)
L2 = (1e-3, 1e-2, 1e-1, 1.0)


def fit(x: np.ndarray, y: np.ndarray, l2: float) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """Standardise x [N, F], fit logistic regression on y [N] in {0, 1}: (mean, scale, w, b)."""
    mean, scale = x.mean(axis=0), x.std(axis=0) + 1e-6
    z = torch.from_numpy((x - mean) / scale)
    target = torch.from_numpy(y.astype(np.float64))
    w = torch.zeros(z.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=200, line_search_fn="strong_wolfe")

    def loss() -> torch.Tensor:
        opt.zero_grad()
        value = torch.nn.functional.binary_cross_entropy_with_logits(z @ w + b, target) + l2 * (
            w * w
        ).sum() / len(y)
        value.backward()
        return value

    opt.step(loss)
    return mean, scale, w.detach().numpy(), float(b.detach())


def accuracy(head: TaskClassifier, x: np.ndarray, y: np.ndarray) -> float:
    predicted = head.probability(torch.from_numpy(x)).numpy() > 0.5
    return float((predicted == y.astype(bool)).mean()) if len(y) else float("nan")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--per-category", type=int, default=36)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--weights", type=pathlib.Path, default=WEIGHTS)
    parser.add_argument("--report", type=pathlib.Path, default=None)
    args = parser.parse_args(argv)

    from kvrecall.models.smollm import load_model

    started = time.perf_counter()
    model, tokenizer = load_model()
    prompts = labelled_prompts(args.per_category, args.seed)
    feats = np.zeros((len(prompts), len(LAYERS), 2 * model.config.hidden_size))
    view_tokens = []
    with torch.no_grad():
        for i, p in enumerate(prompts):
            ids = prompt_view(tokenizer(p.text, return_tensors="pt").input_ids)
            view_tokens.append(ids.shape[1])
            states = model.get_decoder()(
                input_ids=ids, output_hidden_states=True, use_cache=False
            ).hidden_states
            for j, layer in enumerate(LAYERS):
                h = states[layer][0].double()
                feats[i, j] = torch.cat((h.mean(dim=0), h[-1])).numpy()
    featured = time.perf_counter() - started
    y = np.array([p.label == AGGREGATION for p in prompts])
    unseen = np.array([p.phrasing == 0 for p in prompts])
    test = ~unseen & (np.arange(len(prompts)) % 4 == 0)
    train = ~unseen & ~test

    # 4-fold cross-validation on the training split picks (layer, l2).
    train_index = np.flatnonzero(train)
    folds = np.arange(len(train_index)) % 4
    best = (-1.0, LAYERS[0], L2[0])
    for j, layer in enumerate(LAYERS):
        for l2 in L2:
            scores = []
            for k in range(4):
                tr, va = train_index[folds != k], train_index[folds == k]
                head = TaskClassifier(layer, 0, 0, *fit(feats[tr, j], y[tr], l2))
                scores.append(accuracy(head, feats[va, j], y[va]))
            best = max(best, (float(np.mean(scores)), layer, l2), key=lambda t: t[0])
    cv, layer, l2 = best
    j = LAYERS.index(layer)
    head = TaskClassifier(
        layer, model.config.hidden_size, model.config.num_hidden_layers, *fit(feats[train, j], y[train], l2)
    )
    head.save(args.weights)

    per_category = {}
    for name in dict.fromkeys(p.category for p in prompts):
        mask = np.array([p.category == name for p in prompts]) & (test | unseen)
        per_category[name] = {
            "n": int(mask.sum()),
            "accuracy": round(accuracy(head, feats[mask, j], y[mask]), 4),
        }
    report = {
        "classifier": "logistic regression on SmolLM2-135M-Instruct hidden states (mean-pooled + last token)",
        "labels": {"0": "TASK_TYPE_LOCALIZATION", "1": "TASK_TYPE_AGGREGATION"},
        "layer": layer,
        "l2": l2,
        "view": {
            "head_tokens": HEAD,
            "tail_tokens": TAIL,
            "mean_tokens": round(float(np.mean(view_tokens)), 1),
        },
        "cv_accuracy": round(cv, 4),
        "train": {"n": int(train.sum()), "accuracy": round(accuracy(head, feats[train, j], y[train]), 4)},
        "test": {"n": int(test.sum()), "accuracy": round(accuracy(head, feats[test, j], y[test]), 4)},
        "unseen_phrasing": {
            "n": int(unseen.sum()),
            "accuracy": round(accuracy(head, feats[unseen, j], y[unseen]), 4),
        },
        "per_category_held_out": per_category,
        "prompts": len(prompts),
        "per_category": args.per_category,
        "seed": args.seed,
        "feature_seconds": round(featured, 1),
        "seconds": round(time.perf_counter() - started, 1),
        "weights": str(args.weights.name),
        "command": "python -m kvrecall.tasktype.train"
        + (f" --per-category {args.per_category}" if args.per_category != 36 else ""),
    }
    report_path = (
        args.report or pathlib.Path("bench/results") / f"tasktype-{datetime.date.today().isoformat()}.json"
    )
    report_path.write_text(json.dumps(report, indent=2) + "\n")
    print(
        json.dumps({k: report[k] for k in ("layer", "l2", "cv_accuracy", "train", "test", "unseen_phrasing")})
    )
    print(f"weights: {args.weights}; report: {report_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
