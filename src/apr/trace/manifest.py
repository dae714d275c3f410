"""manifest.json: what aprender's APRT files leave out — run identity, shapes, dimension labels, layouts.

Written last (atomically) by the same writer that writes the stage files, so a directory with a manifest is a
complete trace of one run and lists exactly that run's files. Schema `apr-trace-manifest-v1`:

    {"schema", "apr_version", "model": {path, format, sha256, bytes, tensor_types},
     "config": ModelConfig fields,
     "prompt", "prompt_source": "text"|"file"|"tokens"|"chat", "prompt_file", "chat": {system, text}|null,
     "token_ids", "engine": {name, version, precision, settings}, "qk_layout",
     "lm_head_positions": "last"|"all", "plan": {stages, layers, positions?: "START..END"},
     "not_captured": [{stage, reason}],
     "notes": [...], "files": [{path, stage, layer, shape, dims, bytes, sha256}]}

A `--save-tensor-mode stats` trace has no stage files ("files": []), "plan.mode": "stats", and a "stats"
object describing its one statistics file (apr.trace.stats: file, version, bytes, sha256, stages). A full
trace writes neither key, so its manifest is what it always was.

No timestamps or host names: two identical runs write byte-identical manifests. `prompt` is the text given
(the user message of a chat prompt, "" for token ids); `chat.text` is the rendered template the ids come
from. Manifests written before `prompt_source` existed read as "text".
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from apr.errors import FormatError, TraceFormatError
from apr.formats.config import QKLayout
from apr.formats.files import read_regular
from apr.formats.jsonio import check, int_list, parse_json, want
from apr.models.config import ModelConfig
from apr.models.registry import stage_dims
from apr.stages import Stage, StageId
from apr.trace.prompt import PromptSource
from apr.trace.stats import MODE_FULL, MODE_STATS, StatsEntry
from apr.version import __version__

SCHEMA: Final = "apr-trace-manifest-v1"
MAX_MANIFEST: Final = 64 << 20  # a 1,000-layer full-stage trace writes ~10 MB

QK_STAGES: Final = frozenset({Stage.QKV_MATMUL, Stage.QKV_BIAS, Stage.Q_POST_ROPE, Stage.K_POST_ROPE})


def dims_for(stage: Stage, ndim: int) -> tuple[str, ...]:
    """Dimension labels as the engine emits the stage (lm_head has "vocab" alone when only the last
    position is kept): the stage graphs' (apr.models)."""
    dims = stage_dims()[stage]
    return dims[len(dims) - ndim :] if ndim <= len(dims) else dims


