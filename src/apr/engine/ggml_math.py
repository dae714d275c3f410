"""ggml-cpu's float32 exp and SiLU, bit for bit: `ggml_v_expf` / `ggml_v_silu` (vec.h, the AVX2 + FMA path
this x86 build runs; ARM Limited's routine, max error 1.45 ulp + 0.5).

llama.cpp's fused SwiGLU (`ggml_vec_swiglu_f32`) computes silu(g) · u with these, 8 lanes at a time; the
scalar tail of a row that is not a multiple of 8 uses libm's expf, which this does not reproduce. Each fused
multiply-add is emulated as a float64 product (exact for two float32) plus a float64 sum, rounded once to
float32; that differs from a true FMA only when the float64 sum rounds onto a float32 tie (~2^-29).

`rope_tables` builds RoPE's cos/sin as ggml's rope cache does (a float32 running product of the
frequencies and libm's cosf/sinf), for `--precision ggml`.
"""

from __future__ import annotations

import ctypes
import functools
from typing import Any, Final

import numpy as np
import numpy.typing as npt

F32 = npt.NDArray[np.float32]
_h = float.fromhex
SHIFT: Final = np.float32(_h("0x1.8p23"))  # rounds z to an integer in its low mantissa bits
LOG2E: Final = np.float32(_h("0x1.715476p+0"))
LN2_HI: Final = np.float32(_h("0x1.62e4p-1"))
LN2_LO: Final = np.float32(_h("0x1.7f7d1cp-20"))
POLY: Final = tuple(np.float32(_h(c)) for c in ("0x1.ffffecp-1", "0x1.fffdb6p-2", "0x1.555e66p-3"))
POLY_HI: Final = tuple(np.float32(_h(c)) for c in ("0x1.573e2ep-5", "0x1.0e4020p-7"))


def fma(a: Any, b: Any, c: Any) -> F32:
    """fma(a, b, c) of float32 operands, rounded once to float32 (a float64 product and sum)."""
    return _fma(a, b, c)


def _fma(a: Any, b: Any, c: Any) -> F32:
    return (np.asarray(a, np.float64) * np.asarray(b, np.float64) + np.asarray(c, np.float64)).astype(
        np.float32
    )


CHUNK: Final = 1 << 15  # values per pass: the float64 temporaries stay in cache (10× whole arrays)


def _chunked(fn: Any, x: F32) -> F32:
    """`fn` (elementwise) over `x` in CHUNK-sized pieces."""
    flat = np.ascontiguousarray(x, np.float32).reshape(-1)
    if flat.size <= CHUNK:
        return np.asarray(fn(flat), np.float32).reshape(np.shape(x))
    out = np.empty_like(flat)
    for i in range(0, flat.size, CHUNK):
        out[i : i + CHUNK] = fn(flat[i : i + CHUNK])
    return out.reshape(np.shape(x))


def expf(x: F32) -> F32:
    """ggml_v_expf, elementwise: exp(x) as 2^n · (1 + p(b)), n = round(x / ln 2), b = x − n·ln 2."""
    with np.errstate(all="ignore"):  # ±inf and NaN propagate as in ggml
        return _chunked(_expf, np.asarray(x, np.float32))


def _expf(x: F32) -> F32:
    z = _fma(x, LOG2E, SHIFT)
    n = (z - SHIFT).astype(np.float32)
    b = _fma(-n, LN2_LO, _fma(-n, LN2_HI, x))
    e = z.view(np.int32) << np.int32(23)
    k = (e + np.float32(1).view(np.int32)).view(np.float32)
    u = (b * b).astype(np.float32)
    c1, c2, c3 = POLY
    c4, c5 = POLY_HI
    j = _fma(_fma(_fma(c5, b, c4), u, _fma(c3, b, c2)), u, (c1 * b).astype(np.float32))
    out = _fma(j, k, k)
    big = np.abs(n) > 126  # 2^n overflows the exponent: scale in two steps (or flush)
    if big.any():
        g = np.where(n <= 0, np.uint32(0x82000000), np.uint32(0)).view(np.int32)
        s1 = (g + np.int32(0x7F000000)).view(np.float32)
        s2 = (e - g).view(np.float32)
        huge = np.abs(n) > 192
        slow = np.where(huge, (s1 * s1).astype(np.float32), (_fma(s2, j, s2) * s1).astype(np.float32))
        out = np.where(big, slow, out)
    return out


def silu(x: F32) -> F32:
    """ggml_v_silu: x / (1 + expf(0 − x)), all in float32."""
    with np.errstate(all="ignore"):
        return _chunked(_silu, np.asarray(x, np.float32))


def _silu(x: F32) -> F32:
    return (x / (np.float32(1) + _expf((np.float32(0) - x).astype(np.float32)))).astype(np.float32)


@functools.cache
def _libm() -> ctypes.CDLL:
    import ctypes.util  # only here: find_library runs ldconfig, and only --precision ggml calls this

    lib = ctypes.CDLL(ctypes.util.find_library("m") or "libm.so.6")
    for name in ("cosf", "sinf", "powf"):
        getattr(lib, name).restype = ctypes.c_float
    lib.cosf.argtypes = lib.sinf.argtypes = [ctypes.c_float]
    lib.powf.argtypes = [ctypes.c_float, ctypes.c_float]
    return lib


def _each_f32(fn: Any, x: F32) -> F32:
    flat = [fn(float(v)) for v in np.asarray(x, np.float32).reshape(-1)]
    return np.array(flat, np.float32).reshape(np.shape(x))


def rope_tables(
    positions: npt.NDArray[Any],
    n_dims: int,
    base: float,
    freq_scale: float = 1.0,
    freq_factors: F32 | None = None,
) -> tuple[F32, F32]:
    """cos, sin (T, n_dims/2) float32 as ggml-cpu's `ggml_rope_cache_init` builds them (no YaRN ramp,
    attn_factor 1): θ_0 = p, θ_{i+1} = θ_i · powf(base, −2/n_dims) in float32, then cosf/sinf (libm, as
    ggml calls them) of freq_scale · (θ_i / freq_factor_i)."""
    lib = _libm()
    theta_scale = np.float32(lib.powf(np.float32(base), np.float32(-2.0) / np.float32(n_dims)))
    half = n_dims // 2
    theta = np.empty((len(positions), half), np.float32)
    theta[:, 0] = np.asarray(positions, np.float32)
    for i in range(1, half):
        theta[:, i] = theta[:, i - 1] * theta_scale
    if freq_factors is not None:
        theta = theta / np.asarray(freq_factors, np.float32)[None, :]
    theta = (np.float32(freq_scale) * theta).astype(np.float32)
    return _each_f32(lib.cosf, theta), _each_f32(lib.sinf, theta)
