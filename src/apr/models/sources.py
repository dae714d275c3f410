"""Config values every family reads the same way: vocab size, tied embeddings, Q/K row layout, RoPE scaling
(HF `rope_scaling` / `rope_parameters`, GGUF `rope.scaling.*`, `.apr` as HF), and the HF keys whose
non-neutral values no dense family implements.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Final

import numpy.typing as npt

from apr.errors import FormatError, ModelLoadError
from apr.formats.base import ConfigSource
from apr.formats.config import QKLayout
from apr.models.base import ROPE_NORM, Variant
from apr.models.config import ROPE_KINDS, RopeScaling
from apr.models.params import typed

Array = npt.NDArray[Any]

ROPE_GGUF_KEYS: Final = (
    "{arch}.rope.scaling.type",
    "{arch}.rope.scaling.factor",
    "{arch}.rope.scaling.original_context_length",
    "{arch}.rope.scaling.yarn_beta_fast",
    "{arch}.rope.scaling.yarn_beta_slow",
    "{arch}.rope.scaling.yarn_attn_factor",
    "{arch}.rope.scaling.yarn_ext_factor",
    "{arch}.rope.scaling.finetuned",
)
HF_ROPE_KEYS: Final = ("rope_scaling", "rope_parameters")
# rope_parameters / rope_scaling entries that change the math and that apr does not implement
ROPE_UNSUPPORTED_KEYS: Final = ("mscale", "mscale_all_dim", "partial_rotary_factor", "truncate")
ROPE_KNOWN_KEYS: Final = frozenset(
    {
        "rope_type",
        "type",
        "rope_theta",
        "factor",
        "low_freq_factor",
        "high_freq_factor",
        "original_max_position_embeddings",
        "beta_fast",
        "beta_slow",
        "attention_factor",
        *ROPE_UNSUPPORTED_KEYS,
    }
)


def vocab_size(source: ConfigSource, present: frozenset[str], where: str) -> int:
    """The vocab size as stored, else the tokenizer's, else the embedding's rows (filled in later)."""
    keys = {"gguf": (f"{source.architecture}.vocab_size",), "hf": ("vocab_size",), "apr": ("vocab_size",)}
    for key in keys[source.kind]:
        v = source.get(key)
        if v is not None:
            n = typed(v, int)
            if n is None or n <= 0:
                raise FormatError(f"{where}: config key '{key}' must be a positive integer, got {v!r}")
            return int(n)
    tokens = source.get("tokenizer.ggml.tokens") if source.kind == "gguf" else None
    return len(tokens) if isinstance(tokens, list) else 0  # 0: the embedding decides (models/model.py)


def tied_embeddings(source: ConfigSource, present: frozenset[str]) -> bool:
    """No output.weight; or an .apr import that copied the embedding as lm_head (and says so)."""
    return "output.weight" not in present or (source.kind == "apr" and source.get("tied_embeddings") is True)


def qk_layout(variant: Variant, source: ConfigSource, where: str) -> QKLayout:
    """GGUF: the arch's rope type; HF: HF rows; .apr: its rope_type (aprender's), else the variant's."""
    stored = {ROPE_NORM: QKLayout.INTERLEAVED}.get(variant.rope, QKLayout.HF)
    if source.kind == "hf":
        return QKLayout.HF
    if source.kind == "apr" and (rt := source.get("rope_type")) is not None:
        layouts = {0: QKLayout.INTERLEAVED, 2: QKLayout.HF}
        if rt not in layouts or isinstance(rt, bool):
            raise FormatError(f"{where}: metadata 'rope_type' is {rt!r}: expected 0 or 2")
        return layouts[rt]
    return stored


