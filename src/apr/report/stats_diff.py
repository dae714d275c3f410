"""`apr diff` of traces compared by their statistics (apr.diff.stats): the text table, the JSON document."""

from __future__ import annotations

import math
from typing import Any

from apr.diff.stats import StatsDiff, StatsRow

HEADER = (
    f"{'stage':<26} {'pos':>5} {'bound':>10} {'rel L2':>10} {'rel mean':>10} {'rel std':>10} "
    f"{'rel absmax':>10} {'same hash':>9} {'NaN A/B':>9} {'Inf A/B':>9}"
)


def _num(x: float) -> str:
    return "nan" if math.isnan(x) else ("inf" if math.isinf(x) else f"{x:.3e}")


def _row(r: StatsRow, first: bool) -> str:
    same = f"{r.same_hash}/{r.positions}" if r.hash_compared else "—"
    mark = "  ← first divergence" if first else ("  ✗" if not r.passed else "")
    return (
        f"{r.sid!s:<26} {r.positions:>5} {_num(r.bound):>10} {_num(r.rel_l2):>10} {_num(r.rel_mean):>10} "
        f"{_num(r.rel_std):>10} {_num(r.rel_absmax):>10} {same:>9} {f'{r.nan[0]}/{r.nan[1]}':>9} "
        f"{f'{r.inf[0]}/{r.inf[1]}':>9}{mark}"
    )


def render_text(d: StatsDiff) -> str:
    first = d.first_divergence
    out = [
        f"A: {d.path_a} ({d.modes[0]})",
        f"B: {d.path_b} ({d.modes[1]})",
        "compared by per-position statistics; bound = max over positions of the relative differences of "
        "L2, mean and std (≤ the relative L2 error a full diff would see there)",
        f"rule: a stage diverges when {d.rule}",
        "",
        HEADER,
    ]
    out.extend(_row(r, r is first) for r in d.rows)
    out.append("")
    identical = sum(r.identical for r in d.rows)
    out.append(f"{len(d.rows)} stages compared ({identical} bit-identical), {len(d.diverged)} diverged.")
    if first is None:
        out.append("No divergence under this rule.")
    else:
        why = "a NaN/Inf count changes" if first.nonfinite_changed else f"bound {_num(first.bound)}"
        out.append(f"First divergence: {first.sid} ({why}; worst at position {first.worst_position})")
    for label, ids in (("A", d.only_in_a), ("B", d.only_in_b)):
        if ids:
            shown = ", ".join(str(s) for s in ids[:3]) + (", …" if len(ids) > 3 else "")
            out.append(f"{len(ids)} stage(s) only in {label}: {shown}")
    out.extend(f"note: {n}" for n in d.notes)
    return "\n".join(out) + "\n"


def _f(x: float) -> float | str:
    return x if math.isfinite(x) else str(x)


def row_doc(r: StatsRow) -> dict[str, Any]:
    return {
        "stage": r.sid.stage.value,
        "layer": r.sid.layer,
        "id": str(r.sid),
        "positions": r.positions,
        "bound": _f(r.bound),
        "rel_l2": _f(r.rel_l2),
        "rel_mean": _f(r.rel_mean),
        "rel_std": _f(r.rel_std),
        "rel_absmax": _f(r.rel_absmax),
        "nan": list(r.nan),
        "inf": list(r.inf),
        "same_hash": r.same_hash if r.hash_compared else None,
        "identical": r.identical,
        "worst_position": r.worst_position,
        "passed": r.passed,
    }


def to_doc(d: StatsDiff) -> dict[str, Any]:
    first = d.first_divergence
    return {
        "schema": "apr-stats-diff-v1",
        "a": str(d.path_a),
        "b": str(d.path_b),
        "modes": list(d.modes),
        "rule": d.rule,
        "threshold": d.threshold,
        "rows": [row_doc(r) for r in d.rows],
        "diverged": len(d.diverged),
        "first_divergence": None if first is None else str(first.sid),
        "only_in_a": [str(s) for s in d.only_in_a],
        "only_in_b": [str(s) for s in d.only_in_b],
        "notes": list(d.notes),
    }
