"""Independent runtimes as oracles: run a model in transformers or llama.cpp and tap apr's stages.

`run_transformers` and `run_llamacpp` share one contract (see `runtimes/base.py`): `tap(StageId, float32
array)` for every stage the runtime can expose, every layer, in forward order, in apr's canonical shapes;
a `RuntimeRun` saying how it ran and which stages it could not expose. torch / transformers / llama_cpp
are imported only when a run starts; a missing one raises `FeatureDisabledError`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Final, Protocol

from apr.runtimes.base import ENGINE_LLAMACPP, ENGINE_TRANSFORMERS, RuntimeRun
from apr.runtimes.llamacpp import run_llamacpp
from apr.runtimes.transformers import run_transformers
from apr.stages import Tap


class Runtime(Protocol):
    def __call__(self, model_path: Path, token_ids: Sequence[int], tap: Tap, /) -> RuntimeRun: ...


RUNTIMES: Final[dict[str, Runtime]] = {
    ENGINE_TRANSFORMERS: run_transformers,
    ENGINE_LLAMACPP: run_llamacpp,
}

__all__ = [
    "ENGINE_LLAMACPP",
    "ENGINE_TRANSFORMERS",
    "RUNTIMES",
    "Runtime",
    "RuntimeRun",
    "run_llamacpp",
    "run_transformers",
]
