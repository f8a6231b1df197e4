"""The package's floors point one way: structures → planning → layers → passes / rewriter → export → cli.

Every ``import`` of an einfx module (at the top of a file or inside a function) is read from the source, so a
cycle cannot hide behind a function-local import.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import einfx

ROOT = Path(einfx.__file__).parent
# module prefix -> floor; a module may import its own floor and those below it
FLOORS = {
    "einfx.errors": 0,
    "einfx.structures": 1,
    "einfx.planning": 2,
    "einfx.layers": 3,
    "einfx.moe": 3,
    "einfx.passes": 4,
    "einfx.rewriter": 4,
    "einfx.zoo": 4,
    "einfx.export": 5,
    "einfx.cli": 6,
}
# lazy imports inside functions are allowed only here: the command line keeps its start-up short
LAZY_OK = ("einfx.cli",)


def floor(module: str) -> int | None:
    if module == "einfx":
        return 6  # the front door re-exports every floor below the command line (which may use it)
    best = max((p for p in FLOORS if module == p or module.startswith(p + ".")), key=len, default=None)
    return FLOORS[best] if best else None


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def einfx_imports(path: Path):
    """(imported module, line, inside a function) for every import of an einfx module in ``path``."""
    tree = ast.parse(path.read_text(), str(path))
    functions = [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
    local = {id(n) for f in functions for n in ast.walk(f) if isinstance(n, (ast.Import, ast.ImportFrom))}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
            if node.module == "einfx":  # from einfx import export: the subpackage itself
                names = [f"einfx.{a.name}" if floor(f"einfx.{a.name}") is not None else "einfx" for a in node.names]
        else:
            continue
        for name in names:
            if name == "einfx" or name.startswith("einfx."):
                yield name, node.lineno, id(node) in local


def test_every_module_has_a_floor():
    missing = [module_name(p) for p in ROOT.rglob("*.py") if floor(module_name(p)) is None]
    assert not missing, f"modules outside every floor: {missing}; add them to FLOORS"


def test_no_lower_floor_imports_a_higher_one():
    bad = []
    for path in sorted(ROOT.rglob("*.py")):
        me = module_name(path)
        for name, line, _ in einfx_imports(path):
            if floor(name) > floor(me):
                bad.append(f"{path.relative_to(ROOT.parent)}:{line}: {me} (floor {floor(me)}) imports {name} "
                           f"(floor {floor(name)})")
    assert not bad, "imports against the floors:\n" + "\n".join(bad)


def test_no_import_hides_inside_a_function():
    bad = []
    for path in sorted(ROOT.rglob("*.py")):
        me = module_name(path)
        if me.startswith(LAZY_OK):
            continue
        bad += [f"{path.relative_to(ROOT.parent)}:{line}: import {name} inside a function"
                for name, line, inside in einfx_imports(path) if inside]
    assert not bad, "\n".join(bad)


def test_floor_table_catches_an_upward_import(tmp_path):
    fake = ROOT / "structures" / "sizes.py"
    assert floor(module_name(fake)) == 1 and floor("einfx.export.onnx_export") == 5
    src = tmp_path / "m.py"
    src.write_text("def f():\n    from einfx.export import to_onnx\n")
    assert list(einfx_imports(src)) == [("einfx.export", 2, True)]


@pytest.mark.parametrize("module", ["einfx.structures", "einfx.planning", "einfx.layers.linear", "einfx.moe.layer",
                                    "einfx.passes.lower"])
def test_each_floor_imports_on_its_own(module):
    """A fresh interpreter imports the module first (no other einfx module loaded before it)."""
    done = subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
