"""Renderings of a RouterDivergence (diff/router.py): text lines, a JSON document, an HTML section.

`apr diff` and `apr bisect` put these first, before their per-stage tables: a change of selected experts
explains every error after it. Pure functions; nothing is recomputed here.
"""

from __future__ import annotations

import html
from typing import TYPE_CHECKING, Any, Final

from apr.report.numfmt import json_float, short

if TYPE_CHECKING:  # annotations only: `apr --version` and `--help` do not import numpy
    from apr.diff.router import LayerRouting, PositionRouting, RouterDivergence

SHOWN_POSITIONS: Final = 8  # per layer, in text and HTML; JSON lists them all


def _ids(experts: tuple[int, ...]) -> str:
    return "[" + ", ".join(map(str, experts)) + "]"


def _position(p: PositionRouting) -> str:
    return f"position {p.position}: A {_ids(p.experts_a)}, B {_ids(p.experts_b)}"


def _changed(p: PositionRouting) -> str:
    return f"{_position(p)} (only A {_ids(p.only_a)}, only B {_ids(p.only_b)})"


def _more(n: int) -> list[str]:
    return [f"      … and {n - SHOWN_POSITIONS} more positions"] if n > SHOWN_POSITIONS else []


def headline(r: RouterDivergence) -> str:
    n = len(r.layers)
    first = r.first
    if not n:
        return "router: " + ("; ".join(r.notes) or "no layer's expert ids could be compared")
    if first is None:
        return f"router: the same experts at every position of all {n} MoE layers"
    return (
        f"router divergence: {len(r.changed)} of {n} MoE layers select different experts; first at layer "
        f"{first.layer}, positions {', '.join(str(p.position) for p in first.changed)}"
    )


def render_text(r: RouterDivergence | None) -> list[str]:
    """Lines (no trailing blank) for a text report; none when the traces have no expert ids."""
    if r is None:
        return []
    out = [headline(r)]
    if not r.layers:
        return out
    for x in r.changed:
        out.append(f"  layer {x.layer}: {len(x.changed)} of {x.positions} positions")
        out += [f"      {_changed(p)}" for p in x.changed[:SHOWN_POSITIONS]] + _more(len(x.changed))
    for x in (x for x in r.layers if x.reordered):
        out.append(f"  layer {x.layer}: the same experts in another order at {len(x.reordered)} positions")
        out += [f"      {_position(p)}" for p in x.reordered[:SHOWN_POSITIONS]] + _more(len(x.reordered))
    weighted = [x for x in r.layers if x.weight_max_abs is not None]
    if weighted:
        worst = max(weighted, key=lambda x: x.weight_max_abs or 0.0)
        out.append(
            f"  top-k weights where the experts agree: max |Δ| {short(worst.weight_max_abs or 0.0)} "
            f"(layer {worst.layer})"
        )
    out += [f"  note: {n}" for n in r.notes]
    return out


def _position_doc(p: PositionRouting) -> dict[str, Any]:
    return {"position": p.position, "experts_a": list(p.experts_a), "experts_b": list(p.experts_b)}


def _layer_doc(x: LayerRouting) -> dict[str, Any]:
    return {
        "layer": x.layer,
        "positions": x.positions,
        "changed": [
            _position_doc(p) | {"only_a": list(p.only_a), "only_b": list(p.only_b)} for p in x.changed
        ],
        "reordered": [_position_doc(p) for p in x.reordered],
        "weight_max_abs": None if x.weight_max_abs is None else json_float(x.weight_max_abs),
    }


def to_doc(r: RouterDivergence | None) -> dict[str, Any] | None:
    if r is None:
        return None
    first = r.first
    return {
        "diverged": bool(r),
        "first_layer": None if first is None else first.layer,
        "summary": headline(r),
        "layers": [_layer_doc(x) for x in r.layers],
        "notes": list(r.notes),
    }


def render_html(r: RouterDivergence | None) -> str:
    """An HTML section (empty without expert ids): the headline and one row per changed position."""
    if r is None:
        return ""
    rows = [
        f"<tr><td>{x.layer}</td><td>{p.position}</td><td>{_ids(p.experts_a)}</td><td>{_ids(p.experts_b)}</td></tr>"
        for x in r.changed
        for p in x.changed[:SHOWN_POSITIONS]
    ]
    table = (
        "<table><thead><tr><th>layer</th><th>position</th><th>A experts</th><th>B experts</th></tr></thead>"
        f"<tbody>{''.join(rows)}</tbody></table>"
        if rows
        else ""
    )
    return f'<h2>Router</h2>\n<p class="routing">{html.escape(headline(r))}</p>\n{table}\n'
