"""The `.apr` v2 container, bytes ↔ records: header, tensor index, dtype codes, sizes (spec §7).

    offset        size   field
    0             64     header, little-endian: magic b"APR\\0", version u8 major = 2, u8 minor = 0,
                         flags u16, tensor_count u32, metadata_offset u64, metadata_size u32,
                         index_offset u64, data_offset u64, header CRC32 u32, 20 reserved zero bytes
    64            M      metadata: compact UTF-8 JSON object (formats/aprmeta.py), zero-padded to 64
    index_offset  I      tensor index, entries packed back to back, zero-padded to 64; per entry:
                         name_len u16 (≤ 256), name UTF-8, dtype u8, ndim u8 (≤ 8), dims ndim×u64,
                         offset u64 (relative to data_offset, 64-aligned), size u64 (unpadded bytes)
    data_offset   D      tensor bytes, each zero-padded to 64
    end − 4       4      footer CRC32 of every byte before it

CRC32 is zlib's. The header CRC covers bytes [0, 40) ‖ [44, 64). Index entries are sorted by name
(bytewise) and unique. Data is in index order when our writer (or aprender's in-memory writer) wrote
it; aprender's streaming writer keeps insertion order, so readers must not assume it — they only
require every tensor to be 64-aligned, inside the data section, and disjoint from the others. The
file is exactly `data_offset + max(offset + align64(size)) + 4` bytes. 2-D (and higher) K-quant
tensors are stored per row, each row a whole number of 256-element super-blocks (GH-202); APR_Q4
blocks run across the flattened tensor; APR_Q8 is one f32 scale followed by one int8 per element.
Forbidden: any other magic, major version ≠ 2, LAYOUT_COLUMN_MAJOR, compression, encryption,
metadata over 16 MiB. Every violation raises `FormatError` naming the file, the field and the
expected vs found value. This module never touches tensor data beyond the footer CRC.
"""

from __future__ import annotations

import math
import struct
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from enum import IntFlag
from typing import BinaryIO, Final

from apr.errors import FormatError
from apr.formats.files import printable
from apr.quant.types import QUANT_LAYOUT, QuantType

MAGIC: Final = b"APR\x00"
LEGACY_MAGICS: Final = (b"APRN", b"APR1", b"APR2")  # older aprender containers, refused with a hint
VERSION: Final = (2, 0)
HEADER: Final = struct.Struct("<4sBBHIQIQQI20s")
HEADER_SIZE: Final = HEADER.size  # 64
ALIGNMENT: Final = 64
FOOTER_SIZE: Final = 4
MAX_METADATA_SIZE: Final = 16 * 1024 * 1024
MAX_NAME_LEN: Final = 256
MAX_NDIM: Final = 8
ENTRY_FIXED: Final = 2 + 1 + 1 + 8 + 8  # name_len, dtype, ndim, offset, size = 20 bytes
MAX_ENTRY: Final = ENTRY_FIXED + MAX_NAME_LEN + 8 * MAX_NDIM
MAX_ELEMENTS: Final = 2**60  # numpy cannot shape more, even when another dim is 0


class Flag(IntFlag):
    LZ4_COMPRESSED = 0x0001
    ZSTD_COMPRESSED = 0x0002
    ENCRYPTED = 0x0004
    SIGNED = 0x0008
    SHARDED = 0x0010
    QUANTIZED = 0x0020
    HAS_FILTERBANK = 0x0040
    HAS_MODEL_CARD = 0x0080
    STREAMING = 0x0100
    HAS_VOCAB = 0x0200
    LAYOUT_ROW_MAJOR = 0x0400
    LAYOUT_COLUMN_MAJOR = 0x0800


# The writer sets LAYOUT_ROW_MAJOR and nothing else, as aprender's GGUF import does: QUANTIZED and
# HAS_VOCAB are informational (no reader branches on them) and would break byte equality.
WRITER_FLAGS: Final = Flag.LAYOUT_ROW_MAJOR
REFUSED_FLAGS: Final[dict[Flag, str]] = {
    Flag.LAYOUT_COLUMN_MAJOR: "the tensors are column-major (a dirty import); re-import the model",
    Flag.LZ4_COMPRESSED: "compressed files are not supported; `apr convert --compress none` first",
    Flag.ZSTD_COMPRESSED: "compressed files are not supported; `apr convert --compress none` first",
    Flag.ENCRYPTED: "encrypted files are not supported",
}

# dtype code -> element type, as aprender's TensorDType (ids 0-31 follow GGML where they overlap).
DTYPE_CODES: Final[dict[int, QuantType]] = {
    0: QuantType.F32,
    1: QuantType.F16,
    3: QuantType.F64,
    4: QuantType.I32,
    5: QuantType.I64,
    6: QuantType.I8,
    7: QuantType.U8,
    12: QuantType.Q4_K,
    14: QuantType.Q6_K,
    30: QuantType.BF16,
    128: QuantType.APR_Q4,
    129: QuantType.APR_Q8,
}
# Q8_0 is written as code 8, which realizar (aprender's inference loader) reads as GGML Q8_0 when the size
# fits; aprender's own format crate reads 8 as its legacy APR_Q4. The sizes always differ (34 vs 18 bytes
# per 32), so our reader resolves code 8 by size and never guesses. `apr import --quantize q8_0` uses it.
CODE_OF: Final[dict[QuantType, int]] = {q: c for c, q in DTYPE_CODES.items()} | {QuantType.Q8_0: 8}
# Codes resolved by size, first match wins: aprender reads 8 as APR_Q4 and 9 as APR_Q8 (their ids
# before GH-438); realizar reads 8 as GGML Q8_0 when the size fits. We never write 9.
LEGACY_CODES: Final[dict[int, tuple[QuantType, ...]]] = {
    8: (QuantType.APR_Q4, QuantType.Q8_0),
    9: (QuantType.APR_Q8,),
}


@dataclass(frozen=True, slots=True)
class Packing:
    """How a dtype's bytes sit in an .apr tensor: an optional prefix, then blocks of elements."""

    block: int  # elements per block (1 for plain element types)
    block_bytes: int
    per_row: bool  # each row (last axis) is a whole number of blocks; else blocks span rows
    prefix: int = 0  # bytes before the first block (APR_Q8's f32 scale)

    def nbytes(self, shape: Sequence[int]) -> int:
        n = math.prod(shape)
        if n == 0:
            return 0
        if not self.per_row:
            return self.prefix + -(-n // self.block) * self.block_bytes
        cols = shape[-1] if shape else 1
        return self.prefix + n // cols * self.row_bytes(cols)

    def row_bytes(self, cols: int) -> int:
        """Bytes of one row of `cols` elements (for non-per-row types, only if it fills blocks)."""
        return -(-cols // self.block) * self.block_bytes

    def rows_addressable(self, cols: int) -> bool:
        return self.per_row or cols % self.block == 0


def _blocks(qtype: QuantType, *, per_row: bool) -> Packing:
    layout = QUANT_LAYOUT[qtype]
    return Packing(layout.block_size, layout.type_size, per_row)


_ELEMENTS: Final = (QuantType.F32, QuantType.F16, QuantType.BF16, QuantType.F64, QuantType.I8)
_MORE_ELEMENTS: Final = (QuantType.U8, QuantType.I32, QuantType.I64)
_GGML_BLOCKS: Final = (QuantType.Q4_K, QuantType.Q6_K, QuantType.Q8_0)  # whole blocks per row
PACKING: Final[dict[QuantType, Packing]] = {
    **{q: _blocks(q, per_row=True) for q in _ELEMENTS + _MORE_ELEMENTS + _GGML_BLOCKS},
    QuantType.APR_Q4: _blocks(QuantType.APR_Q4, per_row=False),
    QuantType.APR_Q8: Packing(1, 1, per_row=True, prefix=4),
}


def align64(n: int) -> int:
    return -(-n // ALIGNMENT) * ALIGNMENT


def header_crc(header: bytes) -> int:
    return zlib.crc32(header[44:64], zlib.crc32(header[:40]))


@dataclass(frozen=True, slots=True)
class AprHeader:
    tensor_count: int
    metadata_size: int
    index_offset: int
    data_offset: int
    flags: int = int(WRITER_FLAGS)
    metadata_offset: int = HEADER_SIZE
    version: tuple[int, int] = VERSION

    def encode(self) -> bytes:
        """The 64 header bytes, checksum included."""
        fields = (self.flags, self.tensor_count, self.metadata_offset, self.metadata_size)
        raw = HEADER.pack(MAGIC, *self.version, *fields, self.index_offset, self.data_offset, 0, b"")
        return raw[:40] + header_crc(raw).to_bytes(4, "little") + raw[44:]


@dataclass(frozen=True, slots=True)
class AprEntry:
    name: str
    qtype: QuantType
    shape: tuple[int, ...]
    offset: int  # relative to data_offset
    size: int
    code: int = -1  # the stored dtype code; -1 = CODE_OF[qtype]

    def encode(self) -> bytes:
        name = self.name.encode()
        code = CODE_OF[self.qtype] if self.code < 0 else self.code
        head = struct.pack("<H", len(name)) + name + struct.pack("<BB", code, len(self.shape))
        return head + struct.pack(f"<{len(self.shape)}QQQ", *self.shape, self.offset, self.size)


def layout_header(metadata_size: int, entries: Sequence[AprEntry]) -> AprHeader:
    """The header a writer emits for `metadata_size` bytes of JSON and these index entries."""
    index_offset = HEADER_SIZE + align64(metadata_size)
    index_len = sum(len(e.name.encode()) + ENTRY_FIXED + 8 * len(e.shape) for e in entries)
    return AprHeader(len(entries), metadata_size, index_offset, index_offset + align64(index_len))


# --- reading -----------------------------------------------------------------------------------


def decode_header(head: bytes, file_size: int, where: str) -> AprHeader:
    if len(head) < HEADER_SIZE:
        raise FormatError(f"{where}: file too short for an .apr header: {len(head)} bytes, need 64")
    magic, major, minor, flags, count, meta_off, meta_size, idx_off, data_off, crc, _ = HEADER.unpack_from(
        head
    )
    if magic in LEGACY_MAGICS:
        raise FormatError(
            f"{where}: magic {magic!r} is an older APR container; this reader accepts only "
            "b'APR\\x00' (APR v2): re-import the model with a current `apr import`"
        )
    if magic != MAGIC:
        raise FormatError(f"{where}: not an .apr file: magic {magic!r}, expected b'APR\\x00'")
    if major != VERSION[0]:
        raise FormatError(f"{where}: unsupported .apr version {major}.{minor}: this reader reads 2.x")
    if crc != (computed := header_crc(head[:HEADER_SIZE])):
        raise FormatError(f"{where}: header checksum mismatch: stored 0x{crc:08x}, computed 0x{computed:08x}")
    for flag, why in REFUSED_FLAGS.items():
        if flags & flag:
            raise FormatError(f"{where}: header flag {flag.name} (0x{flag.value:04x}) set: {why}")
    if file_size < HEADER_SIZE + FOOTER_SIZE:
        raise FormatError(f"{where}: file too short: {file_size} bytes, need 68 (header + footer)")
    if meta_size > MAX_METADATA_SIZE:
        raise FormatError(f"{where}: metadata is {meta_size} bytes, over the 16 MiB limit")
    end = file_size - FOOTER_SIZE
    if max(meta_off + meta_size, idx_off, data_off) > end:
        raise FormatError(
            f"{where}: file is {file_size} bytes, too short for what its header declares "
            f"(metadata [{meta_off}, {meta_off + meta_size}), index at {idx_off}, data at "
            f"{data_off}, then a 4-byte footer): truncated?"
        )
    _expect_offset(where, "metadata", meta_off, HEADER_SIZE, end - meta_size)
    _expect_offset(where, "tensor index", idx_off, meta_off + meta_size, end)
    _expect_offset(where, "data section", data_off, idx_off, end)
    if count * ENTRY_FIXED > data_off - idx_off:
        raise FormatError(
            f"{where}: {count} tensors need at least {count * ENTRY_FIXED} index bytes, "
            f"the index section has {data_off - idx_off}"
        )
    return AprHeader(count, meta_size, idx_off, data_off, flags, meta_off, (major, minor))


def _expect_offset(where: str, what: str, found: int, lo: int, hi: int) -> None:
    if found % ALIGNMENT or not lo <= found <= hi:
        raise FormatError(f"{where}: {what} offset {found}: expected a multiple of 64 in [{lo}, {hi}]")


def decode_index(buf: bytes, count: int, base: int, where: str) -> tuple[AprEntry, ...]:
    """Parse `count` packed entries from `buf` (which starts at file byte `base`)."""
    entries: list[AprEntry] = []
    pos = 0
    for i in range(count):
        entry, pos = _decode_entry(buf, pos, f"{where}: tensor index entry {i} at byte {base + pos}")
        entries.append(entry)
    for i in range(1, len(entries)):
        a, b = entries[i - 1].name, entries[i].name
        if a == b:
            raise FormatError(f"{where}: duplicate tensor name '{a}' (entries {i - 1} and {i})")
        if a.encode() > b.encode():
            raise FormatError(f"{where}: tensor index not sorted: '{b}' (entry {i}) after '{a}'")
    return tuple(entries)


def _decode_entry(buf: bytes, pos: int, at: str) -> tuple[AprEntry, int]:
    if len(buf) - pos < 2:
        raise FormatError(f"{at}: truncated: need 2 bytes for name_len, {len(buf) - pos} remain")
    (name_len,) = struct.unpack_from("<H", buf, pos)
    if name_len > MAX_NAME_LEN:
        raise FormatError(f"{at}: name length {name_len} exceeds the maximum {MAX_NAME_LEN}")
    if (need := 2 + name_len + 18) > len(buf) - pos:
        raise FormatError(f"{at}: truncated: need {need} bytes, {len(buf) - pos} remain")
    try:
        name = buf[pos + 2 : pos + 2 + name_len].decode()
    except UnicodeDecodeError as e:
        raise FormatError(f"{at}: tensor name is not valid UTF-8 (byte {e.start})") from None
    pos += 2 + name_len
    code, ndim = buf[pos], buf[pos + 1]
    name = printable(name, at)
    at = f"{at} ('{name}')"
    if ndim > MAX_NDIM:
        raise FormatError(f"{at}: ndim {ndim} exceeds the maximum {MAX_NDIM}")
    if (need := 2 + 8 * ndim + 16) > len(buf) - pos:
        raise FormatError(f"{at}: truncated: need {need} bytes, {len(buf) - pos} remain")
    *shape, offset, size = struct.unpack_from(f"<{ndim}QQQ", buf, pos + 2)
    qtype = _qtype_of(code, tuple(shape), size, at)
    return AprEntry(name, qtype, tuple(shape), offset, size, code), pos + need


def _qtype_of(code: int, shape: tuple[int, ...], size: int, at: str) -> QuantType:
    if code in DTYPE_CODES:
        return DTYPE_CODES[code]
    if code not in LEGACY_CODES:
        raise FormatError(f"{at}: unknown dtype code {code}")
    candidates = LEGACY_CODES[code]
    for qtype in candidates:
        if PACKING[qtype].nbytes(shape) == size:
            return qtype
    return candidates[0]  # the size check in check_entries reports the mismatch


def check_entries(entries: Sequence[AprEntry], header: AprHeader, file_size: int, where: str) -> None:
    """Every tensor 64-aligned, sized as its dtype × dims, inside the data section and disjoint;
    the file exactly as long as the index implies (no truncation, no trailing bytes)."""
    data_end = file_size - FOOTER_SIZE - header.data_offset
    for e in entries:
        if math.prod(d for d in e.shape if d) > MAX_ELEMENTS:
            raise FormatError(f"{where}: tensor '{e.name}': shape {list(e.shape)} is too large")
        if e.offset % ALIGNMENT:
            raise FormatError(f"{where}: tensor '{e.name}': data offset {e.offset} is not 64-aligned")
        if e.size != PACKING[e.qtype].nbytes(e.shape):
            kinds = LEGACY_CODES.get(e.code, (e.qtype,))
            need = " or ".join(f"{PACKING[q].nbytes(e.shape)} ({q.name})" for q in kinds)
            raise FormatError(
                f"{where}: tensor '{e.name}' (dtype code {e.code}, shape {list(e.shape)}): "
                f"{e.size} bytes, expected {need}"
            )
        if e.offset + e.size > data_end:
            raise FormatError(
                f"{where}: tensor '{e.name}': bytes [{e.offset}, {e.offset + e.size}) of the data "
                f"section extend past its end {data_end} (file is {file_size} bytes: truncated?)"
            )
    prev: AprEntry | None = None
    for e in sorted((e for e in entries if e.size), key=lambda e: e.offset):  # empty ones hold no bytes
        if prev is not None and prev.offset + prev.size > e.offset:
            raise FormatError(
                f"{where}: tensor '{e.name}' at data offset {e.offset} overlaps '{prev.name}' "
                f"(ends at {prev.offset + prev.size})"
            )
        prev = e
    data_len = max((e.offset + align64(e.size) for e in entries), default=0)
    if file_size != (expect := header.data_offset + data_len + FOOTER_SIZE):
        raise FormatError(
            f"{where}: file is {file_size} bytes, but its index implies {expect} (data ends at "
            f"{header.data_offset + data_len}, then a 4-byte footer CRC)"
        )


def read_container(f: BinaryIO, file_size: int, where: str) -> tuple[AprHeader, bytes, tuple[AprEntry, ...]]:
    """Header, raw metadata bytes and the checked index; reads O(metadata + index) bytes only."""
    f.seek(0)
    header = decode_header(f.read(HEADER_SIZE), file_size, where)
    f.seek(header.metadata_offset)
    metadata = f.read(header.metadata_size)
    f.seek(header.index_offset)
    index_len = min(header.data_offset - header.index_offset, header.tensor_count * MAX_ENTRY)
    entries = decode_index(f.read(index_len), header.tensor_count, header.index_offset, where)
    check_entries(entries, header, file_size, where)
    return header, metadata, entries
