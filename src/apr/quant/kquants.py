"""K-quant dequantizers: Q2_K, Q3_K, Q4_K, Q5_K, Q6_K (256-element super-blocks, ggml-common.h).

Each kernel is a `scaled_kernel`: the sub-block scales `d * sc` (and mins `dmin * m`) are computed
for 16 chunks at a time, before the kernels run (`_q*k_scales`). A kernel rebuilds the integer quants
of a chunk of super-blocks, converts them into `out` and scales them exactly as ggml's
`dequantize_row_*_K`. Q2_K and Q4_K convert their bit planes (flat uint8 passes over the chunk)
straight into `out`, 32 outputs per row; Q3_K, Q5_K and Q6_K, whose quants combine two fields, build
them as one contiguous uint8 array first, with the SWAR plans below.

The bit unpacking is SWAR on little-endian u64 words: a word carries 8 quant bytes, and all 8 share the
byte they come from (plus 0..7) and the shift that extracts them. So a quant field is described by a
*plan*, built once from a `source(e) -> (byte offset in the block, right shift)` rule: which block word
feeds each of the 32 output words, and by how much to shift it. Unpacking is then `np.take` of the
words in output order, one shift by the per-word amounts, one mask: a handful of numpy calls per chunk
whose inner loops run over whole blocks (32 words), not over 4-byte slivers of them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

import numpy as np
import numpy.typing as npt

from apr.quant.blocks import (
    F32Array,
    Scales,
    U8Array,
    apply_groups,
    f16_times,
    nibble_planes,
    scale_groups,
    scale_ints,
    scaled_kernel,
)
from apr.quant.types import QK_K, QuantType

U64Array = npt.NDArray[np.uint64]
U32Array = npt.NDArray[np.uint32]


@dataclass(frozen=True)
class Plan:
    """How to gather one bit field of every output quant from a block's u64 words."""

    words: npt.NDArray[np.intp]  # (32,) source word of each output word
    shifts: U64Array  # (32,) right shift of each
    mask: np.uint64  # the field's bits, repeated in all 8 bytes


