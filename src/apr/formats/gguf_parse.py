"""GGUF v2/v3 codec: the header, metadata and tensor index of a GGUF file, parsed strictly and fast.

Layout (little-endian; ggml docs/gguf.md):
    magic "GGUF" | version u32 (2 or 3) | tensor_count u64 | kv_count u64
    kv_count × (key: string, value_type u32, value)
        string = length u64 + UTF-8 bytes;  array = elem_type u32 + count u64 + count elements
        (arrays of arrays are refused, as llama.cpp refuses them)
    tensor_count × (name: string, n_dims u32 ≤ 4, ne u64 × n_dims (innermost first), ggml_type u32,
                    offset u64 from the start of the data section, a multiple of the alignment)
    padding to `general.alignment` (u32, a power of two, default 32), then the data section.

Every count, length and offset is checked against the bytes that remain before anything is
allocated or sliced; a violation raises FormatError naming the field, its offset, and what was
expected vs found. Big string arrays (49k tokens, 49k merges) are only indexed here: `StringArray`
decodes them on first use. This module knows the byte layout and GGML type sizes, nothing about
models (gguf.py builds those).
"""

from __future__ import annotations

import math
import mmap
import struct
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from enum import IntEnum
from functools import partial
from typing import Any, Final

import numpy as np
import numpy.typing as npt

from apr.errors import AprError, FormatError
from apr.formats.base import TensorInfo
from apr.formats.files import printable
from apr.formats.gguf_strings import StringArray
from apr.quant.types import GGML_LAYOUT, QuantType

MAGIC: Final = b"GGUF"
SUPPORTED_VERSIONS: Final = (2, 3)
HEADER_SIZE: Final = 4 + 4 + 8 + 8  # magic, version, tensor_count, kv_count
DEFAULT_ALIGNMENT: Final = 32
ALIGNMENT_KEY: Final = "general.alignment"
MAX_DIMS: Final = 4  # GGML_MAX_DIMS
MIN_KV_BYTES: Final = 8 + 4 + 1  # empty key, value type, a one-byte value
MIN_TENSOR_BYTES: Final = 8 + 4 + 4 + 8  # empty name, n_dims = 0, type, offset


class ValueType(IntEnum):
    UINT8 = 0
    INT8 = 1
    UINT16 = 2
    INT16 = 3
    UINT32 = 4
    INT32 = 5
    FLOAT32 = 6
    BOOL = 7
    STRING = 8
    ARRAY = 9
    UINT64 = 10
    INT64 = 11
    FLOAT64 = 12


# struct/numpy format of each fixed-size value type (numpy accepts the same strings as dtypes)
SCALAR_FORMAT: Final[dict[ValueType, str]] = {
    ValueType.UINT8: "<B",
    ValueType.INT8: "<b",
    ValueType.UINT16: "<H",
    ValueType.INT16: "<h",
    ValueType.UINT32: "<I",
    ValueType.INT32: "<i",
    ValueType.FLOAT32: "<f",
    ValueType.BOOL: "<?",
    ValueType.UINT64: "<Q",
    ValueType.INT64: "<q",
    ValueType.FLOAT64: "<d",
}
INT_TYPES: Final = frozenset(SCALAR_FORMAT) - {ValueType.FLOAT32, ValueType.FLOAT64, ValueType.BOOL}
FLOAT_TYPES: Final = frozenset({ValueType.FLOAT32, ValueType.FLOAT64})

_U32: Final = struct.Struct("<I")
_U64: Final = struct.Struct("<Q")

Buffer = bytes | mmap.mmap
_VALUE_TYPES: Final = frozenset(int(v) for v in ValueType)


Value = int | float | bool | str | npt.NDArray[Any] | StringArray


@dataclass(frozen=True, slots=True)
class Field:
    key: str
    type: ValueType
    value: Value
    elem_type: ValueType | None = None  # arrays only
    offset: int = 0  # where the key starts in the file


@dataclass(frozen=True, slots=True)
class Header:
    version: int
    fields: dict[str, Field]
    tensors: tuple[TensorInfo, ...]
    alignment: int
    data_offset: int


