"""4-bit codebook dequantizers: IQ4_NL, IQ4_XS, MXFP4, NVFP4 (ggml-common.h blocks).

Every weight is a 4-bit code naming one of 16 levels, times a float32 scale per 16 or 32 weights:
IQ4_NL/IQ4_XS use ggml's non-linear `kvalues_iq4nl`, MXFP4/NVFP4 the E2M1 values doubled
(`kvalues_mxfp4`; their scales are halved to match). A run of 2k weights sits in k bytes, the first k
in the low nibbles and the next k in the high ones, as in Q4_0.

A kernel works on byte *pairs*: the low nibbles of bytes j, j+1 are the adjacent weights j, j+1, and
their high nibbles weights k+j, k+j+1. So it forms, with a few flat u16 ops on a contiguous copy of the
codes, one 8-bit index per output pair (two nibbles), copies them into an int64 index in output order,
gathers float32 level pairs from a 256-row table straight into the output (`gather`) and multiplies by
the scales (`scale_groups`): `scale * float(level)`, bit for bit as ggml and gguf-py.
"""

from __future__ import annotations

from typing import Final

import numpy as np
import numpy.typing as npt

from apr.quant.blocks import F32Array, U8Array, block_kernel, f16_at, gather, readonly, scale_groups
from apr.quant.types import QuantType

# An int64 index per output pair (4 bytes an output: 1 MiB here). Smaller chunks were tried: at 1 << 16
# the dozen small numpy calls per chunk, each holding the GIL for its Python overhead, kept two
# threads from beating one (IQ4_XS 305 vs 343 MB/s; at 1 << 18, 685 vs 415).
CHUNK_ELEMS: Final = 1 << 18
KVALUES_IQ4NL: Final = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)
KVALUES_MXFP4: Final = (0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12)  # E2M1 × 2
_NIBBLE_SHIFTS: Final = np.array([0, 4], np.uint8)
_PAIR_SHIFTS: Final = np.arange(0, 16, 2, dtype=np.uint16)  # IQ4_XS: 2 high scale bits each in a u16


def level_pairs(values: tuple[int, ...]) -> F32Array:
    """(256, 2) float32: row `a | b << 4` holds the levels of codes a and b."""
    i = np.arange(256)
    levels = np.array(values, np.float32)
    return readonly(np.stack([levels[i & 0x0F], levels[i >> 4]], axis=1))


def e8m0_half(e: U8Array) -> F32Array:
    """ggml's `GGML_E8M0_TO_FP32_HALF`: the E8M0 scale 2**(e - 127), halved; exact in float32 (the two
    smallest are subnormal)."""
    return np.ldexp(np.float32(1.0), e.astype(np.int32) - 128).astype(np.float32)


def ue4m3_half(x: U8Array) -> F32Array:
    """ggml's `ggml_ue4m3_to_fp32` halved: unsigned E4M3 (bias 7, bit 7 ignored) / 2, where 0x7F (the
    NaN code) reads as 0. Exact in float32."""
    exp = ((x >> np.uint8(3)) & np.uint8(0x0F)).astype(np.int32)
    man = (x & np.uint8(7)).astype(np.int32)
    normal = np.ldexp((8 + man).astype(np.float32), exp - 11)  # (1 + m/8)·2**(e-7) / 2
    value = np.where(exp == 0, np.ldexp(man.astype(np.float32), -10), normal)  # m·2**-9 / 2
    return np.where(x == 0x7F, np.float32(0.0), value).astype(np.float32)


IQ4NL_PAIRS: Final = level_pairs(KVALUES_IQ4NL)
MXFP4_PAIRS: Final = level_pairs(KVALUES_MXFP4)
E8M0_HALF: Final = readonly(e8m0_half(np.arange(256, dtype=np.uint8)))  # by scale byte
UE4M3_HALF: Final = readonly(ue4m3_half(np.arange(256, dtype=np.uint8)))


def decode_codes(qs: U8Array, pairs: F32Array, scale: F32Array, out: F32Array) -> None:
    """`out` = `scale` × the levels coded by `qs` (n, g, k): g runs of 2k weights, one scale each."""
    w = np.ascontiguousarray(qs).view("<u2")  # (n, g, k/2): bytes j, j+1 of a run
    t = w >> np.uint16(4)
    index = np.empty((*w.shape[:2], 2, w.shape[2]), np.intp)  # the flat ops above, plain copies here
    index[:, :, 0] = (w & np.uint16(0x0F)) | (t & np.uint16(0xF0))  # low nibbles: weights j, j+1
    index[:, :, 1] = (t & np.uint16(0x0F)) | ((w >> np.uint16(8)) & np.uint16(0xF0))  # k+j, k+j+1
    gather(pairs, index, out)
    scale_groups(out, scale)


def _bytes(b: U8Array, start: int, stop: int, runs: int) -> U8Array:
    return b[:, start:stop].reshape(len(b), runs, -1)


@block_kernel(QuantType.IQ4_NL, chunk_elems=CHUNK_ELEMS)
def _iq4_nl(b: U8Array, out: F32Array) -> None:  # d, qs[16]
    decode_codes(_bytes(b, 2, 18, 1), IQ4NL_PAIRS, f16_at(b, 0), out)


def _iq4_xs_scales(b: U8Array) -> npt.NDArray[np.int8]:
    """The 8 six-bit sub-block scales - 32: low 4 bits from scales_l nibbles, high 2 from scales_h."""
    low = (b[:, 4:8, None] >> _NIBBLE_SHIFTS) & np.uint8(0x0F)  # (n, 4, 2)
    high = np.ascontiguousarray(b[:, 2:4]).view("<u2")  # (n, 1)
    high = (high >> _PAIR_SHIFTS) & np.uint16(3)  # (n, 8)
    ls = low.reshape(len(b), 8) | (high.astype(np.uint8) << np.uint8(4))
    return (ls - np.uint8(32)).view(np.int8)


@block_kernel(QuantType.IQ4_XS, chunk_elems=CHUNK_ELEMS)
def _iq4_xs(b: U8Array, out: F32Array) -> None:  # d, scales_h: u16, scales_l[4], qs[128]
    dl = f16_at(b, 0) * _iq4_xs_scales(b).astype(np.float32)
    decode_codes(_bytes(b, 8, 136, 8), IQ4NL_PAIRS, dl, out)


@block_kernel(QuantType.MXFP4, chunk_elems=CHUNK_ELEMS)
def _mxfp4(b: U8Array, out: F32Array) -> None:  # e: e8m0, qs[16]
    decode_codes(_bytes(b, 1, 17, 1), MXFP4_PAIRS, E8M0_HALF[b[:, :1]], out)


@block_kernel(QuantType.NVFP4, chunk_elems=CHUNK_ELEMS)
def _nvfp4(b: U8Array, out: F32Array) -> None:  # d[4]: ue4m3, one per 16; qs[32]
    decode_codes(_bytes(b, 4, 36, 4), MXFP4_PAIRS, UE4M3_HALF[b[:, :4]], out)
