"""Tensor element types as data: GGML type ids, block layouts, and apr's few extra (APR-only) types.

`QuantType` values are the GGML ids (gguf-py `GGMLQuantizationType`), so a GGUF tensor's type field maps 1:1.
APR's own quantizations (`APR_Q4`, `APR_Q8`) and `U8` have no GGML id; they get ids ≥ 128 that GGML
never uses. `QUANT_LAYOUT` gives, for every type, elements per block and bytes per block; byte sizes are
written as sums of their fields so they can be checked against the C structs by eye.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum
from typing import Final

QK_K: Final = 256  # elements per K-quant super-block
K_SCALE_SIZE: Final = 12


class QuantType(IntEnum):
    F32 = 0
    F16 = 1
    Q4_0 = 2
    Q4_1 = 3
    Q5_0 = 6
    Q5_1 = 7
    Q8_0 = 8
    Q8_1 = 9
    Q2_K = 10
    Q3_K = 11
    Q4_K = 12
    Q5_K = 13
    Q6_K = 14
    Q8_K = 15
    # more GGML ids, so every GGUF tensor type has a member (formats/gguf_parse.py sizes those
    # missing from QUANT_LAYOUT; a type without a dequantizer raises UnsupportedQuantError on read)
    IQ2_XXS = 16
    IQ2_XS = 17
    IQ3_XXS = 18
    IQ1_S = 19
    IQ4_NL = 20
    IQ3_S = 21
    IQ2_S = 22
    IQ4_XS = 23
    I8 = 24
    I16 = 25
    I32 = 26
    I64 = 27
    F64 = 28
    IQ1_M = 29
    BF16 = 30
    TQ1_0 = 34
    TQ2_0 = 35
    MXFP4 = 39
    NVFP4 = 40
    Q1_0 = 41
    # apr-only (no GGML id): see formats/apr.py
    APR_Q4 = 128
    APR_Q8 = 129
    U8 = 130


@dataclass(frozen=True, slots=True)
class BlockLayout:
    block_size: int  # elements per block
    type_size: int  # bytes per block

    def nbytes(self, n_elements: int) -> int:
        if n_elements % self.block_size:
            raise ValueError(f"{n_elements} elements is not a multiple of the block size {self.block_size}")
        return n_elements // self.block_size * self.type_size


QUANT_LAYOUT: Final[dict[QuantType, BlockLayout]] = {
    QuantType.F32: BlockLayout(1, 4),
    QuantType.F16: BlockLayout(1, 2),
    QuantType.BF16: BlockLayout(1, 2),
    QuantType.F64: BlockLayout(1, 8),
    QuantType.I8: BlockLayout(1, 1),
    QuantType.U8: BlockLayout(1, 1),
    QuantType.I16: BlockLayout(1, 2),
    QuantType.I32: BlockLayout(1, 4),
    QuantType.I64: BlockLayout(1, 8),
    QuantType.Q4_0: BlockLayout(32, 2 + 16),  # d:f16, qs[16]
    QuantType.Q4_1: BlockLayout(32, 2 + 2 + 16),  # d, m:f16, qs[16]
    QuantType.Q5_0: BlockLayout(32, 2 + 4 + 16),  # d:f16, qh[4], qs[16]
    QuantType.Q5_1: BlockLayout(32, 2 + 2 + 4 + 16),  # d, m:f16, qh[4], qs[16]
    QuantType.Q8_0: BlockLayout(32, 2 + 32),  # d:f16, qs[32] i8
    QuantType.Q2_K: BlockLayout(QK_K, QK_K // 16 + QK_K // 4 + 2 + 2),  # scales, qs, d, dmin = 84
    QuantType.Q3_K: BlockLayout(QK_K, QK_K // 8 + QK_K // 4 + 12 + 2),  # hmask, qs, scales, d = 110
    QuantType.Q4_K: BlockLayout(QK_K, 2 + 2 + K_SCALE_SIZE + QK_K // 2),  # d, dmin, scales, qs = 144
    QuantType.Q5_K: BlockLayout(QK_K, 2 + 2 + K_SCALE_SIZE + QK_K // 8 + QK_K // 2),  # +qh = 176
    QuantType.Q6_K: BlockLayout(QK_K, QK_K // 2 + QK_K // 4 + QK_K // 16 + 2),  # ql, qh, sc, d = 210
    QuantType.Q8_K: BlockLayout(QK_K, 4 + QK_K + QK_K // 16 * 2),  # d:f32, qs, bsums[16] i16 = 292
    QuantType.IQ2_XXS: BlockLayout(QK_K, 2 + QK_K // 4),  # d, qs: u16[QK_K/8] = 66
    QuantType.IQ2_XS: BlockLayout(QK_K, 2 + QK_K // 4 + QK_K // 32),  # d, qs, scales = 74
    QuantType.IQ2_S: BlockLayout(QK_K, 2 + QK_K // 4 + QK_K // 32 + QK_K // 32),  # d, qs+signs, qh, sc = 82
    QuantType.IQ3_XXS: BlockLayout(QK_K, 2 + 3 * QK_K // 8),  # d, qs[64] + scales_and_signs u32[8] = 98
    QuantType.IQ3_S: BlockLayout(QK_K, 2 + QK_K // 4 + QK_K // 32 + QK_K // 8 + 4),  # d, qs, qh, signs, sc
    QuantType.IQ1_S: BlockLayout(QK_K, 2 + QK_K // 8 + QK_K // 16),  # d, qs, qh: u16[QK_K/32] = 50
    QuantType.IQ1_M: BlockLayout(QK_K, QK_K // 8 + QK_K // 16 + QK_K // 32),  # qs, qh, scales = 56
    QuantType.IQ4_NL: BlockLayout(32, 2 + 16),  # d, qs[16]
    QuantType.IQ4_XS: BlockLayout(QK_K, 2 + 2 + QK_K // 64 + QK_K // 2),  # d, scales_h, _l, qs = 136
    QuantType.TQ1_0: BlockLayout(QK_K, (QK_K - 4 * QK_K // 64) // 5 + QK_K // 64 + 2),  # qs, qh, d = 54
    QuantType.TQ2_0: BlockLayout(QK_K, QK_K // 4 + 2),  # qs, d = 66
    QuantType.MXFP4: BlockLayout(32, 1 + 16),  # e: e8m0, qs[16]
    QuantType.NVFP4: BlockLayout(64, 64 // 16 + 64 // 2),  # scales: ue4m3 per 16, qs = 36
    QuantType.APR_Q4: BlockLayout(32, 2 + 16),  # scale:f16, 16 bytes of nibbles (q = nibble - 8)
}
# APR_Q8 is one f32 scale for the whole tensor + N int8: not a block layout (formats/apr.py sizes it).

FIRST_APR_ID: Final = 128  # apr-only types take ids >= 128, which GGML never uses

# GGML types QUANT_LAYOUT does not size (ggml.c type_traits); tests check them against gguf-py
GGML_EXTRA_LAYOUT: Final[dict[QuantType, BlockLayout]] = {
    QuantType.Q8_1: BlockLayout(32, 2 + 2 + 32),  # d, s: f16, qs[32] (gguf-py 0.19 still says 40)
    QuantType.Q1_0: BlockLayout(128, 2 + 128 // 8),  # d, qs = 18
}
GGML_LAYOUT: Final[dict[QuantType, BlockLayout]] = {
    **{q: lay for q, lay in QUANT_LAYOUT.items() if q < FIRST_APR_ID},
    **GGML_EXTRA_LAYOUT,
}


def tensor_nbytes(qtype: QuantType, n_elements: int) -> int:
    """Bytes of a tensor of `n_elements` elements; raises ValueError on a partial block."""
    if qtype == QuantType.APR_Q8:
        return 4 + n_elements
    return QUANT_LAYOUT[qtype].nbytes(n_elements)