@contextmanager
def located(source: str) -> Iterator[None]:
    """Prefix the message of any AprError raised inside with `source: ` (the file it is about)."""
    try:
        yield
    except AprError as e:
        if source and not str(e).startswith(f"{source}: "):
            e.args = (f"{source}: {e}",)
        raise


class NeedMoreBytes(Exception):
    """The header runs past the prefix of the file in the buffer: parse again with at least `needed` bytes."""

    def __init__(self, needed: int) -> None:
        super().__init__(needed)
        self.needed = needed


class _Cursor:
    """A position in the buffer; every read checks the bytes that remain in the file first, then that the
    buffer (a prefix of the file) holds them (NeedMoreBytes when not)."""

    __slots__ = ("avail", "buf", "end", "pos", "source")

    def __init__(self, buf: Buffer, end: int, source: str) -> None:
        self.buf, self.end, self.pos, self.source = buf, end, 0, source
        self.avail = min(len(buf), end)

    def have(self, stop: int) -> None:
        if stop > self.avail:
            raise NeedMoreBytes(stop)

    @property
    def left(self) -> int:
        return self.end - self.pos

    def take(self, n: int, what: str) -> int:
        if n > self.left:
            raise FormatError(
                f"{what} at offset {self.pos}: needs {n} bytes, only {self.left} left in the file"
            )
        self.have(self.pos + n)
        start, self.pos = self.pos, self.pos + n
        return start

    def u32(self, what: str) -> int:
        return int(_U32.unpack_from(self.buf, self.take(4, what))[0])

    def u64(self, what: str) -> int:
        return int(_U64.unpack_from(self.buf, self.take(8, what))[0])

    def string(self, what: str) -> str:
        at = self.pos
        n = self.u64(what)
        if n > self.left:
            raise FormatError(f"{what} at offset {at}: string length {n} exceeds the {self.left} bytes left")
        start = self.take(n, what)
        try:
            return bytes(self.buf[start : start + n]).decode("utf-8")
        except UnicodeDecodeError:
            raise FormatError(f"{what} at offset {at}: invalid UTF-8") from None


# ---- metadata values ----------------------------------------------------------------------------


def _read_scalar(fmt: str, c: _Cursor, what: str) -> Value:
    size = struct.calcsize(fmt)
    value: Value = struct.unpack_from(fmt, c.buf, c.take(size, what))[0]
    return value


def _scan_strings(c: _Cursor, count: int, what: str) -> StringArray:
    """Index `count` strings: one u64 read per string, no per-string objects (≈10 ms for 100k).

    The loop trusts the lengths: a length that runs past the buffer makes the next read fail, or leaves
    the end past what the file holds (positions only grow), and either sends the scan to `_checked_scan`,
    which finds the first bad string and says what is wrong with it (or that more bytes are needed)."""
    buf, base, unpack = c.buf, c.pos, _U64.unpack_from
    starts: list[int] = []
    append, pos = starts.append, base
    try:
        for _ in range(count):
            pos += 8
            append(pos - base)
            pos += unpack(buf, pos - 8)[0]
    except (struct.error, OverflowError):  # past the buffer, or past any offset
        pos = c.avail + 1
    if pos > c.avail:
        starts = _checked_scan(c, count, what)
        pos = c.pos
    c.pos = pos
    where = f"{c.source}: {what}" if c.source else what  # decoding fails later, outside `located`
    return StringArray(bytes(buf[base:pos]), np.array(starts, dtype=np.int64), where, base)


def _checked_scan(c: _Cursor, count: int, what: str) -> list[int]:
    """The string starts of `_scan_strings`, every length checked (FormatError, NeedMoreBytes)."""
    buf, end, pos = c.buf, c.end, c.pos
    base, unpack = pos, _U64.unpack_from
    starts: list[int] = []
    append = starts.append
    for i in range(count):
        if end - pos < 8:
            raise FormatError(f"{what}[{i}] at offset {pos}: needs 8 bytes, only {end - pos} left")
        c.have(pos + 8)
        n = unpack(buf, pos)[0]
        pos += 8
        if n > end - pos:
            raise FormatError(
                f"{what}[{i}] at offset {pos - 8}: string length {n} exceeds the {end - pos} bytes left"
            )
        c.have(pos + n)
        append(pos - base)
        pos += n
    c.pos = pos
    return starts


