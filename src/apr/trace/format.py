"""APRT — aprender's stage tensor file, byte for byte (spec §3). One stage of one layer per file.

    offset  size            field
    0       4               magic b"APRT"
    4       u32 LE          layer: decoder layer 0..n-1, or 0xFFFFFFFF for whole-model stages
    8       u32 LE          dim_product: number of f32 values that follow
    12      4·dim_product   f32 LE values, row-major flattening of the stage tensor

Total size is exactly 12 + 4·dim_product; an empty tensor is a 12-byte file. There is no version, dtype,
shape, stage name, alignment or checksum: the stage is the file name (`layer-N/<stage>.bin`), and shape,
labels and run identity live in the trace's manifest.json, written by the same writer. NaN, Inf and -0.0
round-trip bit-exactly. As in aprender's reader, bytes after the body are ignored. The sentinel layer value
is named once here (`WHOLE_MODEL_LAYER`) and surfaces to callers as `layer=None`.
"""

from __future__ import annotations

import stat
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import numpy as np
import numpy.typing as npt

from apr.atomicfile import atomic_output
from apr.errors import AprIOError, NotFoundError, TraceFormatError
from apr.formats.files import stat_path

MAGIC: Final = b"APRT"
HEADER: Final = struct.Struct("<4sII")
HEADER_SIZE: Final = HEADER.size  # 12
WHOLE_MODEL_LAYER: Final = 0xFFFFFFFF
MAX_VALUES: Final = 0xFFFFFFFF
F32_LE: Final = np.dtype("<f4")


@dataclass(frozen=True, slots=True)
class AprtHeader:
    layer: int | None  # None = whole-model stage
    count: int

    @property
    def file_size(self) -> int:
        return HEADER_SIZE + 4 * self.count


@dataclass(frozen=True, slots=True)
class AprtTensor:
    header: AprtHeader
    values: npt.NDArray[np.float32]  # 1-D, little-endian f32, memory-mapped when read from a file

    @property
    def layer(self) -> int | None:
        return self.header.layer


def encode_header(layer: int | None, count: int) -> bytes:
    if layer is not None and not 0 <= layer < WHOLE_MODEL_LAYER:
        raise ValueError(f"APRT layer {layer} out of range 0..{WHOLE_MODEL_LAYER - 1}")
    if not 0 <= count <= MAX_VALUES:
        raise ValueError(f"APRT holds at most {MAX_VALUES} values, got {count}")
    return HEADER.pack(MAGIC, WHOLE_MODEL_LAYER if layer is None else layer, count)


def decode_header(head: bytes, source: str = "<bytes>") -> AprtHeader:
    if len(head) < HEADER_SIZE:
        raise TraceFormatError(
            f"{source}: save-tensor header truncated: got {len(head)} bytes, need {HEADER_SIZE}"
        )
    magic, layer, count = HEADER.unpack_from(head)
    if magic != MAGIC:
        shown = magic.decode("latin-1").encode("unicode_escape").decode()
        raise TraceFormatError(
            f'{source}: save-tensor magic mismatch: got "{shown}" ({magic.hex(" ")}), expected "APRT"'
        )
    return AprtHeader(None if layer == WHOLE_MODEL_LAYER else layer, count)


def _as_f32le(values: npt.ArrayLike) -> npt.NDArray[np.float32]:
    arr = np.asarray(values)
    if arr.dtype != F32_LE:
        arr = arr.astype(F32_LE)
    return np.ascontiguousarray(arr).reshape(-1)


def encode(layer: int | None, values: npt.ArrayLike) -> bytes:
    arr = _as_f32le(values)
    return encode_header(layer, arr.size) + arr.tobytes()


def write_aprt(path: Path, layer: int | None, values: npt.ArrayLike) -> int:
    """Write one stage file atomically; returns its size in bytes."""
    arr = _as_f32le(values)
    with atomic_output(path) as f:
        f.write(encode_header(layer, arr.size))
        f.write(arr.tobytes())
    return HEADER_SIZE + 4 * arr.size


def is_aprt(path: Path) -> bool:
    """aprender's `is_aprt_stage_file`: opens and starts with b"APRT"; any error → False."""
    try:
        with path.open("rb") as f:
            return f.read(4) == MAGIC
    except OSError:
        return False


def _check_file(path: Path) -> int:
    st = stat_path(path)  # not found, or a symlink loop, said as such
    if not stat.S_ISREG(st.st_mode):  # a FIFO would block the read, a device never end
        raise NotFoundError(f"Not a file: {path}")
    return st.st_size


def read_aprt_header(path: Path) -> AprtHeader:
    _check_file(path)
    try:
        with path.open("rb") as f:
            return decode_header(f.read(HEADER_SIZE), str(path))
    except OSError as e:
        raise AprIOError(f"cannot read {path}: {e.strerror or e}") from None


def check_body(path: Path, header: AprtHeader, size: int) -> None:
    """The file must hold every value its header announces (bytes after them are ignored)."""
    if size < header.file_size:
        raise TraceFormatError(
            f"{path}: save-tensor body truncated: header says {header.count} f32 values "
            f"({4 * header.count} bytes), file has {size - HEADER_SIZE} bytes after the header"
        )


def read_aprt(path: Path) -> AprtTensor:
    """Read and validate a stage file. The values are read, not memory-mapped: a file that shrinks while it
    is read (a run rewriting it, a truncation) is an error, never a SIGBUS."""
    size = _check_file(path)
    header = read_aprt_header(path)
    check_body(path, header, size)
    if header.count == 0:
        return AprtTensor(header, np.zeros(0, F32_LE))
    try:
        with path.open("rb") as f:
            values = np.fromfile(f, dtype=F32_LE, count=header.count, offset=HEADER_SIZE)
    except OSError as e:
        raise AprIOError(f"cannot read {path}: {e.strerror or e}") from None
    if values.size != header.count:
        raise TraceFormatError(f"{path}: ends at value {values.size} of {header.count} (shrank while read)")
    values.flags.writeable = False  # as the map was: callers copy before changing values
    return AprtTensor(header, values)


def iter_values(path: Path, header: AprtHeader, chunk: int) -> Iterator[npt.NDArray[np.float32]]:
    """The file's values, `chunk` at a time, read (not mapped): memory stays at one chunk, and a file that
    shrinks while being read is an error, not a SIGBUS."""
    try:
        with path.open("rb") as f:
            f.seek(HEADER_SIZE)
            for lo in range(0, header.count, chunk):
                want = 4 * min(chunk, header.count - lo)
                raw = f.read(want)
                if len(raw) != want:
                    raise TraceFormatError(f"{path}: ends at value {lo + len(raw) // 4} of {header.count}")
                yield np.frombuffer(raw, F32_LE)
    except OSError as e:
        raise AprIOError(f"cannot read {path}: {e.strerror or e}") from None
