"""`kvrecall eval --suite ci`: the accuracy harness end to end on the bundled model (< 3 min on 2 cores).

One ~600-token niah_single sample under every policy at budget 128, and a 32-token fidelity
replay. The fidelity context (short prompt + 32 tokens) is under 128 tokens, so louiskv@128
holds every token and must reproduce full's logits exactly.
"""

from __future__ import annotations

import json

import pytest

from kvrecall.eval.harness import POLICIES


def _model_available() -> bool:
    try:
        from kvrecall.models.smollm import gguf_path

        gguf_path()
        import transformers  # noqa: F401
    except Exception:
        return False
    return True


@pytest.mark.model
@pytest.mark.skipif(not _model_available(), reason="the bundled SmolLM2 model is not installed")
def test_eval_ci_suite(tmp_path, capsys):
    from kvrecall.cli import main

    assert main(["eval", "--suite", "ci", "--json", "--out", str(tmp_path)]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    report = json.loads(next(tmp_path.glob("accuracy-ci-*.json")).read_text())
    assert next(tmp_path.glob("accuracy-ci-*.md")).read_text().startswith("# kvrecall accuracy")

    # results[policy][budget][task][length] = {score, n, ci95}
    assert set(report["results"]) == set(POLICIES)
    for policy, per_budget in report["results"].items():
        assert list(per_budget) == (["*"] if policy == "full" else ["128"])
        for per_task in per_budget.values():
            cell = per_task["niah_single"]["600"]
            assert cell["n"] == 1 and 0.0 <= cell["score"] <= 1.0
            lo, hi = cell["ci95"]
            assert 0.0 <= lo <= cell["score"] <= hi <= 1.0

    rel = summary["relative_to_full"]
    assert rel == report["relative_to_full"]
    assert set(rel) == {"full"} | {f"{p}@128" for p in POLICIES if p != "full"}
    if report["results"]["full"]["*"]["niah_single"]["600"]["score"] > 0:
        assert rel["full"] == 1.0
        assert all(v is not None and v >= 0.0 for v in rel.values())

    # fidelity[policy][budget] = {top1, kl, retrieval_rate, n_tokens}
    for policy in POLICIES[1:]:
        f = report["fidelity"][policy]["128"]
        assert f["n_tokens"] == 32
        assert 0.0 <= f["top1"] <= 1.0 and f["kl"] >= 0.0 and 0.0 <= f["retrieval_rate"] <= 1.0
        assert summary["fidelity"][f"{policy}@128"]["top1"] == f["top1"]
    exact = report["fidelity"]["louiskv"]["128"]
    assert exact["max_context_tokens"] <= 128  # budget >= the whole sequence
    assert exact["top1"] == 1.0
    assert exact["kl"] < 1e-6
