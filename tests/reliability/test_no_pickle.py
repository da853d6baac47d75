"""Nothing in kvrecall/ deserialises by executing code: no pickle (or its relatives), no
marshal/shelve/dill, no torch.load, no numpy allow_pickle=True, no yaml.load without a safe
loader, no eval/exec/compile. Wire bytes are raw arrays described by dtype and shape.

The scan parses every module (AST, so comments and docstrings that *mention* pickle do not
count) and fails on any use not in ALLOWED, which maps "path:qualified-name" to why it is safe.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2] / "kvrecall"

BANNED_MODULES = {
    "pickle", "cPickle", "_pickle", "pickletools", "copyreg", "marshal", "shelve", "dill", "cloudpickle",
    "jsonpickle", "joblib",
}
BANNED_BUILTINS = {"eval", "exec", "compile", "__import__"}
BANNED_CALLS = {
    "torch.load", "torch.jit.load", "torch.serialization.load", "numpy.load", "np.load", "pandas.read_pickle",
    "pd.read_pickle", "yaml.unsafe_load", "yaml.full_load", "torch.package.PackageImporter",
}

# "relative/path.py:what" -> justification. Empty: there is no legitimate use today.
ALLOWED: dict[str, str] = {}


def _dotted(node: ast.AST) -> str:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
        return ".".join(reversed(parts))
    return ""


def findings(source: str, path: str) -> list[str]:
    """Every banned construct in `source` as 'path:line: what'."""
    tree = ast.parse(source, filename=path)
    found = []

    def add(node: ast.AST, what: str) -> None:
        if f"{path}:{what}" not in ALLOWED:
            found.append(f"{path}:{node.lineno}: {what}")

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] in BANNED_MODULES:
                    add(node, f"import {alias.name}")
        elif isinstance(node, ast.ImportFrom):
            module = (node.module or "").split(".")[0]
            if module in BANNED_MODULES:
                add(node, f"from {node.module} import ...")
            for alias in node.names:
                if f"{node.module}.{alias.name}" in BANNED_CALLS or (module == "yaml" and alias.name == "load"):
                    add(node, f"from {node.module} import {alias.name}")
        elif isinstance(node, ast.Call):
            name = _dotted(node.func)
            keywords = {k.arg: k.value for k in node.keywords if k.arg}
            if isinstance(node.func, ast.Name) and name in BANNED_BUILTINS:
                add(node, f"{name}()")
            pickle_off = isinstance(keywords.get("allow_pickle"), ast.Constant) and keywords["allow_pickle"].value is False
            if name in BANNED_CALLS and not (name in ("np.load", "numpy.load") and pickle_off):
                add(node, f"{name}()")  # np.load(..., allow_pickle=False) reads plain arrays only
            if name in ("yaml.load",):
                loader = _dotted(keywords["Loader"]) if "Loader" in keywords else ""
                if not loader.endswith(("SafeLoader", "CSafeLoader")):
                    add(node, "yaml.load() without SafeLoader")
            for flag, bad in (("allow_pickle", True), ("weights_only", False)):
                value = keywords.get(flag)
                if isinstance(value, ast.Constant) and value.value is bad:
                    add(node, f"{name}({flag}={bad})")
        elif isinstance(node, ast.FunctionDef) and node.name in ("__reduce__", "__reduce_ex__", "__setstate__"):
            add(node, f"def {node.name}")
    return found


def test_scanner_catches_what_it_should():
    bad = (
        "import pickle\nfrom marshal import loads\nimport numpy as np\nimport torch, yaml\n"
        "x = np.load(f, allow_pickle=True)\ny = torch.load(p)\nz = eval(s)\nexec(code)\n"
        "w = yaml.load(s)\nv = torch.load(p, weights_only=False)\n"
        "class A:\n    def __reduce__(self):\n        return ()\n"
    )
    hits = findings(bad, "snippet.py")
    for what in ("import pickle", "from marshal", "allow_pickle=True", "torch.load()", "eval()", "exec()",
                 "yaml.load() without SafeLoader", "weights_only=False", "def __reduce__"):
        assert any(what in h for h in hits), (what, hits)
    assert any("np.load()" in h for h in findings("a = np.load(f)\n", "plain.py"))  # pickle not ruled out
    ok = (
        "import yaml\nmodel.eval()\nyaml.load(s, Loader=yaml.SafeLoader)\nnp.frombuffer(b, dtype=np.float32)\n"
        "a = np.load(f, allow_pickle=False)\n"
    )
    assert findings(ok, "fine.py") == []


def test_no_code_executing_deserialisation_in_kvrecall():
    files = sorted(ROOT.rglob("*.py"))
    assert len(files) > 20, "kvrecall/ not found"
    found = []
    for path in files:
        found += findings(path.read_text(), str(path.relative_to(ROOT.parent)))
    assert not found, "code-executing deserialisation (add to ALLOWED with a reason if legitimate):\n" + "\n".join(found)


def test_allow_list_entries_are_justified():
    for key, why in ALLOWED.items():
        assert ":" in key and len(why) > 20, (key, why)
