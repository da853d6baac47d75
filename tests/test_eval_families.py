"""The document-first family of `kvrecall eval`: how a sample is split into a document and a
question, and how records of both families are reported (keys, n, intervals)."""

from __future__ import annotations

import pytest

from kvrecall.eval import report as rep
from kvrecall.eval.harness import SUITES, Suite, accuracy_units
from kvrecall.eval.tasks import APPROX, DOCUMENT_HEAD, TASKS, document_first, make_sample


@pytest.mark.parametrize("task", TASKS)
def test_document_first_keeps_the_haystack_and_moves_the_question_after_it(task):
    sample = make_sample(task, 400, seed=3, depth=0.5, tokenizer=APPROX)
    doc = document_first(sample)
    document, question = doc.prompt[: doc.question_at], doc.prompt[doc.question_at :]
    user = sample.prompt.split("<|im_start|>user\n", 1)[1]
    haystack = user[user.index("\n\n") + 2 : user.rindex("\n\n")]
    assert document.endswith("<|im_start|>user\n" + DOCUMENT_HEAD + haystack)
    assert "Question" not in document and "?" not in document
    assert question.startswith("\n\n") and sample.prompt.endswith(question)
    if "needle" in sample.meta:
        assert sample.meta["needle"] in document
    assert (doc.answer, doc.depth, doc.seed) == (sample.answer, sample.depth, sample.seed)
    assert doc.context_tokens < sample.context_tokens


def test_suites_run_both_families_where_the_issue_asks():
    assert SUITES["smoke"].families == ("in_prompt", "doc_first")
    assert "doc_first" in SUITES["full"].families
    units = accuracy_units(SUITES["smoke"], ["full", "louiskv"])
    assert sorted(u["family"] for _, u in units) == ["doc_first", "doc_first", "in_prompt", "in_prompt"]
    assert len({u["id"] for _, u in units}) == 4
    with pytest.raises(ValueError, match="families"):
        Suite(("qa",), (1024,), (0,), ("128",), families=("later",))


def _record(policy, budget, family, score, seed=0):
    return {
        "task": "niah_single", "family": family, "length": 1024, "seed": seed, "depth": 0.5,
        "policy": policy, "budget": budget, "score": score,
    }  # fmt: skip


def test_relative_to_full_per_family_with_n_and_intervals():
    records = []
    for seed in range(25):
        for family in ("in_prompt", "doc_first"):
            records.append(_record("full", "*", family, 1.0, seed))
            records.append(_record("louiskv", "128", family, 1.0 if family == "in_prompt" or seed < 10 else 0.0, seed))
    records.append(_record("quest", "128", "doc_first", 1.0))
    rel = rep.relative_to_full(records)
    assert rel == {"full": 1.0, "full/doc_first": 1.0, "louiskv@128": 1.0, "louiskv@128/doc_first": 0.4,
                   "quest@128/doc_first": 1.0}  # fmt: skip
    detail = rep.relative_detail(records)
    assert detail["louiskv@128/doc_first"]["n"] == 25 and not detail["louiskv@128/doc_first"]["indicative"]
    lo, hi = detail["louiskv@128/doc_first"]["ci95"]
    assert lo < 0.4 < hi
    assert detail["quest@128/doc_first"]["n"] == 1 and detail["quest@128/doc_first"]["indicative"]
    results = rep.accuracy_results(records)
    assert set(results["louiskv"]["128"]) == {"niah_single", "niah_single/doc_first"}
    cell = results["quest"]["128"]["niah_single/doc_first"]["1024"]
    assert cell["n"] == 1 and cell["indicative"] and cell["ci95"][0] < 1.0
    grid = rep.depth_grid(records)
    assert set(grid) == {"full", "full/doc_first", "louiskv", "louiskv/doc_first", "quest/doc_first"}
    assert grid["louiskv/doc_first"]["128"]["0.4-0.6"]["1024"]["n"] == 25


def test_markdown_marks_indicative_cells():
    records = [_record("full", "*", "doc_first", 1.0), _record("louiskv", "128", "doc_first", 0.0)]
    report = {
        "meta": {"suite": "t", "date": "d", "command": "c", "machine": "m", "wall_seconds": 1, "budget_note": "b"},
        "results": rep.accuracy_results(records),
        "relative_to_full": rep.relative_to_full(records),
        "relative_detail": rep.relative_detail(records),
        "fidelity": {},
        "long_fidelity": {},
    }
    text = rep.markdown(report)
    assert "| louiskv@128/doc_first | 0.0* | 1 |" in text
    assert "| louiskv | 128 | niah_single/doc_first | 1024 | 0.000* | 1 |" in text


def test_flags_narrow_a_suite():
    import argparse

    from kvrecall.eval.harness import suite_with_overrides

    args = argparse.Namespace(
        budgets="512", tasks="niah_single,qa", lengths="2048", depths="0.5", seeds="0,1", families="doc_first"
    )
    suite = suite_with_overrides(SUITES["full"], args)
    assert (suite.budgets, suite.tasks, suite.lengths, suite.families) == (
        ("512",), ("niah_single", "qa"), (2048,), ("doc_first",)
    )
    assert suite.skip == () and suite.depths == (0.5,) and suite.seeds == (0, 1)
    assert suite_with_overrides(SUITES["full"], argparse.Namespace(tasks="qa")).skip == (("qa", 8000),)
    with pytest.raises(ValueError, match="lengths"):
        suite_with_overrides(SUITES["full"], argparse.Namespace(lengths="2K"))
    with pytest.raises(ValueError, match="families"):
        suite_with_overrides(SUITES["full"], argparse.Namespace(families="later"))


def test_flags_narrow_the_long_output_replays():
    import argparse

    from kvrecall.eval.harness import suite_with_overrides

    args = argparse.Namespace(long_lengths="4096", long_budgets="1024")
    suite = suite_with_overrides(SUITES["long_output"], args)
    assert (suite.long_lengths, suite.long_budgets, suite.long_tokens) == ((4096,), ("1024",), 4000)
    with pytest.raises(ValueError, match="--long-lengths"):
        suite_with_overrides(SUITES["long_output"], argparse.Namespace(long_lengths="4K"))
    with pytest.raises(ValueError, match="budgets"):
        suite_with_overrides(SUITES["long_output"], argparse.Namespace(long_budgets="lots"))


def test_relative_detail_reports_retrievals_per_generated_token():
    records = [
        {**_record("full", "*", "doc_first", 1.0, seed), "boundaries": 0, "steps": 10} for seed in range(2)
    ] + [
        {**_record("louiskv", "512", "doc_first", 1.0, 0), "boundaries": 1, "steps": 10},
        {**_record("louiskv", "512", "doc_first", 1.0, 1), "boundaries": 3, "steps": 10},
    ]
    detail = rep.relative_detail(records)
    assert detail["louiskv@512/doc_first"]["retrieval_rate"] == 0.2
    assert detail["full/doc_first"]["retrieval_rate"] == 0.0
    assert rep.relative_detail([_record("full", "*", "doc_first", 1.0)])["full/doc_first"]["retrieval_rate"] is None
    text = rep.markdown(
        {
            "meta": {"suite": "t", "date": "d", "command": "c", "machine": "m", "wall_seconds": 1, "budget_note": "b"},
            "results": rep.accuracy_results(records), "relative_to_full": rep.relative_to_full(records),
            "relative_detail": detail, "fidelity": {}, "long_fidelity": {},
        }
    )  # fmt: skip
    assert "| louiskv@512/doc_first | 1.0* | 2 |" in text and text.count("| 0.2 |") == 1
