"""Views of a bisect result for its reports: one row per decoder layer, and aprender's cosine rule."""

from __future__ import annotations

from dataclasses import dataclass

from apr.diff.bisect import BisectResult
from apr.diff.compare import StageDiff
from apr.diff.growth import GrowthRow
from apr.stages import Stage


@dataclass(frozen=True, slots=True)
class LayerRow:
    layer: int
    output: GrowthRow | None  # the layer output (post_ffn_residual)
    worst: GrowthRow  # the stage of this layer with the largest error
    jumps: int


def layer_summary(r: BisectResult) -> list[LayerRow]:
    """One row per decoder layer: its output error, its worst stage, how many of its stages jump."""
    by_layer: dict[int, list[GrowthRow]] = {}
    for row in r.growth.rows:
        if row.diff.sid.layer is not None:
            by_layer.setdefault(row.diff.sid.layer, []).append(row)
    out = []
    for layer, rows in sorted(by_layer.items()):
        output = next((x for x in rows if x.diff.sid.stage is Stage.POST_FFN_RESIDUAL), None)
        worst = max(rows, key=lambda x: x.error)
        out.append(LayerRow(layer, output, worst, sum(x.jump for x in rows)))
    return out


def first_beyond_cosine(r: BisectResult) -> StageDiff | None:
    """aprender's rule of thumb (cosine < 0.999 by default), for information next to the growth verdict."""
    return r.diff.first_divergence
