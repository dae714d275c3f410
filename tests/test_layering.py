"""The package's dependency direction (STYLE §4), checked by walking every import in src/apr.

errors/atomicfile/dirswap/version/cpus ← quant ← formats ← engine, runtimes, convert ← trace ← diff ← report
← cli.
A module may import only from its own layer or lower ones. Two documented exceptions: the engine and the
runtimes see the stage vocabulary (`apr.stages`: StageId and the Tap type) and nothing else of
trace/. Nothing imports cli; the package root only re-exports.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "apr"
LAYER = {
    "errors": 0, "atomicfile": 0, "dirswap": 0, "version": 0, "stages": 0, "panics": 0, "cpus": 0, "lazy": 0,
    "quant": 1,
    "formats": 2,
    "engine": 3,
    "models": 4,
    "runtimes": 5, "convert": 5,
    "trace": 6,
    "diff": 7,
    "report": 8,
    "cli": 9, "__main__": 10, "entry": 10,
}  # fmt: skip


def component(module: str) -> str:
    return module.split(".")[1] if module.count(".") else "__init__"


def imports(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append(node.module)
        elif isinstance(node, ast.Import):
            found.extend(a.name for a in node.names)
    return [m for m in found if m == "apr" or m.startswith("apr.")]


MODULES = sorted(p for p in SRC.rglob("*.py"))


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(SRC)))
def test_imports_point_down(path: Path) -> None:
    me = component("apr." + ".".join(path.relative_to(SRC).with_suffix("").parts))
    if me == "__init__":
        assert "apr.cli" not in imports(path)
        return
    for target in imports(path):
        assert target != "apr", f"{path.name} imports the package root; import the defining module"
        other = component(target)
        assert LAYER[other] <= LAYER[me], f"{path.relative_to(SRC)} ({me}) imports {target} ({other})"


def test_every_component_has_a_layer() -> None:
    comps = {component("apr." + ".".join(p.relative_to(SRC).with_suffix("").parts)) for p in MODULES}
    assert comps - {"__init__"} <= set(LAYER)