def _read_array(c: _Cursor, what: str) -> tuple[ValueType, Value]:
    at = c.pos
    code = c.u32(f"{what} element type")
    if code not in _VALUE_TYPES:
        raise FormatError(f"{what} at offset {at}: unknown array element type {code}")
    elem = ValueType(code)
    if elem is ValueType.ARRAY:
        raise FormatError(f"{what} at offset {at}: arrays of arrays are not supported")
    count = c.u64(f"{what} length")
    itemsize = 8 if elem is ValueType.STRING else struct.calcsize(SCALAR_FORMAT[elem])
    if count > c.left // itemsize:
        raise FormatError(
            f"{what} at offset {at}: {count} × {elem.name.lower()} needs at least "
            f"{count * itemsize} bytes, only {c.left} left"
        )
    if elem is ValueType.STRING:
        return elem, _scan_strings(c, count, what)
    start = c.take(count * itemsize, what)
    values = np.frombuffer(c.buf, SCALAR_FORMAT[elem], count, start).copy()
    return elem, values


_VALUE_READERS: Final[dict[ValueType, Callable[[_Cursor, str], Value]]] = {
    ValueType.STRING: _Cursor.string,
    **{vt: partial(_read_scalar, fmt) for vt, fmt in SCALAR_FORMAT.items()},
}


def _read_field(c: _Cursor, index: int) -> Field:
    at = c.pos
    key = printable(c.string(f"metadata key #{index}"), f"metadata key #{index} at offset {at}")
    what = f"metadata key '{key}'"
    code_at, code = c.pos, c.u32(f"{what} value type")
    if code not in _VALUE_TYPES:
        raise FormatError(f"{what} at offset {code_at}: unknown value type {code}")
    vtype = ValueType(code)
    if vtype is ValueType.ARRAY:
        elem, value = _read_array(c, what)
        return Field(key, vtype, value, elem, at)
    return Field(key, vtype, _VALUE_READERS[vtype](c, what), None, at)


def _read_fields(c: _Cursor, count: int) -> dict[str, Field]:
    fields: dict[str, Field] = {}
    for i in range(count):
        f = _read_field(c, i)
        if f.key in fields:
            raise FormatError(f"duplicate metadata key '{f.key}' at offset {f.offset}")
        fields[f.key] = f
    return fields


# ---- header and tensor index --------------------------------------------------------------------


def _read_preamble(c: _Cursor) -> tuple[int, int, int]:
    if c.end < HEADER_SIZE:
        raise FormatError(f"truncated GGUF header: {c.end} bytes, the fixed header needs {HEADER_SIZE}")
    magic = bytes(c.buf[0:4])
    if magic != MAGIC:
        raise FormatError(f"not a GGUF file: magic {magic!r}, expected {MAGIC!r}")
    c.pos = 4
    version = c.u32("version")
    if version not in SUPPORTED_VERSIONS:
        swapped = int.from_bytes(version.to_bytes(4, "little"), "big")
        hint = " (a big-endian file? those are not supported)" if swapped in SUPPORTED_VERSIONS else ""
        supported = ", ".join(map(str, SUPPORTED_VERSIONS))
        raise FormatError(f"unsupported GGUF version {version}{hint}; supported: {supported}")
    n_tensors, n_kv = c.u64("tensor_count"), c.u64("kv_count")
    _check_count(c, "kv_count", n_kv, MIN_KV_BYTES, 16)
    _check_count(c, "tensor_count", n_tensors, MIN_TENSOR_BYTES, 8)
    return version, n_tensors, n_kv


