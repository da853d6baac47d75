"""The docs stay true: every path docs/ARCHITECTURE.md names exists, every module under kvrecall/
is named there, nothing points outside the repository, and docs/METRICS.md is what the
Prometheus registry generates."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ARCHITECTURE = REPO / "docs" / "ARCHITECTURE.md"
TOP_LEVEL = sorted(p.name for p in REPO.iterdir() if not p.name.startswith("."))
# A repo path in prose: it starts with a top-level entry of the repository.
PROSE_PATH = re.compile(r"(?<![\w/.-])(?:" + "|".join(map(re.escape, TOP_LEVEL)) + r")(?:/[\w.-]+)*/?")


def layout_entries(text: str) -> set[str]:
    """Repo paths of the Layout block: an unindented line starts with a repo path (a `dir/`
    header, then the files under it); an indented line starts with file names (comma separated)."""
    block = text.split("## Layout", 1)[1].split("```", 2)[1]
    paths: set[str] = set()
    directory = ""
    for line in block.splitlines():
        if not line.strip():
            continue
        if not line.startswith(" "):
            first = line.split()[0]
            paths.add(first)
            directory = first if first.endswith("/") else ""
            continue
        names = line.strip().split("  ")[0] if line.startswith("  ") and line[2] != " " else ""
        paths.update(directory + name.strip() for name in names.split(",") if name.strip())
    return paths


def test_every_path_architecture_names_exists():
    text = ARCHITECTURE.read_text()
    named = layout_entries(text) | {m.group(0) for m in PROSE_PATH.finditer(text)}
    missing = sorted(path for path in named if not (REPO / path).exists())
    assert not missing, f"docs/ARCHITECTURE.md names paths that do not exist: {missing}"
    assert "kvrecall/server/policies/louiskv.py" in named  # the parser sees the block


def test_every_module_is_named_in_architecture():
    named = layout_entries(ARCHITECTURE.read_text())
    modules = sorted(
        str(p.relative_to(REPO))
        for p in (REPO / "kvrecall").rglob("*.py")
        if "v1" not in p.relative_to(REPO / "kvrecall").parts and p.name != "__init__.py"
    )
    packages = sorted(f"{p.parent.relative_to(REPO)}/" for p in (REPO / "kvrecall").rglob("__init__.py"))
    unnamed = [m for m in modules + packages if m not in named and m != "kvrecall/"]
    assert not unnamed, f"docs/ARCHITECTURE.md does not name: {unnamed}"


def test_nothing_points_outside_the_repository():
    tracked = subprocess.run(
        ["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout.split()
    offenders = []
    for name in tracked:
        path = REPO / name
        if name == "tests/test_docs.py" or path.suffix not in {".py", ".md", ".sh", ".toml", ".yaml", ".yml", ".proto"}:
            continue
        text = path.read_text(errors="replace")
        offenders += [f"{name}: {word}" for word in ("../shared", "/work/shared", "DESIGN.md", "STYLE.md") if word in text]
    assert not offenders, offenders


def test_metrics_doc_is_generated_from_the_registry():
    result = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "gen_metrics_doc.py"), "--check"],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr
