"""Dequantizer registry, shared kernels, plain element types and the 32-element block types.

Every dequantizer turns the flat stored bytes of a tensor into a flat float32 array and registers itself
in `DEQUANTIZERS` under its `QuantType`; `apr.quant.dequantize` is a dict lookup. Block types register a
*kernel* instead: `kernel(blocks, out)` gets `blocks` as a `(n_blocks, type_size)` uint8 view and fills
`out`, a `(n_blocks, block_size)` float32 view. The driver feeds it chunks of about `CHUNK_ELEMS` outputs
so a kernel's temporaries stay in cache; all the numpy work is vectorized over the blocks of a chunk.

Results are bit-identical to ggml's `dequantize_row_*` and gguf-py's `dequantize`: integer quants are
rebuilt exactly in uint8, converted to float32 (exact), and then scaled with the same float32 operations
in the same order as ggml (`(d * sc) * q - (dmin * m)`, never a fused or re-associated form), so every
rounding, signed zero and NaN payload comes out the same.

APR_Q4 (aprender's `add_q4_tensor` / `dequantize_q4`, spec §7.5): blocks of 32 run across the flattened
tensor (the last block zero-padded); each block is an f16 scale and 16 bytes of nibbles, element `2k` in
the low nibble of byte `k` and `2k+1` in the high nibble — interleaved, unlike Q4_0. `value = (nibble - 8)
* scale`, and, as in aprender (GH-186), a NaN, infinite or subnormal (< 6.1e-5) scale reads as 0.
APR_Q8: one f32 scale for the whole tensor, then one int8 per element; `value = q * scale`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import cache, partial
from typing import Any, Final, TypeVar

import numpy as np
import numpy.typing as npt

from apr.quant.types import QUANT_LAYOUT, QuantType, tensor_nbytes

U8Array = npt.NDArray[np.uint8]
F32Array = npt.NDArray[np.float32]
Decode = Callable[[U8Array, int], F32Array]  # (flat stored bytes, element count) -> flat float32
Kernel = Callable[[U8Array, F32Array], None]  # ((n, type_size) blocks, (n, block_size) out) -> None
Table = TypeVar("Table", bound=np.ndarray[Any, Any])

CHUNK_ELEMS: Final = 1 << 19  # outputs per kernel call: 2 MiB of float32 (1 << 16 was 30 % slower on 7B)
F16_STEP: Final = 1 << 16  # halves per F16 table gather (its int64 index copy stays in cache)
APR_Q4_MIN_SCALE: Final = np.float32(6.1e-5)  # aprender's F16_MIN_NORMAL (GH-186), not 2**-14


@dataclass(frozen=True, slots=True)
class Dequantizer:
    """How one type's stored bytes become float32."""

    qtype: QuantType
    decode: Decode
    nbytes: Callable[[int], int]  # stored bytes of a tensor of n elements
    row_multiple: int  # a row (the last axis) must hold a whole number of these elements


DEQUANTIZERS: Final[dict[QuantType, Dequantizer]] = {}


def register(
    qtype: QuantType, row_multiple: int = 1, nbytes: Callable[[int], int] | None = None
) -> Callable[[Decode], Decode]:
    """Register `decode` as the dequantizer of `qtype` (sizes from `tensor_nbytes` by default)."""

    def add(decode: Decode) -> Decode:
        assert qtype not in DEQUANTIZERS, qtype
        size = nbytes or partial(tensor_nbytes, qtype)
        DEQUANTIZERS[qtype] = Dequantizer(qtype, decode, size, row_multiple)
        return decode

    return add


