"""Renderings of `apr bisect`: the text report and the JSON document (schema apr-bisect-v1)."""

from __future__ import annotations

from typing import Any

from apr.diff.bisect import BisectResult
from apr.diff.bisect_summary import first_beyond_cosine, layer_summary
from apr.diff.growth import GrowthRow
from apr.diff.isolate import isolate_summary
from apr.report import routing
from apr.report.json import stage_diff_doc
from apr.report.numfmt import json_float, short
from apr.report.text import only_in_lines


def _side(r: BisectResult, i: int) -> str:
    spec, m = (r.a, r.b)[i], r.manifests[i]
    if m is None:
        return f"{spec.path} (trace without manifest)"
    return f"{spec.path} ({m.run.model_format}, {m.run.engine} engine, {m.run.precision})"


def _where(g: GrowthRow) -> str:
    m, coords = g.diff.metrics, g.diff.worst_coords
    at = ", ".join(f"{k} {v}" for k, v in coords.items()) if coords else f"index {m.max_index}"
    return f"worst element at {at}: a={m.a_at_max:.6g}, b={m.b_at_max:.6g} (|Δ| {short(m.max_abs)})"


def verdict(r: BisectResult) -> str:
    j = r.growth.first_jump
    if j is None:
        return "no stage adds more error than its inputs and its weights explain (no divergence)"
    return (
        f"first divergence at {j.diff.sid}: relative error {short(j.error)} where its inputs carry "
        f"{short(j.input_error)} (allowed {short(j.allowed)})"
    )


def _activation_note(sides: tuple[bool, bool]) -> str:
    which = " and ".join(name for name, on in zip("AB", sides, strict=True) if on)
    return f"; activation quantization on {which}" if which else ""


def render_text(r: BisectResult) -> str:
    tm = r.growth.model
    out = [
        "apr bisect",
        f"  A (reference): {_side(r, 0)}",
        f"  B:             {_side(r, 1)}",
        f"  tokens:        {list(r.token_ids)} ({len(r.token_ids)})",
        f"  tolerance:     growth ×{tm.growth:g} (norms ×{tm.norm_growth:g}), floor {tm.floor:g}, "
        "+ expected error of each stage's weight types" + _activation_note(tm.activation_quant),
        *routing.render_text(r.diff.routing),
        "",
        f"{'layer':>5}  {'output rel L2':>13}  {'cosine':>11}  {'SQNR dB':>7}  "
        f"{'worst stage':<20} {'rel L2':>9}  jumps",
    ]
    for row in layer_summary(r):
        o = row.output
        cos = f"{o.diff.metrics.cosine:.8f}" if o else "-"
        sq = f"{o.diff.metrics.sqnr_db:.1f}" if o else "-"
        out.append(
            f"{row.layer:>5}  {short(o.error) if o else '-':>13}  {cos:>11}  {sq:>7}  "
            f"{row.worst.diff.sid.stage.value:<20} {short(row.worst.error):>9}  {row.jumps or ''}"
        )
    out += _isolate_text(r)
    if r.logits is not None:
        lg = r.logits
        out += [
            "",
            f"logits ({lg.positions} positions): KL(A‖B) mean {lg.kl_mean:.3e}, max {lg.kl_max:.3e}; "
            f"top-1 agreement {sum(lg.top1_agree)}/{lg.positions}; top-5 overlap {lg.top5_mean:.2f}",
            *_top_k_text(r),
        ]
    out += ["", "verdict: " + verdict(r)]
    j = r.growth.first_jump
    if j is not None:
        out.append("  " + _where(j))
        iso = next((x for x in r.isolated if x.sid == j.diff.sid), None)
        if iso is not None:
            out.append(
                f"  isolated (B's layer in {iso.engine} on A's input): own error {short(iso.error)}, "
                f"inherited {short(iso.inherited)}"
            )
    beyond = first_beyond_cosine(r)
    if beyond is not None:
        out.append(
            f"  first stage with cosine < {r.diff.tolerance.min_cos}: {beyond.sid} "
            f"(cosine {beyond.metrics.cosine:.6f}) — informational"
        )
    out += ["  " + line for line in only_in_lines(r.diff)]
    out += [f"note: {n}" for n in r.diff.notes + r.growth.notes + r.notes]
    return "\n".join(out) + "\n"


def _top_k(r: BisectResult, side: int) -> list[tuple[int, str | None, float]]:
    """Side's next-token candidates at the last position: (id, text or None without a tokenizer, p)."""
    assert r.logits is not None
    ids = (r.logits.top_k_a, r.logits.top_k_b)[side]
    probs = (r.logits.top_k_p_a, r.logits.top_k_p_b)[side]
    texts: list[str | None] = list(r.top_k_text[side]) or [None] * len(ids)
    return list(zip(ids, texts, probs, strict=True))