def _check_count(c: _Cursor, name: str, count: int, min_bytes: int, at: int) -> None:
    if count > c.left // min_bytes:
        raise FormatError(
            f"{name} {count} at offset {at} cannot fit: each entry needs at least "
            f"{min_bytes} bytes, only {c.left} left"
        )


def _alignment(fields: dict[str, Field]) -> int:
    f = fields.get(ALIGNMENT_KEY)
    if f is None:
        return DEFAULT_ALIGNMENT
    v = f.value
    if f.type is not ValueType.UINT32 or not isinstance(v, int) or v <= 0 or v & (v - 1):
        raise FormatError(f"{ALIGNMENT_KEY} must be a uint32 power of two, got {f.type.name.lower()} {v!r}")
    return v


@dataclass(frozen=True, slots=True)
class _Entry:
    name: str
    ne: tuple[int, ...]  # ggml order: ne[0] is the row length
    type_id: int
    offset: int  # relative to the data section
    at: int  # file offset of the entry


def _read_entry(c: _Cursor, index: int) -> _Entry:
    at = c.pos
    name = printable(c.string(f"tensor #{index} name"), f"tensor #{index} at offset {at}")
    what = f"tensor '{name}'"
    n_dims = c.u32(f"{what} n_dims")
    if n_dims > MAX_DIMS:
        raise FormatError(f"{what} at offset {at}: n_dims {n_dims} exceeds the maximum {MAX_DIMS}")
    ne = struct.unpack_from(f"<{n_dims}Q", c.buf, c.take(8 * n_dims, f"{what} dims"))
    type_id = c.u32(f"{what} type")
    offset = c.u64(f"{what} offset")
    return _Entry(name, ne, type_id, offset, at)


def _tensor_info(e: _Entry, data_offset: int, alignment: int, file_size: int) -> TensorInfo:
    what = f"tensor '{e.name}' (entry at offset {e.at})"
    if e.type_id not in GGML_LAYOUT:
        raise FormatError(f"{what}: unknown GGML type id {e.type_id}")
    qtype = QuantType(e.type_id)
    layout = GGML_LAYOUT[qtype]
    row = e.ne[0] if e.ne else 1
    if row % layout.block_size:
        raise FormatError(
            f"{what}: row length {row} is not a multiple of the {qtype.name} block size {layout.block_size}"
        )
    n = math.prod(e.ne)
    nbytes = n // layout.block_size * layout.type_size
    if e.offset % alignment:
        raise FormatError(f"{what}: data offset {e.offset} is not a multiple of the alignment {alignment}")
    start = data_offset + e.offset
    if start + nbytes > file_size:
        raise FormatError(
            f"{what}: data [{start}, {start + nbytes}) runs past the end of the file ({file_size} bytes)"
        )
    return TensorInfo(e.name, qtype, tuple(reversed(e.ne)), start, nbytes)


def parse_header(buf: Buffer, file_size: int, source: str = "") -> Header:
    """Parse everything up to the data section of the GGUF bytes in `buf` (a bytes or an mmap): the whole
    file, or a prefix of it — NeedMoreBytes when the header runs past that prefix (errors are judged against
    `file_size`, so a prefix never produces one a whole file would not).

    `source` (the file name) prefixes every error message.
    """
    with located(source):
        return _parse_header(_Cursor(buf, file_size, source))


def _parse_header(c: _Cursor) -> Header:
    file_size = c.end
    version, n_tensors, n_kv = _read_preamble(c)
    fields = _read_fields(c, n_kv)
    alignment = _alignment(fields)
    _check_count(c, "tensor_count", n_tensors, MIN_TENSOR_BYTES, 8)
    entries = [_read_entry(c, i) for i in range(n_tensors)]
    data_offset = -(-c.pos // alignment) * alignment
    tensors: dict[str, TensorInfo] = {}
    for e in entries:
        if e.name in tensors:
            raise FormatError(f"duplicate tensor name '{e.name}' (entry at offset {e.at})")
        tensors[e.name] = _tensor_info(e, data_offset, alignment, file_size)
    return Header(version, fields, tuple(tensors.values()), alignment, data_offset)
