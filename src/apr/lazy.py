"""Names a package re-exports but imports on first use (PEP 562), so that importing the package does not
pay for the modules a command does not need."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any


def lazy_getattr(package: str, home: Mapping[str, str], namespace: dict[str, Any]) -> Callable[[str], Any]:
    """A module `__getattr__` for `package`: name → getattr(import_module(home[name]), name), kept in the
    package's `namespace` (its globals()) once looked up; any other name is an AttributeError."""

    def getattr_(name: str) -> Any:
        where = home.get(name)
        if where is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(where), name)
        namespace[name] = value
        return value

    return getattr_
