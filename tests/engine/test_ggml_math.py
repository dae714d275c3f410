"""apr.engine.ggml_math against ggml-cpu's own `ggml_vec_silu_f32` / `ggml_vec_swiglu_f32` (the AVX2 build
llama.cpp runs), bit for bit, over ordinary values, the large-|x| paths of its expf, and ±0 / ±inf."""

from __future__ import annotations

import ctypes

import numpy as np
import pytest

from apr.engine import ggml_math, ops
from tests.quant import ggml_cpu_ref

pytestmark = pytest.mark.oracle


def inputs() -> np.ndarray:
    rng = np.random.default_rng(15)
    edge = [0.0, -0.0, 1e-30, -1e-30, 88.0, 89.0, -88.0, -104.0, -110.0, 150.0, -150.0, 200.0, -200.0]
    x = np.concatenate([rng.standard_normal(1 << 15) * 4, rng.uniform(-120, 120, 1 << 13), edge * 8])
    x = np.concatenate([x, [np.inf, -np.inf] * 4])
    return x[: x.size // 8 * 8].astype(np.float32)  # whole 8-lane groups: ggml's scalar tail uses libm


def ggml(name: str, *arrays: np.ndarray) -> np.ndarray:
    fn = getattr(ggml_cpu_ref._lib(), name)
    fn.argtypes = [ctypes.c_int] + [ctypes.c_void_p] * (len(arrays) + 1)
    fn.restype = None
    out = np.empty_like(arrays[0])
    fn(out.size, out.ctypes.data, *(a.ctypes.data for a in arrays))
    return out


def test_silu_is_ggml_vec_silu_bit_for_bit() -> None:
    x = inputs()
    assert ggml_math.silu(x).tobytes() == ggml("ggml_vec_silu_f32", x).tobytes()


def test_swiglu_is_ggml_vec_swiglu_bit_for_bit() -> None:
    g = inputs()
    u = np.random.default_rng(16).standard_normal(g.size).astype(np.float32)
    assert (ops.silu(g) * u).tobytes() == ggml("ggml_vec_swiglu_f32", g, u).tobytes()


def test_expf_is_within_two_ulp_of_exp() -> None:
    x = np.linspace(-80, 80, 100_001).astype(np.float32)
    exact = np.exp(x.astype(np.float64))
    assert (np.abs(ggml_math.expf(x) - exact) / exact).max() < 2 * 2.0**-23
