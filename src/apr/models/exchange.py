"""A family's config and tensor names written back out: HF `config.json`, `.apr` metadata keys, HF names.

Derived from the same parameter tables and tensor roles that read them (models/params.py, models/base.py),
so what `apr export` / `apr import` write is what `open_model` reads back: each parameter goes out under its
first HF key (and into `.apr` under its `.apr` key when it has one, else its HF key), RoPE scaling as HF's
`rope_scaling` dict.
"""

from __future__ import annotations

import re
from dataclasses import asdict, fields
from typing import Any, Final

from apr.formats.aprwrite import AprModelKeys
from apr.formats.config import QKLayout
from apr.models.base import APR_ROPE_TYPE, ROPE_NEOX, ROPE_NORM
from apr.models.config import ModelConfig
from apr.models.model import Model
from apr.models.params import COMMON
from apr.models.registry import family_named

COMMON_FIELDS: Final = frozenset(p.field for p in COMMON)
_LAYER: Final = re.compile(r"^blk\.(\d+)\.(.+)$")


def hf_name(model: Model, canonical: str) -> str | None:
    """The HF spelling of a canonical tensor name (None when the family's HF checkpoints lack it, or spell
    it as one tensor per expert: `{e}`, which export does not write)."""
    m = _LAYER.match(canonical)
    key, layer = (f"blk.{{i}}.{m.group(2)}", int(m.group(1))) if m else (canonical, None)
    for role in model.family.roles(model.config):
        if role.name == key:
            return None if "{e}" in role.hf else role.hf.format(i=layer) or None
    return None


def _family_extras(cfg: ModelConfig, apr: bool) -> dict[str, object]:
    """The family's own (non-common) parameters that differ from their defaults, by HF (or .apr) key."""
    out: dict[str, object] = {}
    for p in family_named(cfg.family).params:
        if p.field in COMMON_FIELDS or not p.hf:
            continue
        value = getattr(cfg, p.field)
        default = p.default if not callable(p.default) else None
        if value != default:
            _put(
                out,
                (p.apr[0] if apr and p.apr else p.hf[0]),
                list(value) if isinstance(value, tuple) else value,
            )
    if (rs := cfg.rope_scaling.hf_dict()) is not None:
        out["rope_scaling"] = rs
    return out


def _put(out: dict[str, Any], key: str, value: object) -> None:
    """out[key] = value, a dotted key (`rope_parameters.sliding_attention.rope_theta`) as nested objects."""
    *path, last = key.split(".")
    for part in path:
        out = out.setdefault(part, {})
    out[last] = value


def apr_keys(model: Model) -> AprModelKeys:
    return apr_keys_of(model.config)


def apr_keys_of(cfg: ModelConfig) -> AprModelKeys:
    """The .apr metadata values of a config (the family's variant gives the HF architecture)."""
    variant = next((v for v in family_named(cfg.family).variants if v.name == cfg.architecture), None)
    return AprModelKeys(
        architecture=cfg.architecture,
        hf_architecture=variant.hf[0] if variant and variant.hf else None,
        hidden_size=cfg.hidden_size,
        n_layers=cfg.n_layers,
        n_heads=cfg.n_heads,
        n_kv_heads=cfg.n_kv_heads,
        vocab_size=cfg.vocab_size,
        intermediate_size=cfg.intermediate_size,
        max_position=cfg.max_position,
        rope_theta=cfg.rope_theta,
        rope_type=APR_ROPE_TYPE[ROPE_NORM if cfg.qk_layout is QKLayout.INTERLEAVED else ROPE_NEOX],
        rms_eps=cfg.rms_eps,
        head_dim=cfg.head_dim,
        n_experts=cfg.n_experts,
        tied_embeddings=cfg.tied_embeddings,
        extra=_family_extras(cfg, apr=True) | ({"norm_offset": cfg.norm_offset} if cfg.norm_offset else {}),
    )


def hf_config(
    model: Model, bos: int | None, eos: int | None, config: ModelConfig | None = None
) -> dict[str, Any]:
    """config.json for the model (transformers loads it offline); `config` in place of the model's own
    (a GGUF's Llama 3 scaling recovered from its rope_freqs tensor)."""
    cfg = config or model.config
    out: dict[str, Any] = {
        "architectures": [model.variant.hf[0]],
        "model_type": model.variant.hf_model_type or model.variant.name,
    }
    for p in model.family.params:
        if p.field in COMMON_FIELDS and p.hf:
            out[p.hf[0]] = getattr(cfg, p.field)
    out |= _family_extras(cfg, apr=False)
    out |= model.family.hf_extra(cfg)
    out |= {
        "vocab_size": cfg.vocab_size,
        "tie_word_embeddings": cfg.tied_embeddings,
        "attention_bias": cfg.qkv_bias,
        "bos_token_id": bos,
        "eos_token_id": eos,
        "pad_token_id": None,  # some configs default it to an id past a small vocabulary (Phi-3: 32000)
        "torch_dtype": "float32",
    }
    return out


def config_dict(cfg: ModelConfig) -> dict[str, Any]:
    """Every config field, for `apr inspect` and model-level comparison."""
    return {f.name: (asdict(cfg)[f.name]) for f in fields(cfg)}