def rope_scaling(source: ConfigSource, freq_factors: bool, where: str) -> RopeScaling:
    """RoPE scaling from HF `rope_scaling`/`rope_parameters` (also stored so in .apr) or GGUF keys."""
    if freq_factors:
        return RopeScaling("llama3", freq_factors=True)
    if source.kind == "gguf":
        return _gguf_rope(source, where)
    params = next((v for k in HF_ROPE_KEYS if isinstance(v := source.get(k), dict)), None)
    if params is None:
        return RopeScaling()
    if "full_attention" in params or "sliding_attention" in params:  # per layer type (Gemma 3)
        local = params.get("sliding_attention") or {}
        if not isinstance(local, dict) or (local.get("rope_type") or "default") != "default":
            raise ModelLoadError(f"{where}: rope scaling of sliding-window layers is not implemented")
        rest = {k: v for k, v in params.items() if k != "sliding_attention"}
        params = rest.get("full_attention", rest)  # the global layers' (an .apr keeps only the local theta)
        if not isinstance(params, dict):
            raise FormatError(f"{where}: rope_parameters 'full_attention' must be an object")
    kind = params.get("rope_type", params.get("type")) or "default"
    if kind not in ROPE_KINDS:
        raise ModelLoadError(f"{where}: rope scaling type {kind!r} is not implemented")
    unknown = sorted(set(params) - ROPE_KNOWN_KEYS)
    if unknown:
        raise ModelLoadError(f"{where}: rope parameter '{unknown[0]}' is not implemented")
    bad = [k for k in ROPE_UNSUPPORTED_KEYS if params.get(k) not in (None, 1, 1.0, True)]
    if bad:
        raise ModelLoadError(f"{where}: rope scaling '{bad[0]}' = {params[bad[0]]!r} is not implemented")
    if kind == "default":
        return RopeScaling()

    def num(key: str, default: float | None = None) -> float:
        v = params.get(key)
        if v is None and default is not None:
            return default
        x = typed(v, float)
        if x is None or not x > 0:
            raise FormatError(f"{where}: rope scaling '{key}' must be a positive number, got {v!r}")
        return float(x)

    orig = params.get("original_max_position_embeddings")
    return (
        RopeScaling(
            kind,
            factor=num("factor"),
            low_freq_factor=num("low_freq_factor", 1.0),
            high_freq_factor=num("high_freq_factor", 4.0),
            original_max_position=int(num("original_max_position_embeddings")) if kind != "linear" else 0,
            beta_fast=num("beta_fast", 32.0),
            beta_slow=num("beta_slow", 1.0),
            attention_factor=float(params.get("attention_factor") or 0.0),
        )
        if orig is not None or kind == "linear"
        else _missing_orig(kind, where)
    )


def _missing_orig(kind: str, where: str) -> RopeScaling:
    raise FormatError(f"{where}: rope scaling {kind!r} needs 'original_max_position_embeddings'")


def _gguf_rope(source: ConfigSource, where: str) -> RopeScaling:
    arch = source.architecture

    def get(key: str, default: float) -> float:
        v = source.get(f"{arch}.rope.scaling.{key}")
        return default if v is None else float(v)

    kind = source.get(f"{arch}.rope.scaling.type") or "none"
    if kind == "none":
        return RopeScaling()
    if kind not in ("linear", "yarn"):
        raise ModelLoadError(f"{where}: '{arch}.rope.scaling.type' {kind!r} is not implemented")
    if kind == "yarn" and get("yarn_ext_factor", 1.0) != 1.0:
        raise ModelLoadError(f"{where}: yarn_ext_factor {get('yarn_ext_factor', 1.0)} is not implemented")
    return RopeScaling(
        kind,
        factor=get("factor", 1.0),
        original_max_position=int(get("original_context_length", 0)),
        beta_fast=get("yarn_beta_fast", 32.0),
        beta_slow=get("yarn_beta_slow", 1.0),
        attention_factor=get("yarn_attn_factor", 0.0),
    )


HF_REFUSE: Final[dict[str, Callable[[Any], str | None]]] = {
    "partial_rotary_factor": lambda v: None if v in (1, 1.0) else f"partial rotary embeddings ({v})",
    "attn_logit_softcapping": lambda v: f"attention soft-capping ({v})",
    "final_logit_softcapping": lambda v: f"final logit soft-capping ({v})",
    "tie_word_embeddings": lambda v: None,  # follows from whether lm_head.weight is stored
}