def plan(source: Callable[[int], tuple[int, int]], bits: int) -> Plan:
    """The plan of a `bits`-wide field whose element e (0..255) is `byte >> shift` of the block."""
    words, shifts = [], []
    for w in range(QK_K // 8):
        byte, shift = source(8 * w)
        assert byte % 8 == 0 and all(source(8 * w + i) == (byte + i, shift) for i in range(8))
        words.append(byte // 8)
        shifts.append(shift)
    mask = ((1 << bits) - 1) * 0x0101010101010101
    return Plan(np.array(words, np.intp), np.array(shifts, np.uint64), np.uint64(mask))


def unpack(words: U64Array, field: Plan) -> U64Array:
    """The field of all 256 quants of each block, as (n, 32) words in output order."""
    out = np.take(words, field.words, axis=1)
    out >>= field.shifts
    out &= field.mask
    return out


def block_words(blocks: U8Array, stop: int) -> U64Array:
    """Bytes [0, stop) of every block as (n, stop // 8) little-endian u64 words."""
    if blocks.shape[1] % 8 == 0 and blocks.flags.c_contiguous:
        return blocks.view("<u8")  # zero-copy: the block size is a whole number of words
    return np.ascontiguousarray(blocks[:, :stop]).view("<u8")


# Element e of a super-block: sub-block / chunk / bit position, per ggml's dequantize_row_*_K loops.
Q3K_LOW: Final = plan(lambda e: (32 + 32 * (e // 128) + e % 32, 2 * (e // 32 % 4)), 2)
Q3K_HIGH: Final = plan(lambda e: (e % 32, e // 32), 1)  # hmask bit e // 32 of byte e % 32
Q4K_LOW: Final = plan(lambda e: (16 + 32 * (e // 64) + e % 32, 4 * (e // 32 % 2)), 4)
Q5K_LOW: Final = plan(lambda e: (48 + 32 * (e // 64) + e % 32, 4 * (e // 32 % 2)), 4)
Q5K_HIGH: Final = plan(lambda e: (16 + e % 32, e // 32), 1)  # qh bit e // 32 of byte e % 32
Q6K_LOW: Final = plan(lambda e: (64 * (e // 128) + 32 * (e // 32 % 2) + e % 32, 4 * (e // 64 % 2)), 4)
Q6K_HIGH: Final = plan(lambda e: (128 + 32 * (e // 128) + e % 32, 2 * (e // 32 % 4)), 2)


def _bytes32(mask: int) -> np.uint32:
    return np.uint32(mask * 0x01010101)


def _words32(blocks: U8Array, start: int, stop: int) -> U32Array:
    return np.ascontiguousarray(blocks[:, start:stop]).view("<u4")


def _scale_min_k4(blocks: U8Array) -> tuple[U8Array, U8Array]:
    """The 8 six-bit scales and mins packed in bytes 4..16 of Q4_K/Q5_K (`get_scale_min_k4`)."""
    s = _words32(blocks, 4, 16)
    s0, s1, s2 = s[:, 0], s[:, 1], s[:, 2]
    sc = np.empty((len(s), 2), np.uint32)
    mn = np.empty((len(s), 2), np.uint32)
    m_3f, m_30 = _bytes32(0x3F), _bytes32(0x30)
    np.bitwise_and(s0, m_3f, out=sc[:, 0])
    np.bitwise_and(s1, m_3f, out=mn[:, 0])
    sc[:, 1] = (s2 & _bytes32(0x0F)) | ((s0 >> np.uint32(2)) & m_30)
    mn[:, 1] = ((s2 >> np.uint32(4)) & _bytes32(0x0F)) | ((s1 >> np.uint32(2)) & m_30)
    return sc.view(np.uint8), mn.view(np.uint8)


def _q3_scales(blocks: U8Array) -> npt.NDArray[np.int8]:
    """The 16 six-bit signed scales packed in bytes 96..108 of Q3_K, minus 32."""
    s = _words32(blocks, 96, 108)
    lo0, lo1, hi = s[:, 0], s[:, 1], s[:, 2]
    m_0f, m_30 = _bytes32(0x0F), _bytes32(0x30)
    sc = np.empty((len(s), 4), np.uint32)
    sc[:, 0] = (lo0 & m_0f) | ((hi << np.uint32(4)) & m_30)
    sc[:, 1] = (lo1 & m_0f) | ((hi << np.uint32(2)) & m_30)
    sc[:, 2] = ((lo0 >> np.uint32(4)) & m_0f) | (hi & m_30)
    sc[:, 3] = ((lo1 >> np.uint32(4)) & m_0f) | ((hi >> np.uint32(2)) & m_30)
    scales = sc.view(np.uint8)
    scales -= np.uint8(32)
    return scales.view(np.int8)


def _biased(q: U64Array, bias: int) -> npt.NDArray[np.int8]:
    """Quant bytes minus `bias`, as int8 (q - 32 for Q6_K, q - 4 for Q3_K)."""
    q8 = q.view(np.uint8)
    q8 -= np.uint8(bias)
    return q8.view(np.int8)


# Per-super-block scales of the whole tensor, computed once before the chunk loop (`scaled_kernel`).


def _q2k_scales(b: U8Array) -> Scales:  # dl = d * (sc & 0xF), ml = dmin * (sc >> 4)
    sc = np.ascontiguousarray(b[:, :16])
    return f16_times(b, 80, sc & np.uint8(0x0F)), f16_times(b, 82, sc >> np.uint8(4))


def _q3k_scales(b: U8Array) -> Scales:  # dl = d * (scale - 32)
    return (f16_times(b, 108, _q3_scales(b)),)


def _k4_scales(b: U8Array) -> Scales:  # Q4_K, Q5_K: d * sc, dmin * m
    sc, mn = _scale_min_k4(b)
    return f16_times(b, 0, sc), f16_times(b, 2, mn)


def _q6k_scales(b: U8Array) -> Scales:  # d * sc
    return (f16_times(b, 208, b[:, 192:208].view(np.int8)),)


@scaled_kernel(QuantType.Q2_K, _q2k_scales)
def _q2_k(b: U8Array, out: F32Array, scales: Scales) -> None:  # scales[16], qs[64], d, dmin
    # Element 128h + 32k + l is bits 2k..2k+1 of qs byte 32h + l: each bit pair's plane is two flat
    # uint8 passes over the chunk, converted straight into `out` 32 elements at a time.
    groups = out.reshape(len(b), 2, 4, 32)
    for k in range(4):
        plane = b >> np.uint8(2 * k) if k else b.copy()
        plane &= np.uint8(3)
        np.copyto(groups[:, :, k], plane[:, 16:80].reshape(-1, 2, 32), casting="unsafe")
    scale_groups(out, scales[0])
    apply_groups(np.subtract, out, scales[1])


@scaled_kernel(QuantType.Q3_K, _q3k_scales)
def _q3_k(b: U8Array, out: F32Array, scales: Scales) -> None:  # hmask[32], qs[64], scales[12], d
    words = block_words(b, 96)
    q = unpack(words, Q3K_LOW)
    q |= unpack(words, Q3K_HIGH) << np.uint64(2)  # q = low 2 bits - (high bit ? 0 : 4)
    scale_ints(_biased(q, 4), scales[0], out)


@scaled_kernel(QuantType.Q4_K, _k4_scales)
def _q4_k(b: U8Array, out: F32Array, scales: Scales) -> None:  # d, dmin, scales[12], qs[128]
    # Element 64j + 32h + l is nibble h of qs byte 32j + l: convert both nibble planes straight into
    # `out`, 32 elements at a time (no uint8 copy in output order first).
    lo, hi = nibble_planes(b)
    groups = out.reshape(len(b), 4, 2, 32)
    np.copyto(groups[:, :, 0], lo[:, 16:].reshape(-1, 4, 32), casting="unsafe")
    np.copyto(groups[:, :, 1], hi[:, 16:].reshape(-1, 4, 32), casting="unsafe")
    scale_groups(out, scales[0])
    apply_groups(np.subtract, out, scales[1])


@scaled_kernel(QuantType.Q5_K, _k4_scales)
def _q5_k(b: U8Array, out: F32Array, scales: Scales) -> None:  # d, dmin, scales[12], qh[32], qs[128]
    words = block_words(b, 176)
    q = unpack(words, Q5K_LOW)
    q |= unpack(words, Q5K_HIGH) << np.uint64(4)
    scale_ints(q.view(np.uint8), scales[0], out, scales[1])


@scaled_kernel(QuantType.Q6_K, _q6k_scales)
def _q6_k(b: U8Array, out: F32Array, scales: Scales) -> None:  # ql[128], qh[64], scales[16]:i8, d
    words = block_words(b, 192)
    q = unpack(words, Q6K_LOW)
    q |= unpack(words, Q6K_HIGH) << np.uint64(4)
    scale_ints(_biased(q, 32), scales[0], out)
