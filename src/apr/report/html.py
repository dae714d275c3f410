"""`apr bisect --report out.html`: one self-contained HTML file (inline SVG charts, no scripts, no downloads).

Charts: per-layer SQNR (dB) and 1 − cosine (log scale) of the main stages, the first divergence marked;
then the verdict, the per-layer table and the logit agreement. Everything comes from the BisectResult.
"""

from __future__ import annotations

import html
import math
from collections.abc import Sequence
from typing import Final

from apr.diff.bisect import BisectResult, layer_summary
from apr.report.bisect import verdict
from apr.report.numfmt import short
from apr.stages import Stage

MAIN_STAGES: Final = (Stage.ATTN_OUT, Stage.FFN_OUT, Stage.POST_FFN_RESIDUAL)
COLORS: Final = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728")
W, H, PAD, LEGEND = 760, 260, 48, 110
CSS: Final = (
    "body{font-family:sans-serif;max-width:780px;margin:2em auto}td,th{padding:2px 8px;text-align:right}"
)
IDENTICAL_MARGIN: Final = 10.0  # identical stages (SQNR ∞, 1 − cos = 0) are drawn this far past the data


def _series(r: BisectResult, value: str) -> dict[str, list[tuple[int, float]]]:
    """Per main stage, (layer, y) points; identical stages are drawn just beyond the finite values."""
    raw: dict[str, list[tuple[int, float]]] = {s.value: [] for s in MAIN_STAGES}
    for row in r.growth.rows:
        sid, m = row.diff.sid, row.diff.metrics
        if sid.stage in MAIN_STAGES and sid.layer is not None:
            gap = 1.0 - m.cosine
            y = m.sqnr_db if value == "sqnr" else (math.log10(gap) if gap > 0 else -math.inf)
            if not math.isnan(y):
                raw[sid.stage.value].append((sid.layer, y))
    finite = [y for s in raw.values() for _, y in s if math.isfinite(y)] or [0.0]
    top = max(finite) + IDENTICAL_MARGIN if value == "sqnr" else min(finite) - 1.0
    return {k: [(x, y if math.isfinite(y) else top) for x, y in s] for k, s in raw.items()}


def _chart(series: dict[str, list[tuple[int, float]]], title: str, ylabel: str, mark: int | None) -> str:
    pts = [p for s in series.values() for p in s]
    if not pts:
        return f"<p>{html.escape(title)}: no data</p>"
    x0, x1 = 0, max(max(p[0] for p in pts), 1)
    y0, y1 = min(p[1] for p in pts), max(p[1] for p in pts)
    y0, y1 = (y0 - 1, y1 + 1) if y0 == y1 else (y0, y1)

    def sx(x: float) -> float:
        return PAD + (x - x0) / (x1 - x0) * (W - PAD - LEGEND)

    def sy(y: float) -> float:
        return H - PAD + (y - y0) / (y1 - y0) * (2 * PAD - H)

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" role="img">',
             f'<text x="{W / 2}" y="18" text-anchor="middle" font-weight="bold">{html.escape(title)}</text>',
             f'<line x1="{PAD}" y1="{H - PAD}" x2="{W - LEGEND}" y2="{H - PAD}" stroke="#888"/>',
             f'<line x1="{PAD}" y1="{PAD}" x2="{PAD}" y2="{H - PAD}" stroke="#888"/>',
             f'<text x="{W / 2}" y="{H - 10}" text-anchor="middle">layer</text>',
             f'<text x="12" y="{H / 2}" transform="rotate(-90 12 {H / 2})" text-anchor="middle">'
             f"{html.escape(ylabel)}</text>"]  # fmt: skip
    for y in (y0, (y0 + y1) / 2, y1):
        parts.append(
            f'<text x="{PAD - 4}" y="{sy(y) + 4:.1f}" text-anchor="end" font-size="10">{y:.3g}</text>'
        )
    for x in sorted({x0, (x0 + x1) // 2, x1}):
        parts.append(
            f'<text x="{sx(x):.1f}" y="{H - PAD + 14}" text-anchor="middle" font-size="10">{x}</text>'
        )
    if mark is not None:
        parts.append(f'<line x1="{sx(mark):.1f}" y1="{PAD}" x2="{sx(mark):.1f}" y2="{H - PAD}" '
                     'stroke="#d62728" stroke-dasharray="4 3"/>')  # fmt: skip
    for k, (name, s) in enumerate(series.items()):
        color = COLORS[k % len(COLORS)]
        path = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in sorted(s))
        parts.append(f'<polyline fill="none" stroke="{color}" stroke-width="2" points="{path}"/>')
        parts.append(
            f'<text x="{W - LEGEND + 8}" y="{PAD + 14 * k}" fill="{color}" font-size="11">{name}</text>'
        )
    parts.append("</svg>")
    return "\n".join(parts)


def _table(rows: Sequence[Sequence[str]], head: Sequence[str]) -> str:
    th = "".join(f"<th>{html.escape(h)}</th>" for h in head)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table>"


def render(r: BisectResult) -> str:
    j = r.growth.first_jump
    mark = j.diff.sid.layer if j is not None else None
    layers = [
        (str(x.layer), short(x.output.error) if x.output else "-",
         f"{x.output.diff.metrics.cosine:.8f}" if x.output else "-", x.worst.diff.sid.stage.value,
         short(x.worst.error), str(x.jumps))
        for x in layer_summary(r)
    ]  # fmt: skip
    lg = r.logits
    logits = (
        ""
        if lg is None
        else (
            f"<p>Logits over {lg.positions} positions: KL(A‖B) mean {lg.kl_mean:.3e}, max {lg.kl_max:.3e}; "
            f"top-1 agreement {sum(lg.top1_agree)}/{lg.positions}; top-5 overlap {lg.top5_mean:.2f}</p>"
        )
    )
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>apr bisect</title>
<style>{CSS}
.verdict{{padding:8px;border-left:4px solid {"#d62728" if j else "#2ca02c"};background:#eee}}</style></head>
<body><h1>apr bisect</h1>
<p>A (reference): {html.escape(str(r.a.path))} ({html.escape(r.a.engine)})<br>
B: {html.escape(str(r.b.path))} ({html.escape(r.b.engine)})<br>
tokens: {html.escape(str(list(r.token_ids)))}</p>
<p class="verdict">{html.escape(verdict(r))}</p>
{_chart(_series(r, "sqnr"), "SQNR of the main stages per layer (higher is closer)", "SQNR dB", mark)}
{_chart(_series(r, "cos"), "1 − cosine per layer (log10; lower is closer)", "log10(1 − cos)", mark)}
{logits}
<h2>Layers</h2>
{_table(layers, ("layer", "output rel L2", "output cosine", "worst stage", "worst rel L2", "jumps"))}
</body></html>
"""
