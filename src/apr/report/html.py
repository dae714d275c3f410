"""`apr bisect --report out.html`: the page a person reads first — one self-contained file (inline SVG, no
scripts, no downloads), every figure taken from the BisectResult (and the model-level diff when both sides
are models); nothing is recomputed here.

1. Header: both models and engines, the config differences of the two models, the tolerance rule, verdict.
2. Heatmap: layer × stage, colour = log10 of the relative L2 error; identical stages drawn as blank
   "identical" cells (not as the bottom of the colour scale), stages a side lacks left empty; the diverging
   stage's row and cell outlined; a tick per layer.
3. The diverging stage itself per layer: its error against what its inputs allowed (log scale).
4. Isolate (own vs inherited error of each layer's output, and each layer's stage of largest own error), when
   `--isolate` ran: B's layers re-run in B's own engine.
5. Per-position KL(A‖B), each position labelled with both sides' top-1 token.
6. The router section of MoE traces (report/routing.py) and the per-layer table.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Final

from apr.diff.bisect import BisectResult
from apr.diff.bisect_summary import layer_summary
from apr.diff.growth import GrowthRow
from apr.diff.isolate import isolate_summary
from apr.diff.models import ModelDiff, TokenizerDiff
from apr.report import routing
from apr.report.bisect import verdict
from apr.report.model_diff import tensor_summary
from apr.report.numfmt import short
from apr.report.svg import PAD_B, PAD_L, PAD_R, PAD_T, W, color, el, esc, log_axis, log_chart, svg
from apr.stages import STAGE_ORDER, Stage, StageId

CELL_H: Final = 16
DIVERGE: Final = "#d62728"
IDENTICAL_FILL: Final = "#ffffff"
DECADES: Final = 8  # the colour scale covers at most this many decades below the largest error
CSS: Final = (
    "body{font-family:sans-serif;margin:1em 2em}svg{width:100%;height:auto;display:block;margin:1em 0}"
    "td,th{padding:2px 8px;text-align:right}table{border-collapse:collapse}"
    ".verdict{padding:8px;border-left:4px solid var(--c);background:#eee}.dim{color:#666}"
)


# ---- header -----------------------------------------------------------------------------------------


def _side(r: BisectResult, i: int) -> str:
    spec, m = (r.a, r.b)[i], r.manifests[i]
    run = m.run if m is not None else None
    engine = f"{run.engine} {run.engine_version}".strip() + f", {run.precision}" if run else spec.engine
    fmt = f"{run.model_format}, " if run else ""
    role = " (reference)" if i == 0 else ""
    return f"<b>{'AB'[i]}</b>{role}: {esc(spec.path)} <span class=dim>({esc(fmt)}{esc(engine)})</span>"


def _config_section(found: ModelDiff | None) -> str:
    if found is None:
        return "<p class=dim>Model-level diff: not available (a side is a trace directory).</p>"
    tensors = _tensors_line(found)
    if not found.config and not found.tokenizer.differs:
        return "<p>Config and tokenizer: identical.</p>" + tensors
    rows = [
        (d.name, str(d.a), str(d.b), "storage only: " + d.storage if d.storage else "changes the math")
        for d in found.config
    ]
    t = found.tokenizer
    if t.differs:
        rows.append(
            (
                "tokenizer",
                f"{t.a_size} tokens",
                f"{t.b_size} tokens",
                _tokenizer_difference(t),
            )
        )
    return "<h2>Config differences</h2>" + _table(rows, ("field", "A", "B", "what it means")) + tensors


def _tensors_line(found: ModelDiff) -> str:
    """The tensors' names, shapes and types: identical, or each kind of difference on one line."""
    lines = [line for line, _ in tensor_summary(found.tensors)]
    if not lines:
        return "<p>Tensors: identical names, shapes and types.</p>"
    return "<p>Tensors: " + "; ".join(esc(x) for x in lines) + ".</p>"


