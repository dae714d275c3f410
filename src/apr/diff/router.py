"""Router divergence: where two traces of a mixture-of-experts model select different experts.

A change of selected experts is a discrete divergence that no relative error expresses well: a token sent to
expert 5 instead of 6 may change `moe_router_indices` by 1.6 % and its layer's output completely. So the
selections are compared as what they are, per layer and position, from each side's `moe_router_indices`
(expert ids as f32, (T, k), most probable first) and `moe_router` (the matching top-k weights):

- changed: the expert *sets* differ (order-insensitive) — the divergence;
- reordered: the same set in a different rank order (a near-tie of probabilities), not a divergence;
- weights: for positions with the same set, the largest |w_a − w_b| with weights matched by expert id.

Values only; report/ renders them. Nothing here reads a model or runs an engine.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from apr.stages import Stage, StageId
from apr.trace.reader import Trace

Ids = npt.NDArray[np.int64]


@dataclass(frozen=True, slots=True)
class PositionRouting:
    """Both sides' experts for one position, in rank order (most probable first)."""

    position: int
    experts_a: tuple[int, ...]
    experts_b: tuple[int, ...]

    @property
    def only_a(self) -> tuple[int, ...]:
        return tuple(sorted(set(self.experts_a) - set(self.experts_b)))

    @property
    def only_b(self) -> tuple[int, ...]:
        return tuple(sorted(set(self.experts_b) - set(self.experts_a)))


@dataclass(frozen=True, slots=True)
class LayerRouting:
    layer: int
    positions: int
    changed: tuple[PositionRouting, ...]  # different expert sets
    reordered: tuple[PositionRouting, ...]  # the same set, another rank order
    weight_max_abs: float | None  # over positions with the same set; None without both moe_router

    @property
    def sid(self) -> StageId:
        return StageId(Stage.MOE_ROUTER_INDICES, self.layer)


@dataclass(frozen=True, slots=True)
class RouterDivergence:
    """Every layer both traces hold expert ids for, in layer order."""

    layers: tuple[LayerRouting, ...]
    notes: tuple[str, ...] = field(default=())

    @property
    def changed(self) -> tuple[LayerRouting, ...]:
        """The layers where some position selects a different set of experts."""
        return tuple(x for x in self.layers if x.changed)

    @property
    def first(self) -> LayerRouting | None:
        return next(iter(self.changed), None)

    def __bool__(self) -> bool:
        """True when the traces route some position differently."""
        return bool(self.changed)


def router_divergence(a: Trace, b: Trace) -> RouterDivergence | None:
    """Compare the experts A and B select at every layer and position; None when no layer has ids in both."""
    common = sorted(
        (s for s in a.entries if s.stage is Stage.MOE_ROUTER_INDICES and s in b.entries),
        key=lambda s: s.sort_key,
    )
    if not common:
        return None
    k = _top_k(a, b, common[0])
    if k is None:
        note = "expert sets not compared: moe_router_indices has no recorded shape or config on either side"
        return RouterDivergence((), (note,))
    layers = [_layer(a, b, sid, k) for sid in common]
    return RouterDivergence(tuple(x for x in layers if x is not None))


def _top_k(a: Trace, b: Trace, sid: StageId) -> int | None:
    """k: from a recorded (T, k) shape, else from either side's config."""
    for t in (a, b):
        shape = t.entries[sid].shape
        if shape is not None and len(shape) == 2:
            return shape[1]
    for t in (a, b):
        if t.manifest is not None and t.manifest.run.config.n_experts_used:
            return int(t.manifest.run.config.n_experts_used)
    return None


def _layer(a: Trace, b: Trace, sid: StageId, k: int) -> LayerRouting | None:
    assert sid.layer is not None
    va, vb = a.load(sid), b.load(sid)
    if va.size != vb.size or va.size % k:
        return None  # sizes that do not fit: the stage's own diff row reports them
    ia, ib = _ids(va, k), _ids(vb, k)
    sa, sb = np.sort(ia, axis=1), np.sort(ib, axis=1)  # (T, k) each, by expert id
    same_set = np.all(sa == sb, axis=1)  # (T,)
    same_order = np.all(ia == ib, axis=1)  # (T,)
    weights = _weight_diff(a, b, sid.layer, ia, ib, same_set, k)
    changed, reordered = _positions(ia, ib, ~same_set), _positions(ia, ib, same_set & ~same_order)
    return LayerRouting(sid.layer, len(ia), changed, reordered, weights)


def _positions(ia: Ids, ib: Ids, mask: npt.NDArray[np.bool_]) -> tuple[PositionRouting, ...]:
    return tuple(
        PositionRouting(int(p), tuple(map(int, ia[p])), tuple(map(int, ib[p]))) for p in np.flatnonzero(mask)
    )


def _ids(values: npt.NDArray[np.float32], k: int) -> Ids:
    return np.rint(np.asarray(values, dtype=np.float64)).astype(np.int64).reshape(-1, k)


def _weight_diff(
    a: Trace, b: Trace, layer: int, ia: Ids, ib: Ids, same_set: npt.NDArray[np.bool_], k: int
) -> float | None:
    """max |w_a − w_b| over the positions with the same expert set, each weight matched by expert id."""
    sid = StageId(Stage.MOE_ROUTER, layer)
    if sid not in a.entries or sid not in b.entries or not same_set.any():
        return None
    wa, wb = (np.asarray(t.load(sid), dtype=np.float64) for t in (a, b))
    if wa.size != ia.size or wb.size != ib.size:
        return None
    wa, wb = wa.reshape(ia.shape), wb.reshape(ib.shape)
    by_id_a = np.take_along_axis(wa, np.argsort(ia, axis=1), axis=1)  # (T, k) in expert-id order
    by_id_b = np.take_along_axis(wb, np.argsort(ib, axis=1), axis=1)
    return float(np.max(np.abs(by_id_a - by_id_b)[same_set]))
