"""TraceWriter: the Tap that turns (StageId, array) into APRT files in aprender's layout, plus manifest.json.

It filters by the plan, writes each file atomically at its capture point, and on success writes the manifest
last. Stage files of an earlier run in the same directory are removed first (and reported); a stage-named
`.bin` that is not an APRT file is refused rather than deleted. If the run fails, the files this run wrote
are removed, so a directory never holds a partial run under a manifest.
"""

from __future__ import annotations

import contextlib
import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np
import numpy.typing as npt

from apr.atomicfile import write_bytes_atomic
from apr.errors import AprIOError, ValidationError
from apr.stages import Stage, StageId
from apr.trace import format as aprt
from apr.trace.layout import MANIFEST_NAME, relative_path, stage_files
from apr.trace.manifest import FileEntry, Manifest, RunInfo
from apr.trace.plan import TracePlan


@dataclass(frozen=True, slots=True)
class WrittenFile:
    path: Path
    sid: StageId
    bytes: int


@dataclass
class TraceResult:
    out_dir: Path
    files: list[WrittenFile] = field(default_factory=list)
    removed_stale: list[Path] = field(default_factory=list)
    not_captured: list[tuple[str, str]] = field(default_factory=list)
    manifest_path: Path | None = None


def expected_ids(plan: TracePlan, n_layers: int) -> list[StageId]:
    """Every StageId the plan asks for on a model of `n_layers` layers (embedding only at layer 0)."""
    out: list[StageId] = []
    for stage in plan.unique_stages():
        if not stage.per_layer:
            out.append(StageId(stage))
        elif stage is Stage.EMBEDDING:
            out.extend([StageId(stage, 0)] if 0 in plan.layers else [])
        else:
            out.extend(StageId(stage, i) for i in plan.layers if i < n_layers)
    return out


class TraceWriter:
    """Use as a context manager; pass the instance as the engine's `tap`."""

    def __init__(self, out_dir: Path, plan: TracePlan, run: RunInfo) -> None:
        self.out_dir = out_dir
        self.plan = plan
        self.run = run
        self.result = TraceResult(out_dir)
        self._entries: dict[StageId, FileEntry] = {}

    def __enter__(self) -> TraceWriter:
        self._clear_stale()
        return self

    def _clear_stale(self) -> None:
        if self.out_dir.exists() and not self.out_dir.is_dir():
            raise ValidationError(f"output directory {self.out_dir} exists and is not a directory")
        stale = stage_files(self.out_dir)
        foreign = [p for p in stale.values() if not aprt.is_aprt(p)]
        if foreign:
            raise ValidationError(
                f"{foreign[0]} is named like a stage file but is not an APRT file; "
                "refusing to overwrite it (choose another --save-tensor-dir)"
            )
        for p in stale.values():
            try:
                p.unlink()
            except OSError as e:
                raise AprIOError(f"cannot remove stale trace file {p}: {e.strerror or e}") from None
            self.result.removed_stale.append(p)
        try:
            (self.out_dir / MANIFEST_NAME).unlink()
        except FileNotFoundError:
            pass
        except OSError as e:  # no manifest to remove is fine; a folder we may not change is not
            raise AprIOError(f"cannot write to {self.out_dir}: {e.strerror or e}") from None

    def __call__(self, sid: StageId, value: npt.NDArray[Any], /) -> None:
        if not self.plan.should_save(sid) or sid in self._entries:
            return
        arr = np.ascontiguousarray(value, dtype=aprt.F32_LE)
        if sid.stage is Stage.LM_HEAD and self.run.lm_head_positions == "last" and arr.ndim == 2:
            arr = np.ascontiguousarray(arr[-1])
        rel = relative_path(sid)
        data = aprt.encode(sid.layer if sid.stage.per_layer else None, arr)
        try:
            write_bytes_atomic(self.out_dir / rel, data)
        except OSError as e:
            raise AprIOError(f"cannot write {self.out_dir / rel}: {e.strerror or e}") from None
        entry = FileEntry(rel.as_posix(), sid, arr.shape, len(data), hashlib.sha256(data).hexdigest())
        self._entries[sid] = entry
        self.result.files.append(WrittenFile(self.out_dir / rel, sid, len(data)))

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is not None:
            self._discard()
            return
        self._finish()

    def _discard(self) -> None:
        for f in self.result.files:
            with contextlib.suppress(OSError):
                f.path.unlink()
        self.result.files.clear()

    def _finish(self) -> None:
        missing = [
            (str(sid), self.run.unavailable.get(sid.stage.value, _reason(sid, self.run)))
            for sid in expected_ids(self.plan, self.run.config.n_layers)
            if sid not in self._entries
        ]
        self.result.not_captured = missing
        entries = sorted(self._entries.values(), key=lambda e: e.sid.sort_key)
        self.result.files.sort(key=lambda f: f.sid.sort_key)
        if not entries:
            return  # like aprender: nothing selected, nothing written, no directory created
        manifest = Manifest(
            run=self.run,
            plan_stages=tuple(s.value for s in self.plan.stages),
            plan_layers=f"{self.plan.layers.start}..{self.plan.layers.stop}",
            files=tuple(entries),
            not_captured=tuple(missing),
        )
        path = self.out_dir / MANIFEST_NAME
        try:
            write_bytes_atomic(path, manifest.to_json().encode("utf-8"))
        except OSError as e:
            raise AprIOError(f"cannot write {path}: {e.strerror or e}") from None
        self.result.manifest_path = path


def _reason(sid: StageId, run: RunInfo) -> str:
    if sid.stage is Stage.QKV_BIAS and not run.config.qkv_bias:
        return "the model has no QKV bias"
    return f"the {run.engine} engine did not produce it"