def _tokenizer_difference(t: TokenizerDiff) -> str:
    if t.first_token or t.probes is None or not t.probes.differ:
        return "first token " + (str(t.first_token) if t.first_token else "-")
    p = t.probes.differ[0]
    return f"encodes the {p.name!r} probe differently from position {p.position}"


def _rule(r: BisectResult) -> str:
    m = r.growth.model
    return (
        f"A stage is the first divergence when its relative L2 error exceeds growth × (its inputs' error) + "
        f"budget: growth {m.growth:g} ({m.norm_growth:g} for norm outputs), budget = floor {m.floor:g} + the "
        "expected quantization error of the weights it consumes"
        + (" and of llama.cpp's activation quantization" if any(m.activation_quant) else "")
        + "."
    )


# ---- heatmap ----------------------------------------------------------------------------------------


def _errors(r: BisectResult) -> dict[StageId, GrowthRow]:
    return {row.diff.sid: row for row in r.growth.rows}


def _scale(rows: dict[StageId, GrowthRow]) -> tuple[float, float]:
    logs = [math.log10(x.error) for x in rows.values() if x.error > 0 and math.isfinite(x.error)]
    if not logs:
        return -1.0, 0.0
    hi = max(logs)
    lo = max(min(logs), hi - DECADES)
    return (lo, hi) if hi > lo else (hi - 1, hi)


def _heatmap(r: BisectResult) -> str:
    rows = _errors(r)
    layers = sorted({s.layer for s in rows if s.layer is not None})
    stages = [
        s for s in STAGE_ORDER if s.per_layer and any(x.stage is s and x.layer is not None for x in rows)
    ]
    if not layers or not stages:
        return "<p>Heatmap: no per-layer stages were compared.</p>"
    lo, hi = _scale(rows)
    cw = (W - PAD_L - PAD_R) / len(stages)
    height = PAD_T + CELL_H * len(layers) + PAD_B + 30
    body = []
    for li, layer in enumerate(layers):
        y = float(PAD_T + li * CELL_H)
        label = f"layer {layer}"
        body.append(
            el("text", label, class_="tick", x=PAD_L - 6.0, y=y + CELL_H - 4, text_anchor="end", font_size=11)
        )
        for si, stage in enumerate(stages):
            row = rows.get(StageId(stage, layer))
            if row is not None:  # else: not captured on one side, left empty
                body.append(_cell(row, layer, stage, PAD_L + si * cw, y, cw, lo, hi))
    j = r.growth.first_jump
    if j is not None and j.diff.sid.layer in layers:
        y = float(PAD_T + layers.index(j.diff.sid.layer) * CELL_H)
        box: dict[str, Any] = {"y": y, "height": CELL_H, "fill": "none"}
        body.append(
            el(
                "rect",
                class_="diverging-row",
                data_layer=j.diff.sid.layer,
                x=float(PAD_L),
                width=W - PAD_L - PAD_R,
                **box,
                stroke=DIVERGE,
                stroke_width=2,
            )
        )
        if j.diff.sid.stage in stages:
            x = PAD_L + stages.index(j.diff.sid.stage) * cw
            body.append(
                el("rect", class_="diverging-cell", x=x, width=cw, **box, stroke="#000", stroke_width=2.5)
            )
    base = PAD_T + CELL_H * len(layers) + 8.0
    for si, stage in enumerate(stages):
        x = PAD_L + (si + 0.5) * cw
        body.append(
            el("text", stage.value, x=x, y=base, font_size=10, transform=f"rotate(45 {x:.1f} {base})")
        )
    body.append(_legend(lo, hi, height - 18.0))
    return svg("heatmap", height, body, "Relative L2 error per layer and stage (log10; white = identical)")


