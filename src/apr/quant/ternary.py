"""Ternary dequantizers: TQ1_0 and TQ2_0 (BitNet b1.58 weights in {-1, 0, 1}, ggml-common.h blocks).

Both hold 256 weights and one f16 `d` per block; a weight is `(q - 1) * d` for a digit q in 0..2.
TQ2_0 packs 4 digits a byte, 2 bits each, in the K-quant order of Q2_K (a `kquants.plan`). TQ1_0 packs
5 digits a byte (4 in `qh`) as the fixed-point fraction `byte / 256 ≈ Σ q_i 3**-(i+1)` rounded up:
digit i is the integer part of 3 × (`byte · 3**i` mod 256) / 256, which ggml computes in uint8 and
uint16 exactly as below.
"""

from __future__ import annotations

from typing import Final

import numpy as np

from apr.quant.blocks import F32Array, U8Array, block_kernel, f16_at, scale_ints
from apr.quant.kquants import block_words, plan, unpack
from apr.quant.types import QK_K, QuantType

_POW3: Final = np.array([1, 3, 9, 27, 81], np.uint8)
TQ2_DIGITS: Final = plan(lambda e: (32 * (e // 128) + e % 32, 2 * (e // 32 % 4)), 2)


def _digits(qs: U8Array, count: int, out: U8Array) -> None:
    """The first `count` base-3 digits of each byte of `qs` (n, m), digit-major into `out` (n, count, m)."""
    q = qs[:, None, :] * _POW3[:count, None]  # uint8: wraps mod 256, as C's uint8_t
    np.right_shift(q.astype(np.uint16) * np.uint16(3), np.uint16(8), out=out, casting="unsafe")


@block_kernel(QuantType.TQ1_0)
def _tq1_0(b: U8Array, out: F32Array) -> None:  # qs[48] (32 + 16 bytes, 5 digits), qh[4] (4), d
    n = len(b)
    q = np.empty((n, QK_K), np.uint8)
    _digits(b[:, :32], 5, q[:, :160].reshape(n, 5, 32))
    _digits(b[:, 32:48], 5, q[:, 160:240].reshape(n, 5, 16))
    _digits(b[:, 48:52], 4, q[:, 240:].reshape(n, 4, 4))
    q -= np.uint8(1)
    scale_ints(q.view(np.int8), f16_at(b, 52), out)


@block_kernel(QuantType.TQ2_0)
def _tq2_0(b: U8Array, out: F32Array) -> None:  # qs[64], d
    q = unpack(block_words(b, 64), TQ2_DIGITS).view(np.uint8)
    q -= np.uint8(1)
    scale_ints(q.view(np.int8), f16_at(b, 64), out)
