"""`--save-tensor-mode stats`: per stage and per prompt position, summary statistics instead of the values.

One file per trace, `stats.aprs`, next to manifest.json (which describes it: the "stats" object below).
Format `APRS` version 1, little-endian, no alignment padding:

    offset  size          field
    0       4             magic b"APRS"
    4       u32           version (1)
    8       u32           record size in bytes (96)
    12      u32           number of records
    16      96·records    records, in the order the stages were captured (the engine's forward order)

    record  f64 min, f64 max, f64 mean, f64 std, f64 absmax, f64 l2,  u64 nan, u64 inf,  32 bytes sha256

One record is one position of one stage: row p of a (positions, …) stage, query row p of the
(heads, query, key) attention stages (the [heads, key] values of that query), the whole vector of a 1-D
stage (lm_head of the last position only). min … l2 are computed in f64 over the finite values of that
position (NaN and ±Inf are counted, not included; all non-finite → NaN statistics); std is the population
standard deviation (ddof 0); sha256 is the digest of the position's values as C-order f32 LE bytes, the
bytes a full trace would hold for them. The manifest's "stats" object gives
`{"file", "version", "bytes", "sha256", "stages": [{"stage", "layer", "shape", "first", "positions"}]}`:
each stage's full shape (as a full trace would save it), its first record and its positions
("START..END", END exclusive). Two identical runs write byte-identical files.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import numpy as np
import numpy.typing as npt

from apr.errors import TraceFormatError

MAGIC: Final = b"APRS"
VERSION: Final = 1
FILE_NAME: Final = "stats.aprs"
HEADER: Final = struct.Struct("<4sIII")
RECORD: Final = np.dtype(
    [
        ("min", "<f8"),
        ("max", "<f8"),
        ("mean", "<f8"),
        ("std", "<f8"),
        ("absmax", "<f8"),
        ("l2", "<f8"),
        ("nan", "<u8"),
        ("inf", "<u8"),
        ("sha256", "V32"),
    ]
)
RECORD_SIZE: Final = RECORD.itemsize  # 96
CHUNK_VALUES: Final = 1 << 22  # f64 temporaries per pass: 32 MiB whatever the stage's size
MODES: Final = ("full", "stats")
MODE_FULL, MODE_STATS = MODES
FLOATS: Final = ("min", "max", "mean", "std", "absmax", "l2")


def position_rows(value: npt.NDArray[np.float32], txt: bool) -> npt.NDArray[np.float32]:
    """The stage as (positions, values of one position): query rows of (heads, query, key), rows of
    (positions, …), a 1-D stage as one position."""
    if value.ndim == 1:
        return value.reshape(1, -1)
    if txt and value.ndim == 3:
        return np.ascontiguousarray(np.moveaxis(value, 1, 0)).reshape(value.shape[1], -1)
    return value.reshape(value.shape[0], -1)


def compute(rows: npt.NDArray[np.float32]) -> npt.NDArray[np.void]:
    """One record per row of a (positions, n) f32 array (see the module docstring)."""
    rows = np.ascontiguousarray(rows, dtype="<f4")
    out = np.zeros(rows.shape[0], RECORD)
    step = max(1, CHUNK_VALUES // max(rows.shape[1], 1))
    for lo in range(0, rows.shape[0], step):
        _fill(rows[lo : lo + step], out[lo : lo + step])
    digests = [hashlib.sha256(r.tobytes()).digest() for r in rows]
    out["sha256"] = np.frombuffer(b"".join(digests), "V32") if digests else out["sha256"]
    return out


def _fill(x32: npt.NDArray[np.float32], out: npt.NDArray[np.void]) -> None:
    if x32.shape[1] == 0:
        for k in FLOATS:
            out[k] = np.nan
        out["l2"] = 0.0
        return
    if np.isfinite(x32).all():  # the common case: no masks, no counts, f32 read as it is
        n = np.full(x32.shape[0], x32.shape[1])
        xs, hi, lo = x32, x32, x32
    else:
        finite = np.isfinite(x32)
        out["nan"] = np.isnan(x32).sum(axis=1)
        out["inf"] = np.isinf(x32).sum(axis=1)
        n = finite.sum(axis=1)
        xs = np.where(finite, x32, np.float32(0.0))
        hi = np.where(finite, x32, np.float32(-np.inf))
        lo = np.where(finite, x32, np.float32(np.inf))
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.sum(xs, axis=1, dtype=np.float64) / n
        dev = xs - mean[:, None]  # f64
        if xs is not x32:
            dev[~finite] = 0.0
        ss = np.einsum("ij,ij->i", dev, dev)
        out["mean"] = mean
        out["std"] = np.sqrt(ss / n)
        out["l2"] = np.sqrt(ss + n * mean * mean)  # Σx² = Σ(x − mean)² + n·mean²
        out["max"], out["min"] = hi.max(axis=1), lo.min(axis=1)  # exact in f32
        out["absmax"] = np.maximum(np.abs(out["max"]), np.abs(out["min"]))
    empty = n == 0
    if empty.any():
        for k in ("min", "max", "mean", "std", "absmax"):
            out[k][empty] = np.nan


@dataclass(frozen=True, slots=True)
class StatsEntry:
    """Where one stage's records are (manifest "stats.stages" item)."""

    stage: str
    layer: int | None
    shape: tuple[int, ...]
    first: int
    positions: range

    def to_json(self) -> dict[str, object]:
        return {
            "stage": self.stage,
            "layer": self.layer,
            "shape": list(self.shape),
            "first": self.first,
            "positions": f"{self.positions.start}..{self.positions.stop}",
        }


def header(n_records: int) -> bytes:
    return HEADER.pack(MAGIC, VERSION, RECORD_SIZE, n_records)


def encode(records: list[npt.NDArray[np.void]]) -> bytes:
    n = sum(len(r) for r in records)
    return header(n) + b"".join(r.tobytes() for r in records)


def read_records(path: Path) -> npt.NDArray[np.void]:
    """Every record of a stats file (checked: magic, version, record size, length)."""
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise TraceFormatError(f"cannot read {path}: {e.strerror or e}") from None
    if len(raw) < HEADER.size:
        raise TraceFormatError(f"{path}: stats header truncated ({len(raw)} bytes)")
    magic, version, size, count = HEADER.unpack_from(raw)
    if magic != MAGIC:
        raise TraceFormatError(f"{path}: not an APRS stats file (magic {magic!r})")
    if version != VERSION or size != RECORD_SIZE:
        raise TraceFormatError(
            f"{path}: APRS version {version} with {size}-byte records; this apr reads version {VERSION}"
        )
    if len(raw) != HEADER.size + count * RECORD_SIZE:
        raise TraceFormatError(
            f"{path}: {len(raw)} bytes, the header announces {count} records ({HEADER.size + count * 96})"
        )
    return np.frombuffer(raw, RECORD, count=count, offset=HEADER.size)
