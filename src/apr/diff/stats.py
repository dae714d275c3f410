"""Compare traces by their per-position statistics: two `--save-tensor-mode stats` traces, or a stats trace
and a full one (whose statistics are computed here, from its stage files, exactly as the writer computes
them: apr.trace.stats).

Per stage, over the positions both sides recorded, position by position (B is the denominator, as in
`apr diff`; RMS = L2 / √(finite values)):

- `rel_l2`  = |L2_A − L2_B| / L2_B,        `rel_mean` = |mean_A − mean_B| / RMS_B,
- `rel_std` = |std_A − std_B| / RMS_B,      `rel_absmax` = |absmax_A − absmax_B| / absmax_B,
- NaN / Inf counts of each side, and whether the sha256 of the position's f32 values is the same.

Each of rel_l2, rel_mean and rel_std is at most that position's relative L2 error ‖a−b‖/‖b‖ (triangle and
Cauchy–Schwarz inequalities), so their largest value over the positions, `bound`, is a lower bound of the
largest per-position error a full diff would measure. The rule: a stage *diverges* when some position's NaN
or Inf count differs, or when `bound` exceeds the threshold — `--max-rel` when given, else the relative
error at which the cosine rule (`--min-cos`, default 0.999) would fire for a small error, √(2·(1 − min_cos))
(0.0447 for 0.999). A stage whose every position hashes equal is identical (bound 0). The first divergence
is the first diverging stage in forward order. Statistics cannot see an error that keeps every position's
norm, mean and spread (a permutation, a sign flip): the hashes still differ, and are shown.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import numpy.typing as npt

from apr.diff.compare import Tolerance
from apr.errors import MismatchError, ValidationError
from apr.stages import StageId
from apr.trace import stats as aprs
from apr.trace.manifest import QK_STAGES
from apr.trace.reader import StageStats, Trace
from apr.trace.writer import TXT_STAGES


@dataclass(frozen=True, slots=True)
class StatsRow:
    sid: StageId
    positions: int  # compared (recorded on both sides)
    bound: float  # max over positions of max(rel_l2, rel_mean, rel_std): ≤ the worst ‖a−b‖/‖b‖
    rel_l2: float  # each: the largest over the positions
    rel_mean: float
    rel_std: float
    rel_absmax: float
    nan: tuple[int, int]  # NaN values in A, in B (over the compared positions)
    inf: tuple[int, int]
    same_hash: int  # positions whose values are bit-identical
    hash_compared: bool  # False: the Q/K layouts differ, so equal values hash differently
    worst_position: int  # where `bound` is largest
    passed: bool

    @property
    def identical(self) -> bool:
        return self.hash_compared and self.same_hash == self.positions

    @property
    def nonfinite_changed(self) -> bool:
        return self.nan[0] != self.nan[1] or self.inf[0] != self.inf[1]


@dataclass(frozen=True, slots=True)
class StatsDiff:
    path_a: Path
    path_b: Path
    modes: tuple[str, str]  # "stats" or "full" (statistics computed from its stage files)
    threshold: float
    rule: str
    rows: list[StatsRow]
    only_in_a: list[StageId] = field(default_factory=list)
    only_in_b: list[StageId] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def first_divergence(self) -> StatsRow | None:
        return next((r for r in self.rows if not r.passed), None)

    @property
    def diverged(self) -> list[StatsRow]:
        return [r for r in self.rows if not r.passed]

    @property
    def routing_changed(self) -> bool:  # the `apr diff --check` gate's question; stats hold no expert sets
        return False


def threshold(tol: Tolerance) -> tuple[float, str]:
    """The bound a stage may reach, and the rule in words."""
    if tol.max_rel is not None:
        return tol.max_rel, f"statistics bound > {tol.max_rel} (--max-rel), or a NaN/Inf count changes"
    cos = tol.min_cos if tol.min_cos is not None else 0.999
    t = math.sqrt(2.0 * (1.0 - cos))
    return t, f"statistics bound > {t:.4g} (√(2·(1 − min_cos)), min_cos {cos}), or a NaN/Inf count changes"


def stage_stats(t: Trace) -> dict[StageId, StageStats]:
    """Every stage's statistics: recorded (a stats trace) or computed from its files (a full one)."""
    if t.stats is not None:
        return t.stats
    if t.manifest is None:
        raise ValidationError(
            f"{t.path} has no manifest.json (an aprender trace): its positions are unknown, so per-position "
            "statistics cannot be computed from it"
        )
    lo, _, hi = t.manifest.positions.partition("..")
    kept = range(int(lo), int(hi))
    n = len(t.manifest.run.token_ids)
    out = {}
    for sid, e in t.entries.items():
        values = np.asarray(t.load(sid), dtype=np.float32)
        records = aprs.compute(aprs.position_rows(values, sid.stage in TXT_STAGES))
        positions = kept if len(records) == len(kept) else range(n - len(records), n)
        out[sid] = StageStats(sid, e.shape or values.shape, positions, records)
    return out


