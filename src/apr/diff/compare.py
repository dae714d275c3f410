"""Compare stage tensors: one APRT file pair (aprender's `apr diff --values`), or two whole trace directories.

Results are values (StageFileDiff, StageDiff, TraceDiff); report/ renders them and recomputes nothing.
A stage *diverges* under a `Tolerance`: by default when cosine < 0.999 (aprender's bisection rule of thumb);
with `min_cos` and/or `max_rel` given, exactly the given thresholds apply. `first_divergence` walks rows in
forward order (layer, then stage; whole-model stages last). For MoE traces `routing` says where the two
select different experts (diff/router.py), which `apr diff --check` and `apr bisect` count as a divergence.

Nothing passes by comparing nothing: a directory without stage files is refused (saying what it holds
instead), and a gate (`apr diff --check`, `apr bisect`) refuses two traces that share no stage
(`require_compared`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from apr.diff.align import drilldown, load_aligned, needs_alignment
from apr.diff.metrics import CHUNK, ElementDiff, Metrics, compare, compare_chunks, sliced
from apr.diff.router import RouterDivergence, router_divergence
from apr.errors import MismatchError, ValidationError
from apr.formats import formats
from apr.stages import Stage, StageId
from apr.trace import format as aprt
from apr.trace.manifest import dims_for
from apr.trace.reader import Trace

DEFAULT_MIN_COS = 0.999
SHOWN_IDS = 3


@dataclass(frozen=True, slots=True)
class StageFileDiff:
    """aprender's `apr diff --values` on two APRT files (spec §4.3)."""

    path_a: Path
    path_b: Path
    layer: int | None
    metrics: Metrics
    top: list[ElementDiff]


def diff_stage_files(path_a: Path, path_b: Path, limit: int = 10) -> StageFileDiff:
    """Read in chunks of CHUNK values (memory a few MB whatever the files' size). Stage files of apr
    traces are compared as directory mode compares them (diff/align.py `drilldown`)."""
    ha, hb = (aprt.read_aprt(p).header for p in (path_a, path_b))  # validates both
    placed = drilldown(path_a, path_b) if ha.layer == hb.layer else None
    if placed is not None:  # as a row of `diff_traces`: aligned when needed, else streamed as stored
        ta, tb, sid = placed
        _check_same_input(ta, tb)
        if needs_alignment(ta, tb, sid):
            metrics, top = compare_chunks(sliced(*load_aligned(ta, tb, sid)), max(limit, 1))
            return StageFileDiff(path_a, path_b, ha.layer, metrics, top)
    if ha.count != hb.count:
        raise MismatchError(
            f"APRT dim_product mismatch: {path_a} has {ha.count} f32s, {path_b} has "
            f"{hb.count} f32s — cannot compare stage tensors of different sizes"
        )
    if ha.layer != hb.layer:
        raise MismatchError(
            f"APRT layer mismatch: {path_a} is layer {_layer(ha.layer)}, {path_b} is layer "
            f"{_layer(hb.layer)} — stages from different layers cannot be compared element-wise"
        )
    metrics, top = _streamed(path_a, ha, path_b, hb, max(limit, 1))
    return StageFileDiff(path_a, path_b, ha.layer, metrics, top)


def _streamed(
    pa: Path, ha: aprt.AprtHeader, pb: Path, hb: aprt.AprtHeader, limit: int = 0
) -> tuple[Metrics, list[ElementDiff]]:
    chunks = zip(aprt.iter_values(pa, ha, CHUNK), aprt.iter_values(pb, hb, CHUNK), strict=True)
    return compare_chunks(chunks, limit)


def _layer(layer: int | None) -> str:
    return "whole-model" if layer is None else str(layer)


