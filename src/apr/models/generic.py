"""An architecture no family declares, opened for a runtime engine only (`--engine transformers|llama.cpp`).

transformers and llama.cpp run many architectures apr has no family module for; tracing them through a
runtime needs only the common config values (layers, dims: the shared parameter table) to plan the trace and
the llama module / node names to map what the runtime computes. What those names do not cover is listed as
not captured, like any stage a runtime cannot expose. The reference engine refuses such a model by name —
there is no math apr could vouch for — and no tensor accounting is done (the runtime reads the file itself).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

import numpy.typing as npt

from apr.engine.weights import Weights
from apr.errors import ModelLoadError
from apr.formats.base import ConfigSource
from apr.models import common, sources
from apr.models.base import Family, HookMap, StageNode, TensorRole, Variant
from apr.models.config import ModelConfig
from apr.models.params import COMMON
from apr.stages import Tap

NAME: Final = "generic"


def finish(
    variant: Variant, source: ConfigSource, values: Mapping[str, Any], present: frozenset[str], where: str
) -> ModelConfig:
    return ModelConfig(
        architecture=source.architecture.lower() or "unknown",
        family=NAME,
        vocab_size=sources.vocab_size(source, present, where),
        **values,
    )


def roles(c: ModelConfig) -> tuple[TensorRole, ...]:
    return ()


def graph(c: ModelConfig) -> tuple[StageNode, ...]:
    from apr.models.registry import stage_graph  # every stage aprender names

    return stage_graph(None)


def _refuse(*args: Any, **kwargs: Any) -> npt.NDArray[Any]:
    raise ModelLoadError(
        "apr has no family module for this architecture, so the reference engine cannot run it "
        "(--engine transformers or --engine llama.cpp can)"
    )


def _refuse_layer(w: Weights, cfg: ModelConfig, i: int, x: npt.NDArray[Any], tap: Tap) -> npt.NDArray[Any]:
    return _refuse()


FAMILY: Final = Family(
    name=NAME,
    variants=(Variant(NAME, (), ()),),
    params=COMMON,
    finish=finish,
    roles=roles,
    graph=graph,
    forward=_refuse,
    layer=_refuse_layer,
    hooks=HookMap(common.LLAMA_LAYER_HOOKS, common.MODEL_HOOKS),
    ggml_nodes=common.LLAMA_NODES,
)