def _cell(
    row: GrowthRow, layer: int, stage: Stage, x: float, y: float, w: float, lo: float, hi: float
) -> str:
    err = row.error
    if err == 0:
        fill, label = IDENTICAL_FILL, "identical"
    elif not math.isfinite(err):
        fill, label = DIVERGE, "non-finite"
    else:
        fill, label = color((math.log10(err) - lo) / (hi - lo)), f"rel L2 {err:.3e}"
    tip = f"<title>{esc(f'blk.{layer}.{stage.value}: {label}')}</title>"
    return el(
        "rect",
        class_="cell",
        data_layer=layer,
        data_stage=stage.value,
        x=x,
        y=y,
        width=w,
        height=CELL_H,
        fill=fill,
        stroke="#ddd",
        stroke_width=0.5,
        inner=tip,
    )


def _legend(lo: float, hi: float, y: float) -> str:
    steps, x0, w = 40, float(PAD_L), 300.0
    parts = [
        el("rect", x=x0 + k * w / steps, y=y, width=w / steps + 0.5, height=10, fill=color(k / (steps - 1)))
        for k in range(steps)
    ]
    parts.append(el("text", f"1e{lo:.1f}", x=x0 - 6, y=y + 9, text_anchor="end", font_size=10))
    parts.append(el("text", f"1e{hi:.1f}", x=x0 + w + 6, y=y + 9, font_size=10))
    parts.append(el("rect", x=x0 + w + 70, y=y, width=14, height=10, fill=IDENTICAL_FILL, stroke="#999"))
    parts.append(el("text", "identical", x=x0 + w + 90, y=y + 9, font_size=10))
    return "\n".join(parts)


# ---- line and bar charts ----------------------------------------------------------------------------


def _stage_chart(r: BisectResult) -> str:
    j = r.growth.first_jump
    stage = j.diff.sid.stage if j is not None else Stage.POST_FFN_RESIDUAL
    rows = [
        (x.diff.sid.layer, x)
        for x in r.growth.rows
        if x.diff.sid.stage is stage and x.diff.sid.layer is not None
    ]
    if not rows:
        return ""
    what = "the diverging stage" if j is not None else "the layer output (no divergence)"
    return log_chart(
        "stage-chart",
        f"{stage.value}, {what}: error per layer and what its inputs allowed",
        {
            "relative L2 error": ("#1f77b4", [(layer, x.error) for layer, x in rows]),
            "allowed (growth × input + budget)": ("#999999", [(layer, x.allowed) for layer, x in rows]),
        },
        j.diff.sid.layer if j is not None else None,
    )


def _isolate_chart(r: BisectResult) -> str:
    rows = [
        (x.sid.layer, x)
        for x in r.isolated
        if x.sid.stage is Stage.POST_FFN_RESIDUAL and x.sid.layer is not None
    ]
    if not rows:
        return (
            "<p class=dim>Own vs inherited error: run <code>apr bisect --isolate</code> to separate them.</p>"
        )
    j = r.growth.first_jump
    engine = rows[0][1].engine
    chart = log_chart(
        "isolate",
        f"Layer output error: own (B's layer run alone in {engine} on A's input) vs inherited from earlier "
        "layers",
        {
            "own": (DIVERGE, [(layer, x.error) for layer, x in rows]),
            "inherited": ("#1f77b4", [(layer, x.inherited) for layer, x in rows]),
        },
        j.diff.sid.layer if j is not None else None,
        bars=True,
    )
    table = [
        (
            str(x.layer),
            short(x.output.error) if x.output else "-",
            short(x.output.inherited) if x.output else "-",
            x.worst.sid.stage.value,
            short(x.worst.error),
            short(x.worst.inherited),
        )
        for x in isolate_summary(r.isolated)
    ]
    head = ("layer", "output own", "output inherited", "largest own error at", "own", "inherited")
    return chart + f'<div class="isolate-table">{_table(table, head)}</div>'


