"""RoPE frequencies with the scaling types transformers and llama.cpp implement, in float64.

`inv_freq(cfg_scaling, head_dim, theta, freq_factors)` gives θ_i (i < Dh/2) and the cos/sin multiplier:

    default  θ^(−2i/Dh)
    linear   θ^(−2i/Dh) / factor                    (positions divided by factor)
    llama3   θ^(−2i/Dh) / f_i  with f_i from the wavelength bands (Llama 3.1), or the checkpoint's own
             per-frequency divisors (GGUF `rope_freqs.weight`, which the converter computes the same way)
    yarn     the blend of interpolated and extrapolated frequencies over the correction range, and
             cos/sin × attention_factor (0.1·ln(factor) + 1 unless given)

Pure functions; no stages, no I/O.
"""

from __future__ import annotations

import math
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from apr.errors import ModelLoadError

Array = npt.NDArray[Any]


class RopeScalingLike(Protocol):
    """The fields of apr.models.config.RopeScaling this module reads."""

    @property
    def kind(self) -> str: ...
    @property
    def factor(self) -> float: ...
    @property
    def low_freq_factor(self) -> float: ...
    @property
    def high_freq_factor(self) -> float: ...
    @property
    def original_max_position(self) -> int: ...
    @property
    def beta_fast(self) -> float: ...
    @property
    def beta_slow(self) -> float: ...
    @property
    def attention_factor(self) -> float: ...


def inv_freq(
    scaling: RopeScalingLike, head_dim: int, theta: float, freq_factors: Array | None = None
) -> tuple[Array, float]:
    """(θ_i for i < head_dim/2 as float64, multiplier of cos and sin)."""
    base = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)  # (Dh/2,)
    if freq_factors is not None:
        if freq_factors.shape != base.shape:
            raise ModelLoadError(
                f"rope_freqs has {freq_factors.shape[0]} entries, head_dim/2 is {base.shape[0]}"
            )
        return base / freq_factors.astype(np.float64), 1.0
    kind = scaling.kind
    if kind == "default":
        return base, 1.0
    if kind == "linear":
        return base / scaling.factor, 1.0
    if kind == "llama3":
        return base / llama3_factors(base, scaling), 1.0
    if kind == "yarn":
        return _yarn(base, head_dim, theta, scaling)
    raise ModelLoadError(f"rope scaling type {kind!r} is not implemented")


def llama3_factors(base: Array, s: RopeScalingLike) -> Array:
    """Per-frequency divisors of Llama 3.1's rope scaling (1 for short wavelengths, factor for long)."""
    wavelen = 2 * math.pi / base
    low_wavelen = s.original_max_position / s.low_freq_factor
    high_wavelen = s.original_max_position / s.high_freq_factor
    smooth = (s.original_max_position / wavelen - s.low_freq_factor) / (
        s.high_freq_factor - s.low_freq_factor
    )
    medium = 1.0 / ((1 - smooth) / s.factor + smooth)
    out: Array = np.where(wavelen < high_wavelen, 1.0, np.where(wavelen > low_wavelen, s.factor, medium))
    return out


def _yarn(base: Array, head_dim: int, theta: float, s: RopeScalingLike) -> tuple[Array, float]:
    def correction_dim(rotations: float) -> float:
        return (
            head_dim * math.log(s.original_max_position / (rotations * 2 * math.pi)) / (2 * math.log(theta))
        )

    low = max(math.floor(correction_dim(s.beta_fast)), 0)
    high = min(math.ceil(correction_dim(s.beta_slow)), head_dim - 1)
    span = max(high - low, 0.001)
    ramp = np.clip((np.arange(head_dim // 2, dtype=np.float64) - low) / span, 0.0, 1.0)  # (Dh/2,)
    extrapolate = 1.0 - ramp
    freqs: Array = base / s.factor * (1.0 - extrapolate) + base * extrapolate
    factor = s.attention_factor or (0.1 * math.log(s.factor) + 1.0 if s.factor > 1 else 1.0)
    return freqs, factor


def angles(positions: Array, freqs: Array, mult: float, dtype: Any) -> tuple[Array, Array]:
    """cos, sin of pos·θ_i (times `mult`), computed in float64, then cast. (T, Dh/2) each."""
    ang = positions.astype(np.float64)[:, None] * freqs[None, :]  # (T, Dh/2)
    return (np.cos(ang) * mult).astype(dtype), (np.sin(ang) * mult).astype(dtype)
