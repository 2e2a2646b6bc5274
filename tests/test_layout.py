"""The declared layer order of the package (README "Layout"), held by walking every import in `src/dsv3`.

A module may import its own layer or any lower one, never a higher one; `train` and `infer` (the same layer) never
import each other. Imports inside functions count too: a lazy import is still a dependency.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "dsv3"

# lowest first; each entry is one layer: the top-level names (module or package) it holds
LAYERS: list[set[str]] = [
    {"errors", "allocator"},
    {"config"},
    {"model"},
    {"quant", "params", "cost"},
    {"parallel"},
    {"checkpoint", "tokenizer", "runs", "tasks", "gguf_export"},
    {"train", "infer"},
    {"posttrain"},
    {"demo", "cli", "web", "__main__", "__init__"},
]
SIBLINGS_APART = [("train", "infer")]  # same layer, but neither imports the other


def _layer(unit: str) -> int:
    for i, names in enumerate(LAYERS):
        if unit in names:
            return i
    raise AssertionError(f"dsv3.{unit} is in no declared layer: add it to LAYERS and the README's Layout")


def _unit(module_parts: tuple[str, ...]) -> str:
    """The top-level unit of a module path inside dsv3 (`train.trainer` -> `train`)."""
    return module_parts[0] if module_parts else "__init__"


def _imports(path: Path, src: Path) -> list[tuple[str, int]]:
    """(imported dsv3 unit, line) for every import of a dsv3 module in `path`, absolute or relative."""
    rel = path.relative_to(src).with_suffix("").parts  # e.g. ("train", "trainer")
    package = rel[:-1]  # the package a relative import starts from (for __init__.py: its own package)
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        targets: list[tuple[str, ...]] = []
        if isinstance(node, ast.Import):
            targets = [tuple(a.name.split(".")[1:]) for a in node.names if a.name.split(".")[0] == "dsv3"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)] if node.level > 1 else package
                mod = tuple(node.module.split(".")) if node.module else ()
                full = (*base, *mod)
                targets = [full] if full else [(a.name,) for a in node.names]
            elif node.module and node.module.split(".")[0] == "dsv3":
                full = tuple(node.module.split(".")[1:])
                targets = [full] if full else [(a.name,) for a in node.names]
        found += [(_unit(t), node.lineno) for t in targets]
    return found


def layering_violations(src: Path = SRC) -> list[str]:
    """Every import in the package that goes upward or across the train/infer divide."""
    bad = []
    for path in sorted(src.rglob("*.py")):
        rel = path.relative_to(src)
        me = _unit(rel.with_suffix("").parts)
        for target, line in _imports(path, src):
            if target == me:
                continue
            if _layer(target) > _layer(me):
                bad.append(f"{rel}:{line}: {me} (layer {_layer(me)}) imports {target} (layer {_layer(target)})")
            if (me, target) in SIBLINGS_APART or (target, me) in SIBLINGS_APART:
                bad.append(f"{rel}:{line}: {me} imports {target}; they must not import each other")
    return bad


def test_every_module_is_in_a_layer():
    for path in SRC.rglob("*.py"):
        _layer(_unit(path.relative_to(SRC).with_suffix("").parts))


def test_nothing_imports_upward():
    assert layering_violations() == []


@pytest.mark.parametrize("breach", [
    ("parallel/mesh.py", "from ..train.trainer import Trainer\n"),  # parallel must not know the trainer
    ("infer/engine.py", "from ..train import data\n"),  # serving must not import training
    ("model/moe.py", "import dsv3.checkpoint\n"),  # the model knows no file format
    ("checkpoint.py", "def f():\n    from .runs import Run\n"),  # same layer is fine ...
])
def test_the_walk_catches_a_breach(tmp_path, breach):
    """The check fails when an upward import is added (a lazy one too); a same-layer import passes."""
    import shutil

    copy = tmp_path / "dsv3"
    shutil.copytree(SRC, copy, ignore=shutil.ignore_patterns("__pycache__"))
    file, line = breach
    with open(copy / file, "a") as f:
        f.write("\n" + line)
    found = layering_violations(copy)
    if file == "checkpoint.py":
        assert found == []
    else:
        assert any(v.startswith(file) for v in found), found


def test_ruff_lints_every_source_file():
    """No package hidden by ruff's default excludes (it skipped a folder named `dist/` before)."""
    import subprocess
    import sys

    root = SRC.parents[1]
    ruff = Path(sys.executable).with_name("ruff")
    listed = subprocess.run([str(ruff), "check", "--show-files", "src", "tests", "benchmarks"], cwd=root,
                            capture_output=True, text=True, check=True).stdout.split()
    ours = sorted(str(p.resolve()) for d in ("src", "tests", "benchmarks") for p in (root / d).rglob("*.py")
                  if "__pycache__" not in p.parts)
    assert sorted(str(Path(p).resolve()) for p in listed) == ours
