"""Read a trace directory: the manifest when there is one (apr's traces), else aprender's bare layout.

Every stage file's APRT header is checked against where it lives (layer-N/ ↔ header layer, root ↔ the
whole-model sentinel) and, with a manifest, against the recorded shape and size. Values are memory-mapped.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

from apr.errors import NotFoundError, TraceFormatError
from apr.stages import StageId
from apr.trace import format as aprt
from apr.trace.layout import MANIFEST_NAME, stage_files
from apr.trace.manifest import Manifest, read_manifest


@dataclass(frozen=True, slots=True)
class TraceEntry:
    sid: StageId
    path: Path
    header: aprt.AprtHeader
    shape: tuple[int, ...] | None  # known from the manifest
    sha256: str | None = None


@dataclass(frozen=True, slots=True)
class Trace:
    path: Path
    manifest: Manifest | None
    entries: dict[StageId, TraceEntry]  # in forward order

    def load(self, sid: StageId) -> npt.NDArray[np.float32]:
        e = self.entries[sid]
        values = aprt.read_aprt(e.path).values
        return values.reshape(e.shape) if e.shape is not None else values


def _check_header(sid: StageId, path: Path) -> aprt.AprtHeader:
    header = aprt.read_aprt_header(path)
    expected = sid.layer if sid.stage.per_layer else None
    if header.layer != expected:
        shown = "whole-model" if header.layer is None else f"layer {header.layer}"
        want = "whole-model" if expected is None else f"layer {expected}"
        raise TraceFormatError(f"{path}: header says {shown}, but its place in the trace says {want}")
    aprt.check_body(path, header, path.stat().st_size)
    return header


def read_trace(path: Path) -> Trace:
    """Open a trace directory written by apr (manifest.json) or by aprender (layout only)."""
    if not path.exists():
        raise NotFoundError(f"File not found: {path}")
    if not path.is_dir():
        raise NotFoundError(f"Not a directory: {path}")
    manifest_path = path / MANIFEST_NAME
    if not manifest_path.is_file():
        found = stage_files(path)
        entries = {sid: TraceEntry(sid, p, _check_header(sid, p), None) for sid, p in found.items()}
        return Trace(path, None, entries)
    manifest = read_manifest(manifest_path)
    entries = {}
    for f in manifest.files:
        p = path / f.path
        if not p.is_file():
            raise TraceFormatError(f"{manifest_path}: lists {f.path}, which is missing")
        header = _check_header(f.sid, p)
        if header.count != int(np.prod(f.shape, dtype=np.int64)):
            raise TraceFormatError(
                f"{p}: holds {header.count} values, the manifest says shape {list(f.shape)}"
            )
        entries[f.sid] = TraceEntry(f.sid, p, header, f.shape, f.sha256)
    ordered = dict(sorted(entries.items(), key=lambda kv: kv[0].sort_key))
    return Trace(path, manifest, ordered)
