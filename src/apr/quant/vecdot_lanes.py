"""ggml-cpu's x86 dot kernels for the 32-element block types, bit for bit: the order of their f32 work.

`ggml_vec_dot_q4_1_q8_1` / `q5_1_q8_1` (AVX2) and llamafile's tinyBLAS for Q8_0 × Q8_0 (what llama.cpp
runs for those weights on this build: no CPU repack for them on x86) compute one output the same way.
Each 32-element block gives 8 exact int32 lane sums, lane l = Σ q_w·q_x over the block's elements
4l..4l+3 (`maddubs` + `madd`); an 8-lane f32 accumulator takes `acc = fma(d_w·d_x, lane, acc)` block after
block; the result is the horizontal sum ((a0+a4) + (a2+a6)) + ((a1+a5) + (a3+a7)), plus, for Q8_1, the
separately accumulated f32 Σ m_w·s_x. `lane_dot` does exactly that: the lane sums come from a float32
matmul (exact: |sum| < 2^24), the FMA from a float64 product and sum rounded once to f32 (the product of
two f32 is exact in f64; the f64 sum can round twice only when it lands on an f32 tie, ~2^-29 of the time).

`lane_dot` also runs the K / IQ4 kernels (Q4_K and IQ4_NL as repacked, Q5_K, Q6_K, IQ4_XS) in their own
order (apr.quant.vecdot_k). Other types keep the dequantize-then-BLAS form of apr.quant.vecdot (the
repacked Q4_0 kernel, the other K / IQ kernels, and Q4_K / IQ4_NL weights ggml does not repack).
"""

from __future__ import annotations

from typing import Final

import numpy as np
import numpy.typing as npt

from apr.quant.blocks import DEQUANTIZERS
from apr.quant.types import GGML_LAYOUT, QuantType
from apr.quant.vecdot import QK8, Q8Blocks, block_minimums
from apr.quant.vecdot_k import K_TYPES, k_dot, kernel

F32Array = npt.NDArray[np.float32]
LANES: Final = 8
BLOCK_LANE_TYPES: Final = frozenset({QuantType.Q4_1, QuantType.Q5_1, QuantType.Q8_0, QuantType.Q5_0})
LANE_TYPES: Final = BLOCK_LANE_TYPES | K_TYPES  # the weight types lane_dot runs in the kernels' order
ONE_F16: Final = np.frombuffer(np.float16(1.0).tobytes(), np.uint8)
LANE_ELEMS: Final = 1 << 22  # lane sums per activation chunk: 16 MiB of float32


def integer_weights(raw: npt.NDArray[np.uint8], wtype: QuantType, rows: int) -> tuple[F32Array, F32Array]:
    """(q (rows, n) the block integers as float32, d (rows, nb) the f16 scales): the blocks dequantized
    with d = 1 and m = 0 (every 32-block type stores d at byte 0 and, for Q4_1/Q5_1, m at byte 2)."""
    size = GGML_LAYOUT[wtype].type_size
    blocks = np.array(raw, np.uint8).reshape(rows, -1, size)
    d = np.ascontiguousarray(blocks[..., 0:2]).view("<f2")[..., 0].astype(np.float32)
    blocks[..., 0:2] = ONE_F16
    if block_minimums(raw, wtype, rows) is not None:
        blocks[..., 2:4] = 0
    n = blocks.shape[1] * QK8
    q = DEQUANTIZERS[wtype].decode(blocks.reshape(-1), rows * n, 1).reshape(rows, n)
    return q, d


def lane_dot(
    raw: npt.NDArray[np.uint8], wtype: QuantType, rows: int, x: Q8Blocks, tensor_rows: int | None = None
) -> F32Array:
    """The kernel's result for every weight row × activation row: (rows, T) float32. `tensor_rows` (the
    whole weight's row count, default `rows`) decides whether ggml repacks a Q4_K / IQ4_NL weight; one it
    does not repack is multiplied in the dequantize-then-f32 form (not its kernel's order)."""
    if wtype in K_TYPES:
        whole = rows if tensor_rows is None else tensor_rows
        if kernel(wtype, whole, x.q.shape[0]) is None:
            w = DEQUANTIZERS[wtype].decode(np.asarray(raw, np.uint8).reshape(-1), rows * x.q[0].size, 1)
            out: F32Array = w.reshape(rows, -1) @ x.values().T
            return out
        return k_dot(raw, wtype, rows, x.q, x.d, x.bsums, whole)
    q, d_w = integer_weights(raw, wtype, rows)
    m_w = block_minimums(raw, wtype, rows)
    t, nb = x.d.shape
    qw = q.reshape(rows, nb * LANES, 4).transpose(1, 0, 2)  # (nb·8, rows, 4)
    out = np.empty((rows, t), np.float32)
    step = max(1, LANE_ELEMS // (rows * nb * LANES))
    for t0 in range(0, t, step):
        t1 = min(t, t0 + step)
        qx = x.q[t0:t1].astype(np.float32).reshape(t1 - t0, nb * LANES, 4).transpose(1, 2, 0)  # (nb·8, 4, t)
        lanes = (qw @ qx).reshape(nb, LANES, rows, t1 - t0)  # exact int32 lane sums
        dd = (d_w[:, None, :] * x.d[None, t0:t1, :]).astype(np.float64)  # (rows, t, nb): f32 products
        acc = np.zeros((LANES, rows, t1 - t0), np.float32)
        for b in range(nb):
            acc = (dd[:, :, b] * lanes[b] + acc).astype(np.float32)  # _mm256_fmadd_ps
        r = acc[4:] + acc[:4]  # (4, rows, t)
        total = (r[0] + r[2]) + (r[1] + r[3])
        if m_w is not None:
            assert x.s is not None, "Q4_1/Q5_1 multiply Q8_1 activations"
            summs = np.zeros_like(total)
            for b in range(nb):
                summs = summs + m_w[:, None, b] * x.s[None, t0:t1, b]  # f32: the product of two f16 is exact
            total = total + summs
        out[:, t0:t1] = total
    return out
