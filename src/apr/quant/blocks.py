"""Dequantizer registry, shared kernels, plain element types and the 32-element block types.

Every dequantizer turns the flat stored bytes of a tensor into a flat float32 array and registers itself
in `DEQUANTIZERS` under its `QuantType`; `apr.quant.dequantize` is a dict lookup. Block types register a
*kernel* instead: `kernel(blocks, out)` gets `blocks` as a `(n_blocks, type_size)` uint8 view and fills
`out`, a `(n_blocks, block_size)` float32 view. The driver feeds it chunks of about `CHUNK_ELEMS` outputs
so a kernel's temporaries stay in cache; all the numpy work is vectorized over the blocks of a chunk.
The legacy and K-quant types register a `scaled_kernel`: a `prepare` step first computes the float32
scales of 16 chunks' blocks in a few flat passes, and the kernel (on 2**16-output chunks) only unpacks
the quants, converts them straight into `out` and applies the scales in place.

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

from apr.cpus import share
from apr.quant.types import QUANT_LAYOUT, QuantType, tensor_nbytes

U8Array = npt.NDArray[np.uint8]
F32Array = npt.NDArray[np.float32]
Decode = Callable[[U8Array, int, int], F32Array]  # (flat stored bytes, element count, threads) -> float32
PlainDecode = Callable[[U8Array, int], F32Array]  # a type decoded in one pass (no threads)
Kernel = Callable[[U8Array, F32Array], None]  # ((n, type_size) blocks, (n, block_size) out) -> None
Scales = tuple[F32Array, ...]  # per-block float32 arrays, first axis the block
Prepare = Callable[[U8Array], Scales]  # all (n, type_size) blocks of a tensor -> their scales
ScaledKernel = Callable[[U8Array, F32Array, Scales], None]  # (blocks, out, their scales) -> None
Table = TypeVar("Table", bound=np.ndarray[Any, Any])

CHUNK_ELEMS: Final = 1 << 19  # outputs per kernel call: 2 MiB of float32 (1 << 16 was 30 % slower on 7B)
# Outputs per call of a `scaled_kernel`. One thread alone is fastest at 1 << 16 (bench/dequant.py, Q4_K
# 2.95× gguf-py, against 2.3× at 1 << 18), but the engine dequantizes on two threads at once, and there the
# numpy calls of small chunks queue for the GIL: two threads at 1 << 16 made less than one (Q4_K 1.72 ns
# an element, 1.20 alone) and the 7B-shaped 10-token trace 15.2-15.7 s, against 13.5-13.9 s at 1 << 18.
SCALED_CHUNK_ELEMS: Final = 1 << 18
PREPARE_CHUNKS: Final = 16  # chunks per `prepare` call: its scales are still in cache when used
F16_STEP: Final = 1 << 16  # halves per F16 table gather (its int64 index copy stays in cache)
APR_Q4_MIN_SCALE: Final = np.float32(6.1e-5)  # aprender's F16_MIN_NORMAL (GH-186), not 2**-14
# A block type's decode shares its blocks among `threads` threads only when each gets at least this
# many outputs (handing a smaller range to a thread costs more than it saves).
THREAD_MIN_ELEMS: Final = 1 << 19


@dataclass(frozen=True, slots=True)
class Dequantizer:
    """How one type's stored bytes become float32."""

    qtype: QuantType
    decode: Decode
    nbytes: Callable[[int], int]  # stored bytes of a tensor of n elements
    row_multiple: int  # a row (the last axis) must hold a whole number of these elements


DEQUANTIZERS: Final[dict[QuantType, Dequantizer]] = {}


def register(qtype: QuantType) -> Callable[[PlainDecode], PlainDecode]:
    """Register `decode(raw, n)` as the dequantizer of `qtype`, a type decoded in one pass (one thread)."""

    def add(decode: PlainDecode) -> PlainDecode:
        _add(qtype, lambda raw, n, threads: decode(raw, n), 1, None)
        return decode

    return add


def _add(qtype: QuantType, decode: Decode, row_multiple: int, nbytes: Callable[[int], int] | None) -> None:
    assert qtype not in DEQUANTIZERS, qtype
    size = nbytes or partial(tensor_nbytes, qtype)
    DEQUANTIZERS[qtype] = Dequantizer(qtype, decode, size, row_multiple)


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
        def decode(raw: U8Array, n: int, threads: int) -> F32Array:
            blocks = raw.reshape(-1, layout.type_size)
            out = np.empty((len(blocks), layout.block_size), np.float32)
            step = max(1, chunk_elems // layout.block_size)

            def run(start: int, stop: int) -> None:  # blocks [start, stop), chunk by chunk
                with np.errstate(all="ignore"):  # inf * 0 etc. are part of the format's arithmetic
                    for i in range(start, stop, step):
                        kernel(blocks[i : min(i + step, stop)], out[i : min(i + step, stop)])

            parts = max(1, min(threads, len(blocks) * layout.block_size // THREAD_MIN_ELEMS))
            share(len(blocks), parts, run)
            return out.reshape(-1)[:n]

        def padded_nbytes(n: int) -> int:
            return -(-n // layout.block_size) * layout.type_size

        if spans_rows:
            _add(qtype, decode, 1, padded_nbytes)
        else:
            _add(qtype, decode, layout.block_size, None)
        return kernel

    return add


def scaled_kernel(
    qtype: QuantType, prepare: Prepare, chunk_elems: int = SCALED_CHUNK_ELEMS
) -> Callable[[ScaledKernel], ScaledKernel]:
    """Register `kernel(blocks, out, scales)` for `qtype` (rows of whole blocks), driven chunk by chunk.

    `prepare(blocks)` computes the per-block float32 scales (and offsets) of `PREPARE_CHUNKS` chunks'
    blocks in a few flat vectorized passes, arrays whose first axis is the block, and the kernel gets
    each chunk's slice of them. This spares the kernel a dozen numpy calls on tiny (n, 8) arrays per
    chunk, which lets it take small, cache-resident chunks; and the scales are still in cache when the
    kernels read them (computing them for the whole tensor at once made Q4_K ~20 % slower).
    """
    step = max(1, chunk_elems // QUANT_LAYOUT[qtype].block_size)

    def add(kernel: ScaledKernel) -> ScaledKernel:
        def group(part: U8Array, out: F32Array) -> None:  # PREPARE_CHUNKS chunks: scales, then kernels
            scales = prepare(part)
            for i in range(0, len(part), step):
                at = slice(i, i + step)
                kernel(part[at], out[at], tuple(s[at] for s in scales))

        block_kernel(qtype, chunk_elems=step * QUANT_LAYOUT[qtype].block_size * PREPARE_CHUNKS)(group)
        return kernel

    return add


# --- shared pieces of the kernels ------------------------------------------------------------------


def f16_at(blocks: U8Array, offset: int) -> F32Array:
    """The little-endian f16 field at byte `offset` of every block, as float32 of shape (n, 1)."""
    return blocks[:, offset : offset + 2].view("<f2").astype(np.float32)


def f16_times(blocks: U8Array, offset: int, small: npt.NDArray[np.integer]) -> F32Array:
    """`d * small` in float32, `d` the f16 at `offset` of each block, `small` (n, k) sub-block integers
    (a K-quant's `d * sc`, rounded to float32 before it meets a quant, as in ggml): an (n, 1) × (n, k)
    broadcast (its inner loop runs k elements at a time, but these are 1/16 or 1/32 of the outputs,
    and a ufunc releases the GIL where `np.repeat` would not)."""
    out = np.empty(small.shape, np.float32)
    np.copyto(out, small, casting="unsafe")  # exact
    np.multiply(f16_at(blocks, offset), out, out=out)  # the (n, 1) d first, as ggml: `d * sc`
    return out


def scale_ints(
    q: npt.NDArray[np.integer],
    scale: F32Array,
    out: F32Array,
    offset: F32Array | None = None,
) -> None:
    """`out = scale * q - offset`, groups of `out.shape[1] // scale.shape[1]` elements per scale (and
    per offset).

    The first pass converts the ints straight into `out` (exact); the scales are then applied by
    `apply_groups`.
    """
    np.copyto(out, q.reshape(out.shape), casting="unsafe")  # ints -> float32, exact
    scale_groups(out, scale)
    if offset is not None:
        apply_groups(np.subtract, out, offset)


def scale_groups(out: F32Array, scale: F32Array) -> None:
    """`out *= scale`: `out` a contiguous (n, block_size) chunk, `scale` (n, g), each scale over its
    `block_size // g` consecutive elements. (Only the scale can be NaN, so operand order is moot.)"""
    apply_groups(np.multiply, out, scale)


def apply_groups(op: np.ufunc, out: F32Array, values: F32Array) -> None:
    """`out = op(out, values)` in place, `values` (n, g) one per `block_size // g` elements of `out`.

    One broadcast pass: `out` as (n·g, block_size // g) against `values` as (n·g, 1). numpy runs its
    inner loop 16 or 32 elements at a time, so on one thread this is slower than repeating the values
    out to one per element and applying them flat (2**18 outputs in cache, 2026-12-02: 0.45 vs 0.31 ns
    an element for 16-element groups, 0.34 vs 0.26 for 32). But `np.repeat` holds the GIL: with it, two
    threads dequantizing at once made no more than one (Q4_K 506 vs 347 MB/s one thread, IQ4_XS 286 vs
    236), and with the broadcast Q4_K makes 776 vs 493 (bench/dequant.py).
    """
    if out.size:
        assert out.flags.c_contiguous  # else the reshape below would be a copy, written in vain
        rows = out.reshape(values.size, -1)
        op(rows, values.reshape(-1, 1), out=rows)


def f16_scales(*offsets: int) -> Prepare:
    """A `prepare` that reads the f16 fields at `offsets` of every block, each as (n, 1) float32."""

    def prepare(blocks: U8Array) -> Scales:
        return tuple(f16_at(blocks, at) for at in offsets)

    return prepare


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


def nibble_planes(b: U8Array) -> tuple[U8Array, U8Array]:
    """`b & 0xF` and `b >> 4` of a contiguous chunk of blocks: two flat uint8 passes. A kernel then
    reads the quants' columns out of them; converting those strided (n, 16) views straight into `out`
    beats assembling a contiguous uint8 copy first (0.30 vs 0.62 ns/element for Q4_1)."""
    return b & np.uint8(0x0F), b >> np.uint8(4)


def convert_halves(
    lo: U8Array | npt.NDArray[np.int8], hi: U8Array | npt.NDArray[np.int8], out: F32Array
) -> None:
    """Q4_0 order, as float32: quants `lo` (n, k) into `out[:, :k]`, `hi` into `out[:, k:]` (exact)."""
    k = lo.shape[1]
    np.copyto(out[:, :k], lo, casting="unsafe")
    np.copyto(out[:, k:], hi, casting="unsafe")


def five_bit(b: U8Array, qh: int) -> U8Array:
    """Q5_0/Q5_1 quants 0..31 in output order: nibbles as in Q4_0 (from `nibble_planes`), bit 4 of
    element j = bit j of the little-endian u32 at byte `qh`. Assembled in uint8 (0.85 ns/element here
    against 1.6 for OR-ing the bits into strided nibble planes)."""
    lo, hi = nibble_planes(b)
    q = np.empty((len(b), 32), np.uint8)
    q[:, :16] = lo[:, qh + 4 :]
    q[:, 16:] = hi[:, qh + 4 :]
    bits = np.unpackbits(b[:, qh : qh + 4], axis=1, bitorder="little")
    bits <<= np.uint8(4)
    q |= bits
    return q


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


@scaled_kernel(QuantType.Q8_0, f16_scales(0))
def _q8_0(b: U8Array, out: F32Array, scales: Scales) -> None:  # d:f16, qs[32]:i8
    np.copyto(out, b[:, 2:].view(np.int8), casting="unsafe")  # from the strided view: no copy first
    np.multiply(out, scales[0], out=out)  # the (n, 1) scale broadcast over the block's 32


@scaled_kernel(QuantType.Q4_0, f16_scales(0))
def _q4_0(b: U8Array, out: F32Array, scales: Scales) -> None:  # d:f16, qs[16]; q = nibble - 8
    lo, hi = nibble_planes(b)
    lo -= np.uint8(8)
    hi -= np.uint8(8)
    convert_halves(lo[:, 2:].view(np.int8), hi[:, 2:].view(np.int8), out)
    np.multiply(out, scales[0], out=out)


@scaled_kernel(QuantType.Q4_1, f16_scales(0, 2))
def _q4_1(b: U8Array, out: F32Array, scales: Scales) -> None:  # d, m:f16, qs[16]; d * q + m
    lo, hi = nibble_planes(b)
    convert_halves(lo[:, 4:], hi[:, 4:], out)
    np.multiply(out, scales[0], out=out)  # d * q + m: two roundings, no FMA
    np.add(out, scales[1], out=out)


@scaled_kernel(QuantType.Q5_0, f16_scales(0))
def _q5_0(b: U8Array, out: F32Array, scales: Scales) -> None:  # d:f16, qh[4], qs[16]; q = 5 bits - 16
    q = five_bit(b, 2)
    q -= np.uint8(16)
    np.copyto(out, q.view(np.int8), casting="unsafe")
    np.multiply(out, scales[0], out=out)


@scaled_kernel(QuantType.Q5_1, f16_scales(0, 2))
def _q5_1(b: U8Array, out: F32Array, scales: Scales) -> None:  # d, m:f16, qh[4], qs[16]; d * q + m
    np.copyto(out, five_bit(b, 4), casting="unsafe")
    np.multiply(out, scales[0], out=out)  # d * q + m: two roundings, no FMA
    np.add(out, scales[1], out=out)


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