@dataclass(frozen=True, slots=True)
class Tolerance:
    min_cos: float | None = DEFAULT_MIN_COS
    max_rel: float | None = None

    @classmethod
    def from_options(cls, min_cos: float | None, max_rel: float | None) -> Tolerance:
        if min_cos is None and max_rel is None:
            return cls()
        return cls(min_cos, max_rel)

    def passes(self, m: Metrics) -> bool:
        if m.nan_count:
            return False
        if self.min_cos is not None and not m.cosine >= self.min_cos:
            # identical all-zero tensors have cosine 0 by aprender's rule but do not diverge
            return m.max_abs == 0.0 and m.rms == 0.0
        return not (self.max_rel is not None and not m.rel_l2 <= self.max_rel)

    def describe(self) -> str:
        parts = []
        if self.min_cos is not None:
            parts.append(f"cosine < {self.min_cos}")
        if self.max_rel is not None:
            parts.append(f"relative L2 error > {self.max_rel}")
        return " or ".join(parts) + " (or any NaN)"


@dataclass(frozen=True, slots=True)
class StageDiff:
    sid: StageId
    metrics: Metrics
    passed: bool
    shape: tuple[int, ...] | None = None  # the stage's shape, when a manifest says it

    @property
    def worst_coords(self) -> dict[str, int] | None:
        """The worst element's position by dimension name (e.g. {"seq": 2, "ffn": 1031})."""
        if self.shape is None or self.metrics.n != int(np.prod(self.shape, dtype=np.int64)):
            return None
        idx = np.unravel_index(self.metrics.max_index, self.shape)
        return dict(zip(dims_for(self.sid.stage, len(self.shape)), (int(i) for i in idx), strict=True))

    def __bool__(self) -> bool:
        return self.passed


@dataclass(frozen=True, slots=True)
class TraceDiff:
    path_a: Path
    path_b: Path
    tolerance: Tolerance
    rows: list[StageDiff]
    only_in_a: list[StageId] = field(default_factory=list)
    only_in_b: list[StageId] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    routing: RouterDivergence | None = None  # MoE traces: the experts each side selects (diff/router.py)
    # each side's manifest: stage → why its engine does not expose it (explains the other's "only in")
    unavailable: tuple[dict[str, str], dict[str, str]] = field(default_factory=lambda: ({}, {}))

    @property
    def first_divergence(self) -> StageDiff | None:
        return first_divergence(self.rows)

    @property
    def routing_changed(self) -> bool:
        """Some position selects a different set of experts: a divergence whatever the stage metrics say."""
        return bool(self.routing)

    @property
    def diverged(self) -> list[StageDiff]:
        return [r for r in self.rows if not r.passed]

    def only_in(self) -> list[OnlyIn]:
        """The stages one side lacks, one group per (side, stage), with the other engine's reason."""
        out = []
        sides = (("A", self.only_in_a, self.unavailable[1]), ("B", self.only_in_b, self.unavailable[0]))
        for side, ids, why in sides:
            groups: dict[Stage, list[int]] = {}
            for sid in ids:
                groups.setdefault(sid.stage, []).extend([] if sid.layer is None else [sid.layer])
            for stage, layers in groups.items():
                reason = why.get(stage.value)
                reason = reason.removeprefix(stage.value + ": ") if reason else None
                out.append(OnlyIn(side, stage, tuple(sorted(layers)), reason))
        return out


@dataclass(frozen=True, slots=True)
class OnlyIn:
    side: str  # "A" or "B": the side that has the stage
    stage: Stage
    layers: tuple[int, ...]  # () for a whole-model stage
    reason: str | None  # why the other side's engine does not expose it, when its manifest says


def first_divergence(rows: list[StageDiff]) -> StageDiff | None:
    """The first failing row in forward order, or None."""
    for row in sorted(rows, key=lambda r: r.sid.sort_key):
        if not row.passed:
            return row
    return None