def _top_k_text(r: BisectResult) -> list[str]:
    assert r.logits is not None
    if not r.logits.top_k_a:
        return []
    out = [f"next token at the last position, top {len(r.logits.top_k_a)} (probability):"]
    for side in (0, 1):
        shown = (f"{t!r} {p:.3f}" if t is not None else f"#{i} {p:.3f}" for i, t, p in _top_k(r, side))
        out.append(f"  {'AB'[side]}: " + ", ".join(shown))
    return out


def _isolate_text(r: BisectResult) -> list[str]:
    """Per layer: the own error of B's layer (run alone on A's input, in B's engine) and what it inherits."""
    layers = isolate_summary(r.isolated)
    if not layers:
        return []
    out = [
        "",
        f"isolated: each layer of B run alone in {r.isolated[0].engine} on A's input to it "
        "(own error; inherited = full-run error − own)",
        f"{'layer':>5}  {'output own':>10}  {'inherited':>10}  {'largest own error at':<20} {'own':>9}",
    ]
    for x in layers:
        o = x.output
        out.append(
            f"{x.layer:>5}  {short(o.error) if o else '-':>10}  {short(o.inherited) if o else '-':>10}  "
            f"{x.worst.sid.stage.value:<20} {short(x.worst.error):>9}"
        )
    return out


def _growth_doc(g: GrowthRow) -> dict[str, Any]:
    return {
        **stage_diff_doc(g.diff),
        "error": json_float(g.error),
        "input_error": json_float(g.input_error),
        "budget": json_float(g.budget),
        "allowed": json_float(g.allowed),
        "jump": g.jump,
    }


def _phases_doc(r: BisectResult) -> dict[str, Any]:
    p = r.phases
    if p is None:
        return {"count": 1}
    return {
        "count": 2,
        "suspicious": str(p.suspicious) if p.suspicious is not None else None,
        "chosen_by": p.chosen_by,
        "full_layers": [p.layers.start, p.layers.stop],  # END exclusive, as --save-tensor-layers
        "full_positions": [p.positions.start, p.positions.stop],
        "disk_bytes": {"stats": p.disk[0], "full": p.disk[1]},
    }


def to_doc(r: BisectResult) -> dict[str, Any]:
    tm, j, cos = r.growth.model, r.growth.first_jump, first_beyond_cosine(r)
    return {
        "schema": "apr-bisect-v1",
        "a": {"path": str(r.a.path), "engine": r.manifests[0].run.engine if r.manifests[0] else None},
        "b": {"path": str(r.b.path), "engine": r.manifests[1].run.engine if r.manifests[1] else None},
        "token_ids": list(r.token_ids),
        "tolerance_model": {
            "growth": tm.growth,
            "norm_growth": tm.norm_growth,
            "floor": tm.floor,
            "activation_quant": list(tm.activation_quant),
        },
        "routing": routing.to_doc(r.diff.routing),
        "first_divergence": _growth_doc(j) if j is not None else None,
        "first_beyond_cosine": stage_diff_doc(cos) if cos is not None else None,
        "verdict": verdict(r),
        "layers": [
            {
                "layer": x.layer,
                "output": _growth_doc(x.output) if x.output else None,
                "worst_stage": str(x.worst.diff.sid),
                "worst_error": json_float(x.worst.error),
                "jumps": x.jumps,
            }
            for x in layer_summary(r)
        ],
        "stages": [_growth_doc(g) for g in r.growth.rows],
        "logits": None
        if r.logits is None
        else {
            "positions": r.logits.positions,
            "kl_mean": r.logits.kl_mean,
            "kl_max": r.logits.kl_max,
            "kl": r.logits.kl,
            "top1_agreement": r.logits.top1_rate,
            "top1": r.logits.top1_agree,
            "top5_overlap": r.logits.top5_mean,
            "top_k_last": {
                side: [{"id": i, "text": t, "p": json_float(p)} for i, t, p in _top_k(r, k)]
                for k, side in enumerate("ab")
            },
        },
        "isolated": [
            {
                "id": str(x.sid),
                "own_error": json_float(x.error),
                "total_error": json_float(x.total),
                "inherited": json_float(x.inherited),
                "engine": x.engine,
            }
            for x in r.isolated
        ],
        "phases": _phases_doc(r),
        "only_in_a": [str(s) for s in r.diff.only_in_a],
        "only_in_b": [str(s) for s in r.diff.only_in_b],
        "notes": r.diff.notes + r.growth.notes + r.notes,
    }
