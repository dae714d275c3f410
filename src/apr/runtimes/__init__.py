"""Independent runtimes as oracles: run a model in transformers or llama.cpp and tap apr's stages.

`run_transformers` and `run_llamacpp` share one contract (see `runtimes/base.py`): `tap(StageId, float32
array)` for every stage the runtime can expose, every layer, in forward order, in apr's canonical shapes;
a `RuntimeRun` saying how it ran and which stages it could not expose. torch / transformers / llama_cpp
are imported only when a run starts; a missing one raises `FeatureDisabledError`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Final

from apr.lazy import lazy_getattr
from apr.runtimes.base import ENGINE_LLAMACPP, ENGINE_TRANSFORMERS, RuntimeRun

if TYPE_CHECKING:
    from apr.runtimes.llamacpp import run_llamacpp
    from apr.runtimes.transformers import run_transformers


# the runtimes, imported on first use (PEP 562): a reference trace does not load their glue (ctypes
# structs, capture hooks)
_HOME: Final = {
    "run_transformers": "apr.runtimes.transformers",
    "run_llamacpp": "apr.runtimes.llamacpp",
}
__getattr__ = lazy_getattr("apr.runtimes", _HOME, globals())


__all__ = [
    "ENGINE_LLAMACPP",
    "ENGINE_TRANSFORMERS",
    "RuntimeRun",
    "run_llamacpp",
    "run_transformers",
]
