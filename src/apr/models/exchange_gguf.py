"""A family's config written as GGUF metadata: exchange.py's counterpart for `apr export --format gguf`.

Derived from the same parameter tables that read GGUF files (models/params.py): every common parameter goes
out under its GGUF key, a family's own parameter when it differs from its default, RoPE scaling under
`{arch}.rope.scaling.*` (Llama 3's scaling as the `rope_freqs.weight` tensor, as llama.cpp's converter
writes it), Gemma's sliding layers as `{arch}.attention.sliding_window_pattern` when they are not llama.cpp's
default pattern. So what is written is what `open_model` reads back. Values are plain Python (int, float,
bool, str, list of bool); the writer (convert/gguf_export.py) picks the GGUF value types.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Final

import numpy as np
import numpy.typing as npt

from apr.engine.rope import llama3_factors
from apr.errors import ValidationError
from apr.models.config import ModelConfig, RopeScaling
from apr.models.exchange import COMMON_FIELDS
from apr.models.model import Model
from apr.models.params import Param

Value = int | float | bool | str | list[bool]
ROPE_FREQS: Final = "rope_freqs.weight"
ROPE_FREQS_RTOL: Final = 1e-6  # rope_freqs values that are the same divisors (converters round differently)
SLIDING_PATTERN: Final = "{arch}.attention.sliding_window_pattern"
# (ModelConfig.rope_scaling field, GGUF key under {arch}.rope.scaling.) per scaling kind
ROPE_SCALING_KEYS: Final[dict[str, tuple[tuple[str, str], ...]]] = {
    "linear": (("factor", "factor"),),
    "yarn": (
        ("factor", "factor"),
        ("original_max_position", "original_context_length"),
        ("beta_fast", "yarn_beta_fast"),
        ("beta_slow", "yarn_beta_slow"),
        ("attention_factor", "yarn_attn_factor"),
    ),
}


def gguf_architecture(model: Model) -> str:
    """`general.architecture`: the variant's GGUF name; a variant without one (Mistral) is written as its
    family's first variant, as llama.cpp's converter writes Mistral as "llama"."""
    for variant in (model.variant, model.family.variants[0]):
        if variant.gguf:
            return variant.gguf[0]
    raise ValidationError(f"cannot export architecture {model.config.architecture!r} to GGUF")


def gguf_metadata(model: Model) -> dict[str, Value]:
    """The `{arch}.*` keys of `model`'s config (general.* and tokenizer keys are the writer's)."""
    cfg, arch = model.config, gguf_architecture(model)
    out: dict[str, Value] = {}
    for p in model.family.params:
        if p.gguf and _wanted(p, cfg):
            out[p.gguf.format(arch=arch)] = _plain(getattr(cfg, p.field), p.kind)
    out[f"{arch}.vocab_size"] = cfg.vocab_size
    out[f"{arch}.rope.dimension_count"] = cfg.head_dim
    out[f"{arch}.attention.value_length"] = cfg.head_dim
    s = cfg.rope_scaling
    if s.kind in ROPE_SCALING_KEYS:
        out[f"{arch}.rope.scaling.type"] = s.kind
        for field, key in ROPE_SCALING_KEYS[s.kind]:
            if value := getattr(s, field):
                out[f"{arch}.rope.scaling.{key}"] = value
    if cfg.sliding_window and SLIDING_PATTERN in model.family.gguf_keys:
        out[SLIDING_PATTERN.format(arch=arch)] = [i in cfg.sliding_layers for i in range(cfg.n_layers)]
    return out


def _wanted(p: Param, cfg: ModelConfig) -> bool:
    if p.field in COMMON_FIELDS or callable(p.default):
        return True
    return bool(getattr(cfg, p.field) != p.default)


def _plain(value: object, kind: type) -> Value:
    if kind is float:
        return float(value)  # type: ignore[arg-type]
    assert isinstance(value, int | str | bool), value
    return value


def rope_freqs(cfg: ModelConfig) -> npt.NDArray[np.float32] | None:
    """Llama 3's per-frequency divisors as the `rope_freqs.weight` a GGUF carries (None for any other
    scaling, or when the checkpoint has the tensor already)."""
    s = cfg.rope_scaling
    if s.kind != "llama3" or s.freq_factors:
        return None
    base = 1.0 / cfg.rope_theta ** (np.arange(0, cfg.head_dim, 2, dtype=np.float64) / cfg.head_dim)
    return llama3_factors(base, s).astype(np.float32)


# (low_freq_factor, high_freq_factor) pairs tried when recovering Llama 3's scaling from rope_freqs, Meta's
# first (Llama 3.1, 3.2 and 3.3 all use 1 and 4)
LLAMA3_BANDS: Final = ((1.0, 4.0), (1.0, 2.0), (1.0, 8.0), (2.0, 4.0), (1.0, 1.5))


def llama3_from_freqs(cfg: ModelConfig, freqs: npt.NDArray[np.float32]) -> RopeScaling | None:
    """The Llama 3 `rope_scaling` whose per-frequency divisors (`rope_freqs`) are `freqs`, as a GGUF
    carries them: llama.cpp's converter writes the tensor and no parameters. The factor is the largest
    divisor; original_max_position_embeddings is solved from a divisor between 1 and the factor (or, with
    none, the powers of two and the context length are tried); each candidate must give back every
    divisor to float32 rounding (ROPE_FREQS_RTOL, as `apr diff` compares them). Any candidate that does gives
    the same RoPE: the divisors are all the forward reads. None when no candidate matches; a default
    scaling when every divisor is 1."""
    f = np.asarray(freqs, dtype=np.float64).reshape(-1)
    half = cfg.head_dim // 2
    if f.size != half or not np.isfinite(f).all() or (f < 1.0).any():
        return None
    if (f == 1.0).all():
        return RopeScaling()
    base = 1.0 / cfg.rope_theta ** (np.arange(0, cfg.head_dim, 2, dtype=np.float64) / cfg.head_dim)
    wavelen = 2 * np.pi / base
    factor = float(np.float32(f.max()))
    powers = [2**k for k in range(31)]
    medium = (f > 1.0) & (f < factor)
    for low, high in LLAMA3_BANDS:
        solved = []
        for v, w in zip(f[medium], wavelen[medium], strict=True):
            smooth = (1.0 / v - 1.0 / factor) / (1.0 - 1.0 / factor)
            solved.append(round(w * (low + smooth * (high - low))))
        for orig in dict.fromkeys([*solved, *powers, cfg.max_position]):
            if orig <= 0:
                continue
            s = RopeScaling("llama3", factor, low, high, int(orig))
            back = rope_freqs(replace(cfg, rope_scaling=s))
            if back is not None and np.allclose(back, f, rtol=ROPE_FREQS_RTOL, atol=0.0):
                return s
    return None