def diff_traces(a: Trace, b: Trace, tolerance: Tolerance | None = None) -> TraceDiff:
    """Compare every stage present in both traces, in forward order."""
    tol = tolerance or Tolerance()
    _check_traces(a, b)
    _check_same_input(a, b)
    common = [sid for sid in a.entries if sid in b.entries]
    rows = []
    for sid in common:
        ea, eb = a.entries[sid], b.entries[sid]
        # always both files: equal manifest hashes prove nothing about the bytes
        if needs_alignment(a, b, sid):
            m = compare(*load_aligned(a, b, sid))
        else:  # the common case: same layout and size, streamed from the files
            m = _streamed(ea.path, ea.header, eb.path, eb.header)[0]
        rows.append(StageDiff(sid, m, tol.passes(m), ea.shape or eb.shape))
    notes = _run_notes(a, b)
    return TraceDiff(
        a.path,
        b.path,
        tol,
        rows,
        only_in_a=[s for s in a.entries if s not in b.entries],
        only_in_b=[s for s in b.entries if s not in a.entries],
        notes=notes,
        routing=router_divergence(a, b),
        unavailable=(_unavailable(a), _unavailable(b)),
    )


def _unavailable(t: Trace) -> dict[str, str]:
    return dict(t.manifest.run.unavailable) if t.manifest is not None else {}


def require_compared(d: TraceDiff) -> None:
    """A gate cannot pass on nothing: refuse a diff of two traces that share no stage."""
    if d.rows:
        return
    raise ValidationError(
        f"the traces share no stage, so there is nothing to check: {d.path_a} holds "
        f"{_some(d.only_in_a, 'stages')}; {d.path_b} holds {_some(d.only_in_b, 'stages')}"
    )


def _some(items: Sequence[object], plural: str) -> str:
    """`a, b` — or `40 stages (a, b, c, …)` when there are more than SHOWN_IDS."""
    shown = ", ".join(str(x) for x in items[:SHOWN_IDS])
    return shown if len(items) <= SHOWN_IDS else f"{len(items)} {plural} ({shown}, …)"


def _check_traces(a: Trace, b: Trace) -> None:
    """Refuse a side in which the reader found no stage file, naming what is there instead."""
    empty = [t.path for t in (a, b) if not t.entries]
    if len(empty) == 2:
        raise ValidationError(
            f"neither side is a trace: {a.path} {_instead(a.path)}; {b.path} {_instead(b.path)}"
        )
    if empty:
        raise ValidationError(f"{empty[0]} is not a trace: it {_instead(empty[0])}")


def _instead(path: Path) -> str:
    """What a directory without stage files is instead ("is an empty directory", …)."""
    names = sorted(p.name + ("/" if p.is_dir() else "") for p in path.iterdir())
    if not names:
        return "is an empty directory"
    model = next((f.name for f in formats() if f.sniff(b"", path)), None)
    if model is not None:
        return f"is a {model} model folder (`apr trace` it first)"
    return f"holds {_some(names, 'entries')} but no manifest.json and no layer-N/<stage>.bin files"


def _check_same_input(a: Trace, b: Trace) -> None:
    if a.manifest is None or b.manifest is None:
        return
    ta, tb = a.manifest.run.token_ids, b.manifest.run.token_ids
    if ta != tb:
        raise MismatchError(
            f"the traces ran on different token ids ({list(ta)} vs {list(tb)}); "
            "stage tensors of different inputs cannot be compared element-wise"
        )
    pa, pb = a.manifest.positions, b.manifest.positions
    if pa != pb:
        raise MismatchError(
            f"the traces saved different prompt positions ({pa} vs {pb}); "
            "trace both with the same --save-tensor-positions"
        )


def _run_notes(a: Trace, b: Trace) -> list[str]:
    bare = [str(t.path) for t in (a, b) if not t.verified]
    if bare:
        return [
            f"comparing unverified bare traces ({', '.join(bare)}: no manifest.json, so file sizes, "
            "hashes and the run's identity are not checked)"
        ]
    if a.manifest is None or b.manifest is None:
        return []
    ra, rb = a.manifest.run, b.manifest.run
    if ra.qk_layout != rb.qk_layout:
        return [f"Q/K layouts differ ({ra.qk_layout} vs {rb.qk_layout}): Q/K stages compared in HF order"]
    return []