@dataclass(frozen=True, slots=True)
class FileEntry:
    path: str  # relative to the trace dir, "/"-separated
    sid: StageId
    shape: tuple[int, ...]
    bytes: int
    sha256: str

    @property
    def dims(self) -> tuple[str, ...]:
        return dims_for(self.sid.stage, len(self.shape))

    def to_json(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "stage": self.sid.stage.value,
            "layer": self.sid.layer,
            "shape": list(self.shape),
            "dims": list(self.dims),
            "bytes": self.bytes,
            "sha256": self.sha256,
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> FileEntry:
        where = "manifest 'files' entry"
        d = check(d, dict, where)
        layer = d.get("layer")
        if layer is not None:
            layer = check(layer, int, f"{where}: 'layer'")
        sid = StageId(Stage(want(d, "stage", str, where)), layer)
        shape = tuple(int_list(want(d, "shape", list, where), f"{where}: 'shape'"))
        if any(n < 0 for n in shape) or (layer is not None and layer < 0):
            raise TraceFormatError(f"{where}: negative layer or dimension in {d!r:.120}")
        size, sha = want(d, "bytes", int, where), want(d, "sha256", str, where)
        return cls(want(d, "path", str, where), sid, shape, size, sha)


@dataclass(frozen=True, slots=True)
class RunInfo:
    """Everything about a run except its files: filled by whoever runs the forward pass."""

    model_path: str
    model_format: str
    model_sha256: str
    model_bytes: int
    config: ModelConfig
    prompt: str
    token_ids: tuple[int, ...]
    engine: str = "reference"
    engine_version: str = ""
    precision: str = "f32"
    kv_type: str = "f32"  # the KV cache's element type (--kv-type)
    settings: dict[str, str] = field(default_factory=dict)
    qk_layout: QKLayout = QKLayout.HF
    lm_head_positions: str = "last"
    notes: tuple[str, ...] = ()
    unavailable: dict[str, str] = field(default_factory=dict)  # stage -> why this engine lacks it
    tensor_types: dict[str, str] = field(default_factory=dict)  # canonical weight name -> stored type
    prompt_source: PromptSource = PromptSource.TEXT
    prompt_file: str | None = None  # the file the prompt text was read from
    system_prompt: str | None = None  # chat: the system message
    chat_text: str | None = None  # chat: the rendered template, what was tokenized


@dataclass(frozen=True, slots=True)
class StatsFile:
    """The manifest's "stats" object: the statistics file of a `--save-tensor-mode stats` trace."""

    path: str
    version: int
    bytes: int
    sha256: str
    stages: tuple[StatsEntry, ...]

    def to_json(self) -> dict[str, Any]:
        return {
            "file": self.path,
            "version": self.version,
            "bytes": self.bytes,
            "sha256": self.sha256,
            "stages": [e.to_json() for e in self.stages],
        }

    @classmethod
    def from_json(cls, d: Any, source: str) -> StatsFile:
        where = f"{source}: manifest 'stats'"
        d = check(d, dict, where)
        stages = []
        for item in want(d, "stages", list, where):
            item = check(item, dict, f"{where} stage")
            layer = item.get("layer")
            if layer is not None:
                layer = check(layer, int, f"{where}: 'layer'")
            shape = tuple(int_list(want(item, "shape", list, where), f"{where}: 'shape'"))
            lo, sep, hi = want(item, "positions", str, where).partition("..")
            first = want(item, "first", int, where)
            if not sep or not lo.isdigit() or not hi.isdigit() or first < 0 or int(hi) < int(lo):
                raise TraceFormatError(f"{where}: bad stage entry {item!r:.120}")
            Stage(want(item, "stage", str, where))  # ValueError: an unknown stage
            stages.append(StatsEntry(item["stage"], layer, shape, first, range(int(lo), int(hi))))
        return cls(
            want(d, "file", str, where),
            want(d, "version", int, where),
            want(d, "bytes", int, where),
            want(d, "sha256", str, where),
            tuple(stages),
        )


@dataclass(frozen=True, slots=True)
class Manifest:
    run: RunInfo
    plan_stages: tuple[str, ...]
    plan_layers: str
    files: tuple[FileEntry, ...]
    not_captured: tuple[tuple[str, str], ...] = ()  # (stage id, reason)
    plan_positions: str | None = None  # "START..END" resolved (--save-tensor-positions); None: all
    stats: StatsFile | None = None  # --save-tensor-mode stats: the statistics file (then `files` is empty)

    @property
    def mode(self) -> str:
        """`full` (stage files) or `stats` (one statistics file)."""
        return MODE_FULL if self.stats is None else MODE_STATS

    @property
    def positions(self) -> str:
        """The prompt positions per-position stages hold, as "START..END" (all: "0..T")."""
        return self.plan_positions or f"0..{len(self.run.token_ids)}"

    def to_json(self) -> str:
        r = self.run
        doc: dict[str, Any] = {
            "schema": SCHEMA,
            "apr_version": __version__,
            "model": {
                "path": r.model_path,
                "format": r.model_format,
                "sha256": r.model_sha256,
                "bytes": r.model_bytes,
                "tensor_types": r.tensor_types,
            },
            "config": r.config.to_dict(),
            "prompt": r.prompt,
            "prompt_source": r.prompt_source.value,
            "prompt_file": r.prompt_file,
            "chat": None if r.chat_text is None else {"system": r.system_prompt, "text": r.chat_text},
            "token_ids": list(r.token_ids),
            "engine": {
                "name": r.engine,
                "version": r.engine_version,
                "precision": r.precision,
                "kv_type": r.kv_type,
                "settings": dict(sorted(r.settings.items())),
            },
            "qk_layout": r.qk_layout.value,
            "lm_head_positions": r.lm_head_positions,
            "plan": {
                "stages": list(self.plan_stages),
                "layers": self.plan_layers,
                **({} if self.plan_positions is None else {"positions": self.plan_positions}),
                **({} if self.stats is None else {"mode": MODE_STATS}),
            },
            "unavailable": dict(sorted(r.unavailable.items())),
            "not_captured": [{"stage": s, "reason": why} for s, why in self.not_captured],
            "notes": list(r.notes),
            "files": [f.to_json() for f in self.files],
        }
        if self.stats is not None:
            doc["stats"] = self.stats.to_json()
        return json.dumps(doc, indent=2, ensure_ascii=False) + "\n"

    @classmethod
    def from_json(cls, text: str | bytes, source: str) -> Manifest:
        try:
            d = parse_json(text, source)
            if not isinstance(d, dict):
                raise TraceFormatError(f"{source}: a trace manifest must be a JSON object")
            if d.get("schema") != SCHEMA:
                raise TraceFormatError(
                    f"{source}: unsupported manifest schema {d.get('schema')!r} (this apr reads {SCHEMA}); "
                    "HINT: re-run the trace with this version of apr"
                )
            e, m = d["engine"], d["model"]
            run = RunInfo(
                model_path=m["path"],
                model_format=m["format"],
                model_sha256=m["sha256"],
                model_bytes=int(m["bytes"]),
                config=ModelConfig.from_dict(d["config"]),
                prompt=d["prompt"],
                token_ids=tuple(int(t) for t in d["token_ids"]),
                engine=e["name"],
                engine_version=e["version"],
                precision=e["precision"],
                kv_type=e.get("kv_type", "f32"),
                settings=dict(e["settings"]),
                qk_layout=QKLayout(d["qk_layout"]),
                lm_head_positions=d["lm_head_positions"],
                notes=tuple(d["notes"]),
                unavailable=dict(d.get("unavailable", {})),
                tensor_types=dict(m.get("tensor_types", {})),
                prompt_source=PromptSource(d.get("prompt_source", "text")),
                prompt_file=d.get("prompt_file"),
                system_prompt=(d.get("chat") or {}).get("system"),
                chat_text=(d.get("chat") or {}).get("text"),
            )
            files = tuple(FileEntry.from_json(f) for f in d["files"])
            not_captured = tuple((n["stage"], n["reason"]) for n in d["not_captured"])
            plan = d["plan"]
            positions = plan.get("positions")
            if positions is not None and not isinstance(positions, str):
                raise TraceFormatError(f"{source}: plan 'positions' must be a string, got {positions!r:.40}")
            stats = StatsFile.from_json(d["stats"], source) if "stats" in d else None
            if (plan.get("mode", MODE_FULL) == MODE_STATS) != (stats is not None):
                raise TraceFormatError(f"{source}: plan 'mode' and the 'stats' object disagree")
            return cls(run, tuple(plan["stages"]), plan["layers"], files, not_captured, positions, stats)
        except TraceFormatError:
            raise
        except FormatError as e:
            raise TraceFormatError(str(e)) from None
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise TraceFormatError(
                f"{source}: malformed trace manifest ({type(exc).__name__}: {exc})"
            ) from None


def read_manifest(path: Path) -> Manifest:
    try:
        raw = read_regular(path, MAX_MANIFEST)
    except FormatError as e:
        raise TraceFormatError(str(e)) from None
    return Manifest.from_json(raw, str(path))