def diff_stats(a: Trace, b: Trace, tolerance: Tolerance | None = None) -> StatsDiff:
    """Compare the statistics of every stage both traces hold, position by position (module docstring)."""
    if a.manifest is None or b.manifest is None:
        bare = a.path if a.manifest is None else b.path
        raise ValidationError(f"{bare} has no manifest.json: statistics compare only apr's traces")
    if a.manifest.run.token_ids != b.manifest.run.token_ids:
        raise MismatchError(
            f"the traces ran on different token ids ({list(a.manifest.run.token_ids)} vs "
            f"{list(b.manifest.run.token_ids)}); statistics of different inputs cannot be compared"
        )
    limit, rule = threshold(tolerance or Tolerance())
    sa, sb = stage_stats(a), stage_stats(b)
    relayout = a.manifest.run.qk_layout != b.manifest.run.qk_layout
    rows = []
    for sid in sorted((s for s in sa if s in sb), key=lambda s: s.sort_key):
        row = compare_stage(sa[sid], sb[sid], limit, hashes=not (relayout and sid.stage in QK_STAGES))
        if row is not None:
            rows.append(row)
    notes = []
    if (pa := a.manifest.positions) != (pb := b.manifest.positions):
        notes.append(
            f"the traces saved different prompt positions (A {pa}, B {pb}): each stage is compared over the "
            "positions both hold (its `positions` count)"
        )
    if relayout:
        notes.append(
            f"Q/K layouts differ ({a.manifest.run.qk_layout} vs {b.manifest.run.qk_layout}): Q/K stages' "
            "statistics compared, their hashes not (the same values in another order hash differently)"
        )
    if not rows:
        raise ValidationError(
            f"{a.path} and {b.path} share no stage at a common position: nothing to compare"
        )
    return StatsDiff(
        a.path,
        b.path,
        (a.mode, b.mode),
        limit,
        rule,
        rows,
        only_in_a=[s for s in sa if s not in sb],
        only_in_b=[s for s in sb if s not in sa],
        notes=notes,
    )


def compare_stage(x: StageStats, y: StageStats, limit: float, hashes: bool = True) -> StatsRow | None:
    """One stage's row over the positions both sides recorded (None when they share none)."""
    common = sorted(set(x.positions) & set(y.positions))
    if not common:
        return None
    ra = x.records[[x.positions.index(p) for p in common]]
    rb = y.records[[y.positions.index(p) for p in common]]
    n = np.maximum(_finite_count(y, len(rb), rb), 1)  # B's values: RMS_B
    rms_b = rb["l2"] / np.sqrt(n)
    rel_l2 = _rel(np.abs(ra["l2"] - rb["l2"]), rb["l2"])
    rel_mean = _rel(np.abs(ra["mean"] - rb["mean"]), rms_b)
    rel_std = _rel(np.abs(ra["std"] - rb["std"]), rms_b)
    rel_absmax = _rel(np.abs(ra["absmax"] - rb["absmax"]), rb["absmax"])
    same = ra["sha256"] == rb["sha256"]
    bound = np.where(same, 0.0, np.fmax(np.fmax(rel_l2, rel_mean), rel_std))
    nan, inf = (int(ra["nan"].sum()), int(rb["nan"].sum())), (int(ra["inf"].sum()), int(rb["inf"].sum()))
    nonfinite = bool(np.any(ra["nan"] != rb["nan"]) or np.any(ra["inf"] != rb["inf"]))
    worst = int(np.argmax(np.where(np.isnan(bound), np.inf, bound)))
    top = float(np.nanmax(bound)) if not np.all(np.isnan(bound)) else math.nan
    passed = not nonfinite and (bool(same.all()) or top <= limit)
    return StatsRow(
        x.sid,
        len(common),
        top,
        _max(rel_l2, same),
        _max(rel_mean, same),
        _max(rel_std, same),
        _max(rel_absmax, same),
        nan,
        inf,
        int(same.sum()) if hashes else 0,
        hashes,
        common[worst],
        passed,
    )


def _finite_count(s: StageStats, rows: int, r: npt.NDArray[np.void]) -> npt.NDArray[np.float64]:
    """Values per position (the stage's size over its positions), less the non-finite ones."""
    per = math.prod(s.shape) // max(len(s.positions), 1)
    return np.full(rows, float(per)) - r["nan"].astype(np.float64) - r["inf"].astype(np.float64)


def _rel(num: npt.NDArray[np.float64], den: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    with np.errstate(divide="ignore", invalid="ignore"):
        out = np.where(den == 0.0, np.where(num == 0.0, 0.0, np.inf), num / den)
    return np.asarray(out, dtype=np.float64)


def _max(v: npt.NDArray[np.float64], same: npt.NDArray[np.bool_]) -> float:
    v = np.where(same, 0.0, v)
    return float(np.nanmax(v)) if not np.all(np.isnan(v)) else math.nan


def stats_errors(d: StatsDiff) -> dict[StageId, float]:
    """Each stage's bound (inf when a NaN/Inf count changes): the error proxy bisect's first phase uses."""
    return {r.sid: (math.inf if r.nonfinite_changed or math.isnan(r.bound) else r.bound) for r in d.rows}
