"""Tests of the bench/ scripts (no test asserts a time), and `load_bench`, which imports one of them."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[2]


def load_bench(name: str) -> ModuleType:
    """bench/<name>.py as a module (its siblings importable by name, as when it runs as a script)."""
    sys.path.insert(0, str(ROOT / "bench"))  # run.py imports its siblings by name
    spec = importlib.util.spec_from_file_location(f"apr_bench_{name}", ROOT / "bench" / f"{name}.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module
