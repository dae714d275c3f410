"""Read a trace directory: the manifest when there is one (apr's traces), else aprender's bare layout.

Every stage file's APRT header is checked against where it lives (layer-N/ ↔ header layer, root ↔ the
whole-model sentinel) and, with a manifest, against the recorded shape, size and sha256 (hashed streaming,
so a stage file changed under an unchanged manifest is refused, not compared). Manifest paths must stay
inside the directory; only regular files are read. A directory without a manifest is read as aprender's
bare layout (`Trace.verified` is False) only when no apr temp or lock file says a run was cut short.
A `--save-tensor-mode stats` trace has no stage files: its statistics file is checked the same way (size,
sha256, version, one record per listed position) and its records are `Trace.stats`, per stage.
"""

from __future__ import annotations

import hashlib
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import numpy as np
import numpy.typing as npt

from apr.errors import AprError, NotFoundError, TraceFormatError
from apr.formats.files import confined, regular, stat_path
from apr.stages import Stage, StageId
from apr.trace import format as aprt
from apr.trace import stats as aprs
from apr.trace.layout import MANIFEST_NAME, debris, stage_files
from apr.trace.manifest import Manifest, StatsFile, read_manifest


@dataclass(frozen=True, slots=True)
class TraceEntry:
    sid: StageId
    path: Path
    header: aprt.AprtHeader
    shape: tuple[int, ...] | None  # known from the manifest
    sha256: str | None = None


@dataclass(frozen=True, slots=True)
class StageStats:
    """One stage of a stats trace: its full shape, the positions recorded, one record each."""

    sid: StageId
    shape: tuple[int, ...]
    positions: range
    records: npt.NDArray[np.void]  # apr.trace.stats.RECORD


@dataclass(frozen=True, slots=True)
class Trace:
    path: Path
    manifest: Manifest | None
    entries: dict[StageId, TraceEntry]  # in forward order
    stats: dict[StageId, StageStats] | None = None  # a stats-mode trace: per stage, its records

    @property
    def mode(self) -> str:
        return aprs.MODE_STATS if self.stats is not None else aprs.MODE_FULL

    @property
    def verified(self) -> bool:
        """Every stage file was checked against a manifest (False for aprender's bare traces)."""
        return self.manifest is not None

    def load(self, sid: StageId) -> npt.NDArray[np.float32]:
        e = self.entries[sid]
        values = aprt.read_aprt(e.path).values
        return values.reshape(e.shape) if e.shape is not None else values


HASH_CHUNK: Final = 1 << 20


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _check_header(sid: StageId, path: Path) -> aprt.AprtHeader:
    regular(path)
    header = aprt.read_aprt_header(path)
    expected = sid.layer if sid.stage.per_layer else None
    if header.layer != expected:
        shown = "whole-model" if header.layer is None else f"layer {header.layer}"
        want = "whole-model" if expected is None else f"layer {expected}"
        raise TraceFormatError(f"{path}: header says {shown}, but its place in the trace says {want}")
    aprt.check_body(path, header, path.stat().st_size)
    return header


def is_stats_dir(path: Path) -> bool:
    """A directory whose manifest says `--save-tensor-mode stats` (only the manifest is read; any problem
    with it is left for `read_trace` to report)."""
    try:
        return read_manifest(path / MANIFEST_NAME).stats is not None
    except (AprError, OSError):
        return False


def read_trace(path: Path | str, stages: Collection[StageId] | None = None) -> Trace:
    """Open a trace directory written by apr (manifest.json) or by aprender (layout only).

    `stages`: check and list only these stages' files (a single-file drill-down need not hash a whole
    multi-GB trace); None: every file the manifest lists."""
    path = Path(path)
    stat_path(path)  # not found, or a symlink loop, said as such
    if not path.is_dir():
        raise NotFoundError(f"Not a directory: {path}")
    manifest_path = path / MANIFEST_NAME
    if not manifest_path.exists() and not manifest_path.is_symlink():
        return _read_bare(path)
    manifest = read_manifest(manifest_path)
    entries = {}
    for f in manifest.files:
        if stages is not None and f.sid not in stages:
            continue
        p = confined(path, f.path, str(manifest_path))
        if not p.exists():
            raise TraceFormatError(f"{manifest_path}: lists {f.path}, which is missing")
        header = _check_header(f.sid, p)
        if header.count != int(np.prod(f.shape, dtype=np.int64)):
            raise TraceFormatError(
                f"{p}: holds {header.count} values, the manifest says shape {list(f.shape)}"
            )
        if (size := p.stat().st_size) != f.bytes:
            raise TraceFormatError(f"{p}: {size} bytes, the manifest says {f.bytes}")
        if _sha256(p) != f.sha256:
            raise TraceFormatError(
                f"{p}: sha256 differs from the manifest's (the file was changed after the run wrote it)"
            )
        entries[f.sid] = TraceEntry(f.sid, p, header, f.shape, f.sha256)
    ordered = dict(sorted(entries.items(), key=lambda kv: kv[0].sort_key))
    stats = _read_stats(path, manifest_path, manifest.stats) if manifest.stats is not None else None
    return Trace(path, manifest, ordered, stats)


def _read_stats(path: Path, manifest_path: Path, info: StatsFile) -> dict[StageId, StageStats]:
    p = confined(path, info.path, str(manifest_path))
    if not p.exists():
        raise TraceFormatError(f"{manifest_path}: lists {info.path}, which is missing")
    regular(p)
    if (size := p.stat().st_size) != info.bytes:
        raise TraceFormatError(f"{p}: {size} bytes, the manifest says {info.bytes}")
    if _sha256(p) != info.sha256:
        raise TraceFormatError(
            f"{p}: sha256 differs from the manifest's (the file was changed after the run wrote it)"
        )
    if info.version != aprs.VERSION:
        raise TraceFormatError(
            f"{manifest_path}: stats version {info.version}; this apr reads {aprs.VERSION}"
        )
    records = aprs.read_records(p)
    out: dict[StageId, StageStats] = {}
    for e in info.stages:
        stage = Stage(e.stage)
        sid = StageId(stage, e.layer if stage.per_layer else None)
        if e.first + len(e.positions) > len(records):
            raise TraceFormatError(f"{p}: {sid} lists records beyond the file's {len(records)}")
        out[sid] = StageStats(sid, e.shape, e.positions, records[e.first : e.first + len(e.positions)])
    return dict(sorted(out.items(), key=lambda kv: kv[0].sort_key))


def _read_bare(path: Path) -> Trace:
    """aprender's layout (no manifest): refused when apr's own temp/lock files show an interrupted run."""
    if left := debris(path):
        raise TraceFormatError(
            f"{path}: no {MANIFEST_NAME} and an interrupted apr run's files ({', '.join(left[:3])}): "
            "not a complete trace; re-run `apr trace` into it"
        )
    found = stage_files(path)
    entries = {sid: TraceEntry(sid, p, _check_header(sid, p), None) for sid, p in found.items()}
    return Trace(path, None, entries)
