"""apr.quant.quantize: gguf-py reads its bytes back within each type's error bound, and it agrees with
ggml's own C quantizer (`ggml_quantize_chunk`, called through ctypes) byte for byte."""

from __future__ import annotations

from collections.abc import Callable
from functools import cache
from typing import Final

import gguf as gguf
import numpy as np
import numpy.typing as npt
import pytest
from gguf.quants import dequantize as gguf_dequantize

from apr.errors import AprError, UnsupportedQuantError
from apr.quant import QUANT_TYPES, QuantType, dequantize, quantize
from apr.quant.types import QUANT_LAYOUT

F32 = npt.NDArray[np.float32]
# Relative RMSE (error RMS / signal RMS) a round trip may reach on standard normal data.
RMSE_BOUND: Final = {
    QuantType.F32: 0.0,
    QuantType.F16: 3e-4,
    QuantType.BF16: 2.5e-3,
    QuantType.Q8_0: 0.007,
    QuantType.Q5_0: 0.05,
    QuantType.Q6_K: 0.022,
    QuantType.Q4_K: 0.09,
}


def _gaussian(rng: np.random.Generator, shape: tuple[int, int]) -> F32:
    return rng.standard_normal(shape).astype(np.float32)


def _heavy_tailed(rng: np.random.Generator, shape: tuple[int, int]) -> F32:
    return rng.standard_t(2, shape).astype(np.float32)


def _mixed_scales(rng: np.random.Generator, shape: tuple[int, int]) -> F32:
    """Every 16 values at their own magnitude, 1e-7 … 1e4 (subnormal f16 scales included)."""
    scale = 10.0 ** rng.integers(-7, 5, (shape[0], shape[1] // 16, 1))
    return (rng.standard_normal((shape[0], shape[1] // 16, 16)) * scale).reshape(shape).astype(np.float32)


def _degenerate(rng: np.random.Generator, shape: tuple[int, int]) -> F32:
    """Zero, constant (positive and negative), one-hot, all-positive and sparse sub-blocks."""
    x = rng.standard_normal(shape).astype(np.float32).reshape(-1, 16)
    kind = np.arange(len(x)) % 7
    x[kind == 0] = 0.0
    x[kind == 1] = 0.75
    x[kind == 2] = -3.0
    x[kind == 3] = np.where(np.arange(16) == 5, np.float32(2.0), np.float32(0.0))
    x[kind == 4] = np.abs(x[kind == 4]) + 1.0
    x[kind == 5] *= rng.random((int((kind == 5).sum()), 16)) < 0.2
    return x.reshape(shape)


def _smollm2_weights(rng: np.random.Generator, shape: tuple[int, int]) -> F32:
    """Real weights: blk.0.ffn_down and the first rows of token_embd from the F32 fixture."""
    values = np.concatenate([w.reshape(-1) for w in _real_weights()])
    return values[: shape[0] * shape[1]].reshape(shape)


@cache
def _real_weights() -> tuple[F32, ...]:
    import llama_cpp  # noqa: F401 (the oracle must be installed)

    from tests.quant.fixtures import tensors_only_f32_gguf

    reader = gguf.GGUFReader(tensors_only_f32_gguf())
    wanted = {"blk.0.ffn_down.weight", "token_embd.weight", "blk.29.attn_v.weight"}
    return tuple(np.array(t.data[:200], np.float32) for t in reader.tensors if t.name in wanted)


DATASETS: Final[dict[str, Callable[[np.random.Generator, tuple[int, int]], F32]]] = {
    "gaussian": _gaussian,
    "heavy_tailed": _heavy_tailed,
    "mixed_scales": _mixed_scales,
    "degenerate": _degenerate,
    "smollm2": _smollm2_weights,
}


def relative_rmse(x: F32, y: F32) -> float:
    return float(np.sqrt(np.mean((x - y) ** 2.0)) / np.sqrt(np.mean(x**2.0)))


def gguf_readback(raw: npt.NDArray[np.uint8], qtype: QuantType) -> F32:
    with np.errstate(all="ignore"):
        return np.asarray(gguf_dequantize(raw, gguf.GGMLQuantizationType[qtype.name]), np.float32)


def test_registry() -> None:
    assert {q.name for q in QUANT_TYPES} == {"F32", "F16", "BF16", "Q8_0", "Q5_0", "Q4_K", "Q6_K"}


@pytest.mark.parametrize("qtype", sorted(QUANT_TYPES), ids=lambda q: q.name)
def test_round_trip_error_bound(qtype: QuantType) -> None:
    x = _gaussian(np.random.default_rng(0), (96, 2048))  # > one quantizer chunk for the K-quants
    raw = quantize(x, qtype)
    layout = QUANT_LAYOUT[qtype]
    assert raw.dtype == np.uint8 and raw.shape == (96, 2048 // layout.block_size * layout.type_size)
    y = gguf_readback(raw, qtype)
    assert relative_rmse(x, y) <= RMSE_BOUND[qtype]
    np.testing.assert_array_equal(dequantize(raw, qtype, x.shape).view(np.uint32), y.view(np.uint32))


@pytest.mark.oracle
@pytest.mark.parametrize("dataset", sorted(DATASETS))
@pytest.mark.parametrize("qtype", sorted(QUANT_TYPES), ids=lambda q: q.name)
def test_same_bytes_as_ggml(qtype: QuantType, dataset: str) -> None:
    from tests.quant import ggml_ref

    if not ggml_ref.available():
        pytest.skip("llama-cpp-python's libggml-base is not installed")
    x = DATASETS[dataset](np.random.default_rng(1), (40, 1024))
    ours, theirs = quantize(x, qtype), ggml_ref.ggml_quantize(x, qtype)
    layout = QUANT_LAYOUT[qtype]
    same = (ours.reshape(-1, layout.type_size) == theirs.reshape(-1, layout.type_size)).all(axis=1)
    ours_err = relative_rmse(x, gguf_readback(ours, qtype))
    ggml_err = relative_rmse(x, gguf_readback(theirs, qtype))
    assert ours_err <= ggml_err * 1.001
    assert same.mean() == 1.0, f"{same.mean():.4%} of blocks identical"


def test_output_shape_follows_rows() -> None:
    x = np.zeros((3, 2, 512), np.float32)
    assert quantize(x, QuantType.Q4_K).shape == (3, 2, 288)
    assert quantize(x, QuantType.Q8_0).shape == (3, 2, 544)
    assert quantize(x, QuantType.F16).shape == (3, 2, 1024)


def test_row_not_whole_blocks() -> None:
    with pytest.raises(ValueError) as e:
        quantize(np.zeros((4, 100), np.float32), QuantType.Q6_K)
    assert isinstance(e.value, AprError)
    assert (
        str(e.value)
        == "cannot quantize to Q6_K: rows of 100 values are not a whole number of 256-value blocks"
    )


def test_type_without_quantizer() -> None:
    with pytest.raises(UnsupportedQuantError) as e:
        quantize(np.zeros(32, np.float32), QuantType.Q4_0)
    assert str(e.value) == "no quantizer for Q4_0 (2)"
