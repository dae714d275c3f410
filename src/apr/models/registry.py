"""The family registry: one module per architecture family, listed once.

A new family is one module exporting `FAMILY: Family` plus one line in `FAMILY_MODULES` (STYLE §4b).
`find_family` picks the family and variant a checkpoint's architecture names: GGUF `general.architecture`,
HF `architectures[0]`, or the `.apr` `architecture` (aprender writes the GGUF spelling) — and an `.apr`
file's `hf_architecture` when the first is unknown. Of the variants a name matches, one that `claims` the
source wins (Mixtral: a "llama" GGUF with experts); a variant whose claim fails is skipped.
"""

from __future__ import annotations

import importlib
from functools import cache
from typing import Final

from apr.formats.base import ConfigSource
from apr.models.base import Family, StageNode, Variant
from apr.models.config import ModelConfig
from apr.stages import FORWARD_ORDER, Stage

FAMILY_MODULES: Final = (
    "apr.models.llama",
    "apr.models.gemma",
    "apr.models.phi3",
    "apr.models.olmo2",
    "apr.models.moe",
)


@cache
def families() -> tuple[Family, ...]:
    return tuple(importlib.import_module(m).FAMILY for m in FAMILY_MODULES)


def family_named(name: str) -> Family:
    return next(f for f in families() if f.name == name)


def find_family(source: ConfigSource) -> tuple[Family, Variant] | None:
    arch = source.architecture
    named = [(f, v) for f in families() for v in f.variants if _names(v, source.kind, arch)]
    if source.kind == "apr" and not named:
        hf_arch = source.get("hf_architecture")
        named = [(f, v) for f in families() for v in f.variants if hf_arch in v.hf]
    claimed = [(f, v) for f, v in named if v.claims is not None and v.claims(source)]
    return next(iter(claimed + [(f, v) for f, v in named if v.claims is None]), None)


def _names(v: Variant, kind: str, arch: str) -> bool:
    if kind == "gguf":
        return arch in v.gguf
    if kind == "hf":
        return arch in v.hf
    return kind == "apr" and (arch == v.name or arch in v.gguf)


def stage_graph(cfg: ModelConfig | None) -> tuple[StageNode, ...]:
    """The stage graph of a traced model (its family's, from the manifest config), or for a bare aprender
    trace (no config) every stage aprender names: the llama graph with bias, plus the MoE stages."""
    if cfg is not None:
        try:
            return family_named(cfg.family).graph(cfg)
        except StopIteration:
            pass  # a manifest from a newer apr: fall back to the union graph
    return _union_graph()


@cache
def _union_graph() -> tuple[StageNode, ...]:
    from apr.models import common  # the llama family's pieces are the reference union

    base = ModelConfig("llama", 1, 1, 1, 1, 2, 1, 1, qkv_bias=True)
    nodes = {n.stage: n for n in family_named("llama").graph(base)}
    nodes |= {n.stage: n for n in common.moe_nodes(Stage.FFN_NORM)}
    return tuple(nodes[s] for s in FORWARD_ORDER if s in nodes)


@cache
def stage_dims() -> dict[Stage, tuple[str, ...]]:
    """Dimension labels of every stage, from the graphs (a stage means the same in every family)."""
    dims = {n.stage: n.dims for n in _union_graph()}
    return {s: dims.get(s, ("seq", "hidden")) for s in FORWARD_ORDER}
