"""TraceWriter: the Tap that turns (StageId, array) into APRT files in aprender's layout, plus manifest.json.

It filters by the plan (and tells the engine what it keeps: `wants`, `positions`), copies each kept stage
at its capture point and writes it on its own thread (apr.trace.background: files are written while the
forward pass goes on) into a temporary sibling of the output directory; on success it writes the manifest
last and swaps the directory in whole (apr.trace.outdir: a lock per directory; the previous trace survives
SIGINT, kill -9 and disk-full). Stage files of an earlier run in the directory are dropped with it (and
reported), other files in it are kept; a stage-named `.bin` that is not an APRT file is refused rather
than deleted.

In `stats` mode (apr.trace.stats) nothing is written per stage: each captured stage becomes one record per
kept position, held in memory (96 bytes a position), and the one statistics file is written with the
manifest when the run completes.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from types import TracebackType
from typing import Any, Final

import numpy as np
import numpy.typing as npt

from apr.errors import AprIOError
from apr.stages import Stage, StageId
from apr.trace import format as aprt
from apr.trace import stats as aprs
from apr.trace.background import BackgroundJobs
from apr.trace.layout import MANIFEST_NAME, relative_path
from apr.trace.manifest import FileEntry, Manifest, RunInfo, StatsFile
from apr.trace.outdir import OutputDir
from apr.trace.plan import TracePlan

TXT_STAGES: Final = frozenset({Stage.ATTN_SCORES, Stage.ATTN_SOFTMAX})  # (H, T, T): rows are query positions


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
    stats: WrittenStats | None = None  # --save-tensor-mode stats: the one statistics file


@dataclass(frozen=True, slots=True)
class WrittenStats:
    path: Path
    stages: int
    records: int  # one per stage and position
    bytes: int


def _write_all(fd: int, *parts: bytes | memoryview) -> None:
    """os.writev until every byte of `parts` is written (a write may be short)."""
    views = [memoryview(p).cast("B") for p in parts]
    while views:
        done = os.writev(fd, views)
        while views and done >= len(views[0]):
            done -= len(views[0])
            views.pop(0)
        if views:
            views[0] = views[0][done:]


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
        self._stats: dict[StageId, tuple[aprs.StatsEntry, npt.NDArray[np.void]]] = {}
        self._n_records = 0
        self._dir = OutputDir(out_dir)
        self._tmp = out_dir  # the temporary directory, from __enter__
        self._made: set[str] = set()  # its subdirectories made so far
        self._queued: set[StageId] = set()  # stages handed to the writer's thread
        self._jobs: BackgroundJobs | None = None  # that thread, from __enter__
        n = len(run.token_ids)
        self._rows = None if plan.positions.every else plan.positions.select(n)  # PlanError: none left

    def __enter__(self) -> TraceWriter:
        self._tmp = self._dir.open()
        self._jobs = BackgroundJobs()
        return self

    def wants(self, sid: StageId) -> bool:
        """The engine's question (apr.stages.tap_wants): is `sid` saved? If not, it skips work done only
        for the tap."""
        return self.plan.should_save(sid) and sid not in self._queued and sid not in self._stats

    def positions(self, n_tokens: int) -> npt.NDArray[np.intp] | None:
        """The engine's question (apr.stages.tap_positions): which rows of the T×T stages to compute."""
        return None if self._rows is None else np.arange(n_tokens)[self._rows.start : self._rows.stop]

    def __call__(self, sid: StageId, value: npt.NDArray[Any], /) -> None:
        if not self.wants(sid):
            return
        if sid.stage is Stage.LM_HEAD and self.run.lm_head_positions == "last" and value.ndim == 2:
            value = value[-1]
        if self.plan.mode == aprs.MODE_STATS:
            self._record(sid, np.ascontiguousarray(self._select(sid.stage, value), dtype=aprt.F32_LE))
            return
        arr = np.array(self._select(sid.stage, value), dtype=aprt.F32_LE, order="C")  # a copy: the job's own
        self._queued.add(sid)
        assert self._jobs is not None, "TraceWriter is used as a context manager"
        self._jobs.submit(partial(self._write_stage, sid, arr), arr.nbytes)

    def flush(self) -> None:
        """Wait until every stage handed over so far is on disk (in the temporary directory)."""
        if self._jobs is not None:
            self._jobs.drain()

    def _write_stage(self, sid: StageId, arr: npt.NDArray[np.float32]) -> None:
        """The stage file of `sid` and its manifest entry (on the writer's thread)."""
        rel = relative_path(sid)
        header = aprt.encode_header(sid.layer if sid.stage.per_layer else None, arr.size)
        body = arr.reshape(-1).view(np.uint8).data  # the array's own bytes: no copy for the file or hash
        try:
            self._write(rel, header, body)
        except OSError as e:
            raise AprIOError(f"cannot write {self.out_dir / rel}: {e.strerror or e}") from None
        digest = hashlib.sha256(header)
        digest.update(body)
        size = len(header) + body.nbytes
        self._entries[sid] = FileEntry(rel.as_posix(), sid, arr.shape, size, digest.hexdigest())
        self.result.files.append(WrittenFile(self.out_dir / rel, sid, size))

    def _write(self, rel: Path, header: bytes, body: memoryview) -> None:
        """One new file in the temporary directory (no temp file: the directory is swapped in whole), with
        plain descriptor calls: at 7 tokens the ~480 files are a quarter of a trace's time."""
        parent = rel.parent.as_posix()
        if parent not in self._made:
            os.makedirs(os.path.join(self._tmp, parent), exist_ok=True)
            self._made.add(parent)
        fd = os.open(os.path.join(self._tmp, rel), os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        try:
            _write_all(fd, header, body)
        finally:
            os.close(fd)

    def _record(self, sid: StageId, arr: npt.NDArray[np.float32]) -> None:
        records = aprs.compute(aprs.position_rows(arr, sid.stage in TXT_STAGES))
        n = len(self.run.token_ids)
        kept = range(n) if self._rows is None else self._rows
        positions = kept if len(records) == len(kept) else range(n - len(records), n)  # lm_head: the last
        entry = aprs.StatsEntry(sid.stage.value, sid.layer, arr.shape, self._n_records, positions)
        self._stats[sid] = (entry, records)
        self._n_records += len(records)

    def _select(self, stage: Stage, value: npt.NDArray[Any]) -> npt.NDArray[Any]:
        """The kept positions of a per-position stage: rows of (T, …); query rows of the (H, T, T) attention
        stages, unless the engine computed only those (the reference engine does; runtimes do not)."""
        rows = self._rows
        if rows is None or (stage is Stage.LM_HEAD and value.ndim == 1):
            return value
        if stage in TXT_STAGES:
            return value if value.shape[1] == len(rows) else value[:, rows.start : rows.stop]
        return value[rows.start : rows.stop]

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            if exc_type is None:
                self._finish()
        finally:
            try:
                if self._jobs is not None:
                    self._jobs.close()  # after a failure: drops the queued files, waits for the one in hand
            finally:
                self._dir.close()  # removes the temporary directory unless it was swapped in

    def _finish(self) -> None:
        self.flush()  # every stage file written (or the first failure raised)
        missing = [
            (str(sid), self.run.unavailable.get(sid.stage.value, _reason(sid, self.run)))
            for sid in expected_ids(self.plan, self.run.config.n_layers)
            if sid not in self._entries and sid not in self._stats
        ]
        self.result.not_captured = missing
        entries = sorted(self._entries.values(), key=lambda e: e.sid.sort_key)
        self.result.files.sort(key=lambda f: f.sid.sort_key)
        if not entries and not self._stats:
            self.result.files.clear()
            return  # like aprender: nothing selected, nothing written (an earlier trace stays as it was)
        stats = self._write_stats() if self._stats else None
        manifest = Manifest(
            run=self.run,
            plan_stages=tuple(s.value for s in self.plan.stages),
            plan_layers=f"{self.plan.layers.start}..{self.plan.layers.stop}",
            plan_positions=None if self._rows is None else f"{self._rows.start}..{self._rows.stop}",
            files=tuple(entries),
            not_captured=tuple(missing),
            stats=stats,
        )
        path = self.out_dir / MANIFEST_NAME
        try:
            (self._tmp / MANIFEST_NAME).write_bytes(manifest.to_json().encode("utf-8"))
        except OSError as e:
            raise AprIOError(f"cannot write {path}: {e.strerror or e}") from None
        self._dir.commit()
        self.result.removed_stale = list(self._dir.stale.values())
        self.result.manifest_path = path

    def _write_stats(self) -> StatsFile:
        """The statistics file, records in capture order (the engine's forward order)."""
        items = list(self._stats.values())
        data = aprs.encode([records for _, records in items])
        rel = aprs.FILE_NAME
        try:
            (self._tmp / rel).write_bytes(data)
        except OSError as e:
            raise AprIOError(f"cannot write {self.out_dir / rel}: {e.strerror or e}") from None
        self.result.stats = WrittenStats(self.out_dir / rel, len(items), self._n_records, len(data))
        entries = tuple(e for e, _ in items)
        return StatsFile(rel, aprs.VERSION, len(data), hashlib.sha256(data).hexdigest(), entries)


def _reason(sid: StageId, run: RunInfo) -> str:
    if sid.stage is Stage.QKV_BIAS and not run.config.qkv_bias:
        return "the model has no QKV bias"
    return f"the {run.engine} engine did not produce it"