def _kl_chart(r: BisectResult) -> str:
    lg = r.logits
    if lg is None:
        return "<p>Logits: not compared (a side kept no lm_head).</p>"
    h, top, bottom = 320, PAD_T + 10.0, 240.0
    step = (W - PAD_L - PAD_R) / lg.positions
    finite = [k for k in lg.kl if k > 0 and math.isfinite(k)]
    lo = math.floor(math.log10(min(finite))) if finite else -12
    hi = max(math.ceil(math.log10(max(finite))) if finite else lo + 1, lo + 1)

    def sy(v: float) -> float:
        return bottom - (v - lo) / (hi - lo) * (bottom - top)

    body = log_axis(lo, hi, lambda d: sy(float(d)), bottom)
    body.append(el("text", "top-1", x=PAD_L - 6.0, y=bottom + 30, text_anchor="end", font_size=10))
    for p, kl in enumerate(lg.kl):
        x, agree = PAD_L + p * step, lg.top1_agree[p]
        if kl > 0 and math.isfinite(kl):
            y = sy(math.log10(kl))
            body.append(
                el(
                    "rect",
                    class_="kl-bar",
                    x=x + step * 0.1,
                    y=y,
                    width=step * 0.8,
                    height=bottom - y,
                    fill="#1f77b4" if agree else DIVERGE,
                    inner=f"<title>position {p}: KL {kl:.3e}</title>",
                )
            )
        cx, color = x + step / 2, "#000" if agree else DIVERGE
        body.append(
            el("text", str(p), class_="tick", x=cx, y=bottom + 14, text_anchor="middle", font_size=10)
        )
        for k, side in enumerate("AB"):
            token = _top1(r, k, p)
            body.append(
                el(
                    "text",
                    f"{side} {token!r}",
                    class_="top1",
                    x=cx,
                    y=bottom + 30 + 14 * k,
                    text_anchor="middle",
                    font_size=10,
                    fill=color,
                )
            )
    title = (
        f"KL(A‖B) per position (log10): mean {lg.kl_mean:.3e}, max {lg.kl_max:.3e}; top-1 agreement "
        f"{sum(lg.top1_agree)}/{lg.positions} (red: top-1 differs)"
    )
    return svg("kl", h, body, title)


def _top1(r: BisectResult, side: int, p: int) -> str:
    """Side's top-1 token at position p as text (its id when the side has no tokenizer)."""
    text = r.top1_text[side]
    if p < len(text):
        return text[p]
    assert r.logits is not None
    ids = (r.logits.top1_a, r.logits.top1_b)[side]
    return f"#{ids[p]}" if p < len(ids) else "?"


def _table(rows: Sequence[Sequence[str]], head: Sequence[str]) -> str:
    th = "".join(f"<th>{esc(h)}</th>" for h in head)
    body = "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table>"


def render(r: BisectResult, found: ModelDiff | None = None) -> str:
    j = r.growth.first_jump
    layers = [
        (
            str(x.layer),
            short(x.output.error) if x.output else "-",
            f"{x.output.diff.metrics.cosine:.8f}" if x.output else "-",
            x.worst.diff.sid.stage.value,
            short(x.worst.error),
            str(x.jumps),
        )
        for x in layer_summary(r)
    ]
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>apr bisect</title>
<style>{CSS}</style></head>
<body><h1>apr bisect</h1>
<p>{_side(r, 0)}<br>{_side(r, 1)}<br>tokens: {esc(list(r.token_ids))}</p>
<p class="verdict" style="--c:{DIVERGE if j else "#2ca02c"}">{esc(verdict(r))}</p>
<p class=dim>{esc(_rule(r))}</p>
{_config_section(found)}
{_heatmap(r)}
{_stage_chart(r)}
{_isolate_chart(r)}
{_kl_chart(r)}
{routing.render_html(r.diff.routing)}
<h2>Layers</h2>
{_table(layers, ("layer", "output rel L2", "output cosine", "worst stage", "worst rel L2", "jumps"))}
</body></html>
"""
