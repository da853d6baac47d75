"""README's performance table is the rendering of the committed e2e JSON it names (one run or several)."""

from __future__ import annotations

import re
from pathlib import Path

from kvrecall.bench.readme import END, START, rewrite

REPO = Path(__file__).resolve().parents[1]


def test_readme_perf_block_matches_its_json():
    text = (REPO / "README.md").read_text()
    block = text.split(START, 1)[1].split(END, 1)[0]
    sources = list(dict.fromkeys(re.findall(r"`(bench/results/[^`]+-e2e\.json)`", block)))
    assert sources, "the perf block names no bench/results/*-e2e.json"
    assert all((REPO / source).exists() for source in sources)
    paths = [REPO / source for source in sources]
    assert rewrite(REPO / "README.md", paths[0], None, *paths[1:]) == text, (
        "README's perf block drifted from its JSON: run python -m kvrecall.bench.readme " + " ".join(sources)
    )


def test_readme_prefill_block_matches_its_json():
    from kvrecall.bench.readme import PREFILL_END, PREFILL_START

    text = (REPO / "README.md").read_text()
    block = text.split(PREFILL_START, 1)[1].split(PREFILL_END, 1)[0]
    source = re.search(r"`(bench/results/[^`]+-prefill\.json)`", block)
    assert source, "the prefill block names no bench/results/*-prefill.json"
    assert rewrite(REPO / "README.md", REPO / source.group(1)) == text, (
        "README's prefill block drifted from its JSON: run python -m kvrecall.bench.readme " + source.group(1)
    )


def test_the_readme_renders_the_engine_default_lag():
    from kvrecall.bench import readme
    from kvrecall.engine.engine import DEFAULT_LAG

    assert readme.DEFAULT_LAG == DEFAULT_LAG


def test_the_table_says_whether_its_runs_overlapped_and_what_drift_they_emulated():
    import copy
    import json

    from kvrecall.bench.readme import render

    path = REPO / "bench/results/2026-12-02-h200-drift-table-0.15-ovon-e2e.json"
    run = json.loads(path.read_text())
    on = render(run, "on.json")
    assert "(`--overlap on`)" in on and "Emulated retrieval queries (`--query-drift 0.15`" in on
    off = copy.deepcopy(run)
    off["meta"]["overlap"], off["meta"]["query_drift"] = False, 1.0
    text = render(off, "off.json")
    assert "(`--overlap off`)" in text and "Emulated retrieval queries" not in text
    assert "in some runs, not in others" in render(run, "on.json", (off, "off.json"))
