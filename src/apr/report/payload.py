"""Renderings of `apr trace --payload` (aprender's APR-TRACE-001 report), text and JSON."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any, Final

from apr.report.numfmt import json_float
from apr.stages import Stage, StageId
from apr.trace.payload import ActivationStats, PayloadReport

HIGH_VAR_STD: Final = 100.0  # aprender's per-layer status label (information; warnings: trace/payload.py)


def _status(s: ActivationStats) -> str:
    if s.anomalous:
        return "ANOMALY"
    return "HIGH-VAR" if s.std_dev > HIGH_VAR_STD else "OK"


def _ms(s: ActivationStats) -> str:
    return f"mean={s.mean:.4f} std={s.std_dev:.4f}"


def render_text(r: PayloadReport) -> str:
    p, cfg = r.prepared, r.prepared.model.config
    out = [
        "=== Traced Inference (APR-TRACE-001) ===",
        f"Model: {p.path}",
        "Architecture:",
        f"  Layers: {cfg.n_layers}  Hidden dim: {cfg.hidden_size}  Vocab size: {cfg.vocab_size}  "
        f"Heads: {cfg.n_heads} (kv {cfg.n_kv_heads})",
        f'Prompt: "{p.prompt}" → {list(p.token_ids)}',
        "",
    ]
    emb = r.stats[StageId(Stage.EMBEDDING, 0)]
    out += [
        "EMBEDDING:",
        f"  Range: [{emb.min:.4f}, {emb.max:.4f}]  Mean: {emb.mean:.4f}  Std: {emb.std_dev:.4f}",
    ]
    out += ["", "LAYER-BY-LAYER ACTIVATIONS:"]
    for i in range(cfg.n_layers):
        cols = r.layer_stats(i)
        if not cols:
            continue
        status = "ANOMALY" if any(s.anomalous for s in cols.values()) else _status(cols["output"])
        out.append(f"  Layer {i:>3}  [{status}]")
        out += [f"    {name:<10} {_ms(s)}" for name, s in cols.items()]
        if status == "ANOMALY":
            out.append(f"  (stopping: NaN/Inf at layer {i})")
            break
    fn = r.stats.get(StageId(Stage.FINAL_NORM))
    if fn is not None:
        out += ["", "FINAL LAYER NORM:", f"  {_ms(fn)}"]
    lg = r.stats.get(StageId(Stage.LM_HEAD))
    if lg is not None:
        out += [
            "",
            "LM_HEAD output:",
            f"  Vocab size: {cfg.vocab_size}  L2 norm: {r.logits_l2:.4f}  "
            f"Range: [{lg.min:.4f}, {lg.max:.4f}]  Mean: {lg.mean:.4f}",
            "  Top 5 predictions:",
        ]
        tok = p.decoder()  # for token ids, the model's own tokenizer; None: the model has none
        shown = tok.decode if tok else None
        out += [
            f"    token_id={t}, logit={v:.4f}" + (f"  {shown([t])!r}" if shown else "") for t, v in r.top_k
        ]
    out += ["", "TRACE SUMMARY:"]
    out += [f"  WARNING: {w}" for w in r.warnings()] or ["  no anomalies"]
    out += [f"  info: {x}" for x in r.fixed_rule_info()]
    return "\n".join(out) + "\n"


def _stats_doc(s: ActivationStats | None) -> dict[str, Any] | None:
    if s is None:
        return None
    return {k: json_float(v) if isinstance(v, float) else v for k, v in asdict(s).items()}


def to_doc(r: PayloadReport) -> dict[str, Any]:
    """aprender's `apr trace --payload --json` keys (spec §1.4)."""
    p, cfg = r.prepared, r.prepared.model.config
    return {
        "format": p.model.format_name,
        "architecture": cfg.architecture,
        "num_layers": cfg.n_layers,
        "hidden_dim": cfg.hidden_size,
        "vocab_size": cfg.vocab_size,
        "num_heads": cfg.n_heads,
        "num_kv_heads": cfg.n_kv_heads,
        "prompt": p.prompt,
        "encoded_tokens": list(p.token_ids),
        "embedding": _stats_doc(r.stats.get(StageId(Stage.EMBEDDING, 0))),
        "layers": [
            {"layer_idx": i, **{k: _stats_doc(v) for k, v in r.layer_stats(i).items()}}
            for i in range(cfg.n_layers)
        ],
        "final_norm": _stats_doc(r.stats.get(StageId(Stage.FINAL_NORM))),
        "logits_stats": _stats_doc(r.stats.get(StageId(Stage.LM_HEAD))),
        "logits": {
            "vocab_size": cfg.vocab_size,
            "l2_norm": json_float(r.logits_l2),
            "top_k": [{"token_id": t, "logit": json_float(v)} for t, v in r.top_k],
        },
    }
