"""Renderings of `apr inspect` (CheckpointSummary) and the metadata-only `apr trace` (Skeleton)."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from apr.models.summary import CheckpointSummary, Skeleton, config_extras


def _shape(shape: tuple[int, ...]) -> str:
    return "×".join(str(d) for d in shape) or "scalar"


def render_inspect(s: CheckpointSummary, tensors: bool = True) -> str:
    c = s.config
    out = [
        f"Model:        {s.path}",
        f"Format:       {s.format}",
        f"Architecture: {c.architecture} (family {s.family})",
        f"Config:       hidden {c.hidden_size}, layers {c.n_layers}, heads {c.n_heads} (kv {c.n_kv_heads}, "
        f"head_dim {c.head_dim}), ffn {c.intermediate_size}, vocab {c.vocab_size}",
        f"              rope θ {c.rope_theta:g} ({c.qk_layout.rope_pairing} pairs, Q/K rows {c.qk_layout}), "
        f"rms eps {c.rms_eps:g}, qkv bias {c.qkv_bias}, qk norm {c.qk_norm}, "
        f"tied embeddings {c.tied_embeddings}",
        *[f"              {k} {v}" for k, v in config_extras(c).items()],
        f"Parameters:   {s.parameters:,} in {len(s.tensors)} tensors, {s.bytes:,} bytes of tensor data",
        "Types:        " + ", ".join(f"{k} ×{v}" for k, v in sorted(s.qtypes.items())),
    ]
    t = s.tokenizer
    if t is None:
        out.append("Tokenizer:    none")
    else:
        out.append(
            f"Tokenizer:    {t.model} (pre {t.pre}), {t.vocab_size} tokens, {t.merges} merges, "
            f"{t.special_tokens} special; bos {t.bos_id}, eos {t.eos_id}, add_bos {t.add_bos}"
        )
    out += [f"Ignored:      {name} ({why})" for name, why in s.ignored]
    out += [f"Integrity:    {s.integrity}"] * (s.integrity is not None)
    out += [f"warning: {w}" for w in s.warnings]
    if tensors:
        width = max((len(x.name) for x in s.tensors), default=4)
        out += ["", f"{'name':<{width}}  {'type':<7} {'shape':<14} {'bytes':>12}"]
        out += [
            f"{x.name:<{width}}  {x.qtype.name:<7} {_shape(x.shape):<14} {x.nbytes:>12,}" for x in s.tensors
        ]
    return "\n".join(out) + "\n"


def inspect_doc(s: CheckpointSummary) -> dict[str, Any]:
    return {
        "schema": "apr-inspect-v1",
        "path": s.path,
        "format": s.format,
        "architecture": s.config.architecture,
        "family": s.family,
        "config": s.config.to_dict(),
        "ignored_tensors": [{"name": n, "reason": r} for n, r in s.ignored],
        "parameters": s.parameters,
        "tensor_bytes": s.bytes,
        "types": s.qtypes,
        "tokenizer": asdict(s.tokenizer) if s.tokenizer else None,
        "metadata": s.metadata,
        "warnings": s.warnings,
        "integrity": s.integrity,
        "tensors": [
            {
                "name": x.name,
                "source_name": x.source_name or x.name,
                "type": x.qtype.name,
                "shape": list(x.shape),
                "bytes": x.nbytes,
            }
            for x in s.tensors
        ],
    }


def render_skeleton(k: Skeleton) -> str:
    out = [f"Model:      {k.path}", f"Format:     {k.format}", f"Layers:     {k.total_layers}",
           f"Parameters: {k.total_parameters:,}", "Stats:      metadata-only", ""]  # fmt: skip
    out += [f"note: {n}" for n in k.notes]
    out += ["", "Layer Breakdown", f"{'#':>4}  {'Layer':<24} {'Weights':>14}"]
    out += [f"{x.index:>4}  {x.name:<24} {x.parameters:>14,}" for x in k.layers]
    return "\n".join(out) + "\n"


def skeleton_doc(k: Skeleton) -> dict[str, Any]:
    return {
        "file": k.path,
        "format": k.format,
        "stats_source": "metadata-only",
        "notes": k.notes,
        "layers": [
            {
                "name": x.name,
                "index": x.index,
                "hidden_dim": x.hidden_dim,
                "weight_params": x.parameters,
                "input_stats": None,
                "output_stats": None,
                "weight_stats": None,
                "anomalies": [],
            }
            for x in k.layers
        ],
        "summary": {
            "total_layers": k.total_layers,
            "total_parameters": k.total_parameters,
            "anomaly_count": 0,
            "anomalies": [],
        },
    }