def block_kernel(
    qtype: QuantType, spans_rows: bool = False, chunk_elems: int = CHUNK_ELEMS
) -> Callable[[Kernel], Kernel]:
    """Register a per-block kernel for `qtype`, driven chunk by chunk over the whole tensor.

    Rows are whole blocks, unless `spans_rows`: then blocks run across the flattened tensor and the
    last one is zero-padded (APR_Q4). Kernels with an int64 temporary per output (the table-gather
    types) take smaller chunks, `chunk_elems`, so that it too stays in cache.
    """
    layout = QUANT_LAYOUT[qtype]

    def add(kernel: Kernel) -> Kernel:
        def decode(raw: U8Array, n: int) -> F32Array:
            blocks = raw.reshape(-1, layout.type_size)
            out = np.empty((len(blocks), layout.block_size), np.float32)
            step = max(1, chunk_elems // layout.block_size)
            with np.errstate(all="ignore"):  # inf * 0 etc. are part of the format's arithmetic
                for i in range(0, len(blocks), step):
                    kernel(blocks[i : i + step], out[i : i + step])
            return out.reshape(-1)[:n]

        def padded_nbytes(n: int) -> int:
            return -(-n // layout.block_size) * layout.type_size

        if spans_rows:
            register(qtype, 1, padded_nbytes)(decode)
        else:
            register(qtype, layout.block_size)(decode)
        return kernel

    return add


# --- shared pieces of the kernels ------------------------------------------------------------------


def f16_at(blocks: U8Array, offset: int) -> F32Array:
    """The little-endian f16 field at byte `offset` of every block, as float32 of shape (n, 1)."""
    return blocks[:, offset : offset + 2].view("<f2").astype(np.float32)


def scale_ints(
    q: npt.NDArray[np.integer], scale: F32Array, out: F32Array, offset: F32Array | None = None
) -> None:
    """`out = scale * q` (`- offset`), groups of `q.shape[1] // scale.shape[1]` elements per scale.

    The scales are repeated out to one per element first: a broadcast (n·groups, 1) operand would make
    numpy run its inner loop 16 or 32 elements at a time, ~3× slower than these flat passes.
    """
    np.copyto(out, q.reshape(out.shape), casting="unsafe")  # ints -> float32, exact
    scale_groups(out, scale)
    if offset is not None:
        size = out.shape[1] // offset.shape[1]
        flat = out.reshape(-1)
        np.subtract(flat, np.repeat(offset.reshape(-1), size), out=flat)


def scale_groups(out: F32Array, scale: F32Array) -> None:
    """`out *= scale`: `out` a contiguous (n, block_size) chunk, `scale` (n, g), each scale over its
    `block_size // g` consecutive elements. (Only the scale can be NaN, so operand order is moot.)"""
    flat = out.reshape(-1)
    np.multiply(flat, np.repeat(scale.reshape(-1), out.shape[1] // scale.shape[1]), out=flat)


def readonly(table: Table) -> Table:
    """`table`, made read-only: the lookup tables are shared by every call (and thread)."""
    table.flags.writeable = False
    return table


def gather(table: F32Array, index: npt.NDArray[np.intp], out: F32Array) -> None:
    """`out` = the rows `table[index]` back to back: `table` (entries, w), `index` (n, k), `out` a
    contiguous (n, k·w) chunk.

    `mode="clip"` changes nothing (indices are in range by construction); it only spares numpy's
    per-index bounds check, which makes the gather 2-3× slower.
    """
    rows = out.reshape(-1, table.shape[1])
    np.take(table, index.reshape(-1), axis=0, out=rows, mode="clip")


def add_offset(out: F32Array, offset: F32Array) -> None:
    """`out += offset`, one offset per block (Q4_1, Q5_1: `d * q + m`)."""
    np.add(out, offset, out=out)


def split_nibbles(qs: U8Array, q: U8Array) -> None:
    """Q4_0 order: low nibbles of `qs` (n, k) into `q[:, :k]`, high nibbles into `q[:, k:]`."""
    k = qs.shape[1]
    np.bitwise_and(qs, np.uint8(0x0F), out=q[:, :k])
    np.right_shift(qs, np.uint8(4), out=q[:, k:])


def low_bits_32(qh: U8Array) -> U8Array:
    """Bit j of the little-endian u32 in each row of `qh` (n, 4), as (n, 32) zeros and ones."""
    return np.unpackbits(qh, axis=1, bitorder="little")


# --- plain element types ---------------------------------------------------------------------------


def _element(qtype: QuantType, dtype: str) -> None:
    def decode(raw: U8Array, n: int) -> F32Array:
        with np.errstate(over="ignore"):  # F64 beyond float32's range becomes ±inf, as in numpy
            return raw.view(dtype).astype(np.float32)

    register(qtype)(decode)


for _qtype, _dtype in (
    (QuantType.F64, "<f8"),
    (QuantType.I8, "i1"),
    (QuantType.U8, "u1"),
    (QuantType.I16, "<i2"),
    (QuantType.I32, "<i4"),
    (QuantType.I64, "<i8"),
):
    _element(_qtype, _dtype)


@register(QuantType.F16)
def _f16(raw: U8Array, n: int) -> F32Array:
    """A gather from a table of all 65536 halves: ~1.2× numpy's cast loop, and bit-identical to it."""
    half, out, table = raw.view("<u2"), np.empty(n, np.float32), _f16_table()
    step = F16_STEP
    for i in range(0, n, step):
        np.take(table, half[i : i + step], out=out[i : i + step], mode="clip")
    return out


@cache
def _f16_table() -> F32Array:
    """Every f16 bit pattern as float32, by numpy's own cast (what gguf-py runs; NaN payloads kept)."""
    every = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
    return readonly(every.view("<f2").astype(np.float32))


@register(QuantType.F32)
def _f32(raw: U8Array, n: int) -> F32Array:
    """Zero-copy: a view of `raw` (read-only when `raw` is, e.g. a read-only memmap)."""
    return raw.view("<f4").view(np.float32)


@register(QuantType.BF16)
def _bf16(raw: U8Array, n: int) -> F32Array:
    out = np.zeros((n, 2), np.uint16)  # little-endian f32: the bf16 bits are the high half
    out[:, 1] = raw.view("<u2")
    return out.view(np.float32).reshape(-1)


# --- 32-element blocks -----------------------------------------------------------------------------


@block_kernel(QuantType.Q8_0)
def _q8_0(b: U8Array, out: F32Array) -> None:  # d:f16, qs[32]:i8
    scale_ints(b[:, 2:].view(np.int8), f16_at(b, 0), out)


@block_kernel(QuantType.Q4_0)
def _q4_0(b: U8Array, out: F32Array) -> None:  # d:f16, qs[16]; q = nibble - 8
    q = np.empty(out.shape, np.uint8)
    split_nibbles(b[:, 2:], q)
    q -= np.uint8(8)
    scale_ints(q.view(np.int8), f16_at(b, 0), out)


@block_kernel(QuantType.Q4_1)
def _q4_1(b: U8Array, out: F32Array) -> None:  # d, m:f16, qs[16]; d * q + m
    q = np.empty(out.shape, np.uint8)
    split_nibbles(b[:, 4:], q)
    scale_ints(q, f16_at(b, 0), out)
    add_offset(out, f16_at(b, 2))


def _five_bit(qh: U8Array, qs: U8Array, shape: tuple[int, ...]) -> U8Array:
    """Q5_0/Q5_1 quants 0..31: nibbles as in Q4_0, bit 4 of element j = bit j of the u32 `qh`."""
    q = np.empty(shape, np.uint8)
    split_nibbles(qs, q)
    q |= low_bits_32(qh) << np.uint8(4)
    return q


@block_kernel(QuantType.Q5_0)
def _q5_0(b: U8Array, out: F32Array) -> None:  # d:f16, qh[4], qs[16]; q = 5 bits - 16
    q = _five_bit(b[:, 2:6], b[:, 6:], out.shape)
    q -= np.uint8(16)
    scale_ints(q.view(np.int8), f16_at(b, 0), out)


@block_kernel(QuantType.Q5_1)
def _q5_1(b: U8Array, out: F32Array) -> None:  # d, m:f16, qh[4], qs[16]; d * q + m
    scale_ints(_five_bit(b[:, 4:8], b[:, 8:], out.shape), f16_at(b, 0), out)
    add_offset(out, f16_at(b, 2))


# --- apr's own types -------------------------------------------------------------------------------


@block_kernel(QuantType.APR_Q4, spans_rows=True)
def _apr_q4(b: U8Array, out: F32Array) -> None:  # scale:f16, 16 bytes; element 2k low nibble of k
    scale = f16_at(b, 0)
    scale[~(np.abs(scale) >= APR_Q4_MIN_SCALE) | np.isinf(scale)] = 0.0  # GH-186 (NaN fails >=)
    q = np.empty((len(b), 16, 2), np.uint8)
    np.bitwise_and(b[:, 2:], np.uint8(0x0F), out=q[:, :, 0])
    np.right_shift(b[:, 2:], np.uint8(4), out=q[:, :, 1])
    q -= np.uint8(8)
    scale_ints(q.view(np.int8).reshape(-1, 32), scale, out)


@register(QuantType.APR_Q8)
def _apr_q8(raw: U8Array, n: int) -> F32Array:
    scale = raw[:4].view("<f4")[0]
    out = raw[4:].view(np.int8).astype(np.float32)
    with np.errstate(all="ignore"):
        out *= scale
    return out
