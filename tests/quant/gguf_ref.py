"""gguf-py's `gguf.quants.dequantize` as the oracle, and the bitwise comparisons the quant tests use.

`dequantizable()` asks gguf-py itself (one zero block per type) which types it can dequantize instead of
listing them, so a gguf-py that learns a new type makes the registry tests fail until apr has it too.
gguf is a hard requirement of the test suite (dev extra).
"""

from __future__ import annotations

from functools import cache

import gguf
import numpy as np
import numpy.typing as npt
from gguf.quants import dequantize

from apr.quant import QuantType

F32 = npt.NDArray[np.float32]


@cache
def dequantizable() -> frozenset[str]:
    """Names of the GGML types gguf-py's `dequantize` handles (F32 included)."""
    names = set()
    for gtype in gguf.GGMLQuantizationType:
        type_size = gguf.GGML_QUANT_SIZES[gtype][1]
        try:
            dequantize(np.zeros((1, type_size), np.uint8), gtype)
        except NotImplementedError:
            continue
        names.add(gtype.name)
    return frozenset(names)


def gguf_dequantize(raw: npt.NDArray[np.uint8], qtype: QuantType) -> F32:
    with np.errstate(all="ignore"):  # inf * 0 in the scales of random blocks
        return np.asarray(dequantize(raw, gguf.GGMLQuantizationType[qtype.name]), np.float32)


def bits(a: npt.NDArray[np.float32]) -> npt.NDArray[np.uint32]:
    return np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)


def assert_bits_equal(got: F32, want: F32, what: str = "") -> None:
    """Bit for bit: signed zeros and NaN payloads too."""
    assert got.dtype == np.float32 and got.shape == want.shape, (what, got.shape, want.shape)
    same = bits(got) == bits(want)
    assert same.all(), f"{what}: {(~same).sum()} of {same.size} values differ, first at {_first(same)}"


def assert_equal_nan_equal(got: F32, want: F32, what: str = "") -> None:
    """Bit for bit, except that any two NaNs are equal (ggml's C flips NaN signs where numpy does not)."""
    assert got.dtype == np.float32 and got.shape == want.shape, (what, got.shape, want.shape)
    same = (bits(got) == bits(want)) | (np.isnan(got) & np.isnan(want))
    assert same.all(), f"{what}: {(~same).sum()} of {same.size} values differ, first at {_first(same)}"


def _first(same: npt.NDArray[np.bool_]) -> tuple[int, ...]:
    return tuple(int(i) for i in np.argwhere(~same)[0])
